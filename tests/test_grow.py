"""Depth growth of a live TrainState: sources, exactness, moments, policies, validation (CPU, tiny models)."""

from __future__ import annotations

import json

import pytest
import torch
from growth_helpers import (
    assert_same_snapshot,
    batch,
    fresh_target_like,
    opt_state_by_name,
    snapshot,
    tiny_run,
    train_step,
    trained_state,
)

from fastgrow.config import GrowthConfig, RunConfig
from fastgrow.grow import (
    GrowPlan,
    apply_growth,
    connection_rate,
    grow,
    plan_from_config,
    resolve_plan,
    stack_sources,
)
from fastgrow.grow_depth import parse_spec
from fastgrow.stages import stage_tokens

BLOCK = (
    "attn_norm.weight",
    "attn.wqkv.weight",
    "attn.wo.weight",
    "mlp_norm.weight",
    "mlp.w13.weight",
    "mlp.w2.weight",
)


@pytest.fixture(scope="module")
def base_state():
    return trained_state(tiny_run(), steps=3)


# --- stack_sources / connection_rate ---------------------------------------------------------------


def test_stack_sources_paper_notation():
    # Du et al. 2024: `1-234*7-56` grows 6 layers to 24: layer 1, (2,3,4) x 7, then 5, 6.
    src = stack_sources("1-234*7-56", 6)
    assert src == [0] + [1, 2, 3] * 7 + [4, 5]
    assert len(src) == 24
    # `12-3456*5-56`: 1, 2, (3,4,5,6) x 5, 5, 6 = 24 layers.
    assert stack_sources("12-3456*5-56", 6) == [0, 1] + [2, 3, 4, 5] * 5 + [4, 5]
    assert stack_sources("123456*4", 6) == list(range(6)) * 4
    assert stack_sources("1,2,3,1,2,3", 3) == [0, 1, 2, 0, 1, 2]
    # Comma / parenthesised forms for models deeper than 9 layers.
    assert stack_sources("(1,2)-(3,4,5,6,7,8,9,10,11,12)-(10,11,12)*2", 12) == list(range(12)) + [9, 10, 11] * 2
    assert stack_sources("(1,2,3,4,5,6,7,8,9,10,11,12)*2", 12) == list(range(12)) * 2


def test_connection_rate_examples():
    # G_stack, g = 4 on 6 layers: 23 adjacent pairs, broken only at the 3 seams (6 -> 1): 20/23.
    assert connection_rate(stack_sources("123456*4", 6)) == pytest.approx(20 / 23)
    # Interpolation (1 1 1 1 2 2 2 2 ...): only the 5 crossings to the next layer are connected: 5/23.
    interp = resolve_plan(GrowPlan("interpolate", factor=4), tiny_run(n_layers=6).model).sources
    assert interp == [i // 4 for i in range(24)]
    assert connection_rate(interp) == pytest.approx(5 / 23)
    # 1-234*7-56: 1->2, 2->3 and 3->4 inside each of the 7 repeats (14), 4->5, 5->6: 17/23.
    assert connection_rate(stack_sources("1-234*7-56", 6)) == pytest.approx(17 / 23)
    assert connection_rate([0, 1, 2, 3]) == 1.0
    with pytest.raises(ValueError, match="at least 2"):
        connection_rate([0])


@pytest.mark.parametrize(
    "spec,err",
    [
        ("12-3x", "malformed"),
        ("1-2*0", "repeat"),
        ("1--2", "empty segment"),
        ("(1,2", "unbalanced"),
        ("1-2*x", "malformed"),
        ("7123456", "out of range"),
        ("0123456", "out of range"),
        ("12", "fewer"),
        ("", "empty"),
    ],
)
def test_malformed_specs_raise(spec, err):
    with pytest.raises(ValueError, match=err):
        stack_sources(spec, 6)


def test_zero_placement_spec():
    assert parse_spec("1020", 2, allow_new=True) == [0, -1, 1, -1]
    with pytest.raises(ValueError, match="out of range"):
        parse_spec("1020", 2)


# --- validation before anything is touched ----------------------------------------------------------


@pytest.mark.parametrize(
    "plan,err",
    [
        (GrowPlan("partial", spec="12-3x"), "malformed"),
        (GrowPlan("partial", spec="1-2-4"), "out of range"),
        (GrowPlan("stack", target_layers=2), "fewer"),
        (GrowPlan("partial", spec="12"), "fewer"),
        (GrowPlan("stack"), "factor or target_layers"),
        (GrowPlan("none", target_dim=64, target_heads=3), "not divisible by target_heads"),
        (GrowPlan("none", target_dim=36), "head dim"),
        (GrowPlan("none", target_dim=64, target_heads=16), "head dim must stay"),
        (GrowPlan("none", target_dim=48), "integer multiples"),
        (GrowPlan("none", target_ffn_dim=20), "shrink"),
        (GrowPlan("stack", factor=1), "does not grow"),
        (GrowPlan("sources", spec="1,2,3,4"), "out of range"),
    ],
)
def test_bad_plans_raise_before_modifying(base_state, plan, err):
    before = snapshot(base_state)
    hist = list(base_state.growth_history)
    with pytest.raises(ValueError, match=err):
        grow(base_state, plan)
    assert_same_snapshot(before, snapshot(base_state))
    assert base_state.growth_history == hist


def test_plan_field_validation():
    for kw, err in [
        ({"depth": "nope"}, "depth op"),
        ({"width": "learn"}, "width op"),
        ({"noise": 1.0}, "noise"),
        ({"optimizer": "keep"}, "optimizer"),
        ({"schedule": "rewarm"}, "rewarm_steps"),
        ({"factor": -1}, "factor"),
    ]:
        with pytest.raises(ValueError, match=err):
            GrowPlan(**kw)


# --- exactness -----------------------------------------------------------------------------------


def test_zero_depth_growth_keeps_logits_exactly(base_state):
    tok = batch(61, 5)
    base_state.model.eval()
    ref = base_state.model(tok)
    for plan in (GrowPlan("zero", factor=3), GrowPlan("zero", spec="102030")):
        g = grow(base_state, plan)
        assert g.model.cfg.n_layers == (9 if plan.factor else 6)
        out = g.model(tok)
        # New blocks add exact zeros to the residual stream: bitwise equal logits.
        assert torch.equal(out, ref)
        new = [i for i, s in enumerate(resolve_plan(plan, base_state.model.cfg).sources) if s < 0]
        for i in new:
            blk = g.model.layers[i]
            assert torch.count_nonzero(blk.attn.wo.weight) == 0 and torch.count_nonzero(blk.mlp.w2.weight) == 0
            assert blk.attn.wqkv.weight.std() > 0  # initialised, so wo/w2 get gradients at once
            st = g.optimizer.state[blk.attn.wqkv.weight]
            assert torch.count_nonzero(st["exp_avg"]) == 0 and torch.equal(st["step"], torch.tensor(3.0))
    base_state.model.train()


@pytest.mark.parametrize(
    "plan",
    [
        GrowPlan("stack", factor=4),
        GrowPlan("stack", target_layers=7),
        GrowPlan("interpolate", factor=2),
        GrowPlan("partial", spec="1-23*3-3"),
        GrowPlan("sources", spec="3,2,1,1,2,3"),
    ],
)
def test_stack_maps_layers_moments_and_step(base_state, plan):
    g = grow(base_state, plan)
    sources = resolve_plan(plan, base_state.model.cfg).sources
    assert g.model.cfg.n_layers == len(sources)
    old_p = dict(base_state.model.named_parameters())
    new_p = dict(g.model.named_parameters())
    old_s, new_s = opt_state_by_name(base_state), opt_state_by_name(g)
    assert set(new_s) == set(new_p)
    for i, s in enumerate(sources):
        for suffix in BLOCK:
            n_new, n_old = f"layers.{i}.{suffix}", f"layers.{s}.{suffix}"
            assert torch.equal(new_p[n_new], old_p[n_old])
            for key in ("exp_avg", "exp_avg_sq", "step"):
                assert torch.equal(new_s[n_new][key], old_s[n_old][key]), (n_new, key)
            # Fresh storage, not aliases: training the grown model must not touch the old one.
            assert new_p[n_new].data_ptr() != old_p[n_old].data_ptr()
            assert new_s[n_new]["exp_avg"].data_ptr() != old_s[n_old]["exp_avg"].data_ptr()
    for n in ("tok_embeddings.weight", "norm.weight", "output.weight"):
        assert torch.equal(new_p[n], old_p[n])
        assert torch.equal(new_s[n]["exp_avg_sq"], old_s[n]["exp_avg_sq"])
    assert g.step == base_state.step and g.tokens == base_state.tokens
    assert g.config is base_state.config  # the run config as launched; the live arch is model.cfg
    assert g.cursor == base_state.cursor and g.cursor is not base_state.cursor
    rec = g.growth_history[-1]
    assert rec["sources"] == sources and rec["step"] == 3
    assert rec["params_after"] == g.model.num_params() and rec["params_before"] == base_state.model.num_params()
    json.dumps(rec)


@pytest.mark.parametrize(
    "plan",
    [
        GrowPlan("stack", factor=2),
        GrowPlan("partial", spec="1-23*2", noise=0.2, schedule="rewarm", rewarm_steps=3),
        GrowPlan("random", factor=2),
        GrowPlan("stack", factor=2, optimizer="reset", schedule="restart"),
        GrowPlan("stack", factor=2, target_dim=64, target_ffn_dim=80),
    ],
)
def test_one_step_after_growth_equals_fresh_target(base_state, plan):
    g = grow(base_state, plan)
    model, opt = fresh_target_like(g)
    for grp_new, grp_ref in zip(g.optimizer.param_groups, opt.param_groups):
        assert grp_new["group"] == grp_ref["group"]
        assert grp_new["weight_decay"] == grp_ref["weight_decay"]
        assert len(grp_new["params"]) == len(grp_ref["params"])
    tok = batch(61, 9)
    lr = g.schedule.lr_at(g.step)
    loss_g = train_step(g, tok)
    for grp in opt.param_groups:
        grp["lr"] = lr
    loss_r = model(tok[:, :-1], tok[:, 1:])
    loss_r.backward()
    opt.step()
    assert torch.equal(loss_g, loss_r.detach())
    for (n, p), (_, q) in zip(g.model.named_parameters(), model.named_parameters()):
        assert torch.equal(p, q), n
    for p, q in zip(g.model.parameters(), model.parameters()):
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(g.optimizer.state[p][k], opt.state[q][k])


def test_param_groups_after_growth(base_state):
    g = grow(base_state, GrowPlan("random", factor=2))
    groups = {grp["group"]: grp for grp in g.optimizer.param_groups}
    decay_ids = {id(p) for p in groups["decay"]["params"]}
    nodecay_ids = {id(p) for p in groups["no_decay"]["params"]}
    for n, p in g.model.named_parameters():
        assert (id(p) in decay_ids) == (p.dim() >= 2), n
        assert (id(p) in nodecay_ids) == (p.dim() < 2), n
    assert groups["decay"]["weight_decay"] == g.config.train.weight_decay
    assert groups["no_decay"]["weight_decay"] == 0.0


def test_reset_optimizer_and_schedule_policies(base_state):
    g = grow(base_state, GrowPlan("stack", factor=2, optimizer="reset", schedule="restart"))
    assert len(g.optimizer.state) == 0
    assert g.schedule.offset == base_state.step
    assert g.schedule.lr_at(g.step) == pytest.approx(base_state.schedule.lr_at(0))
    g = grow(base_state, GrowPlan("stack", factor=2, schedule="rewarm", rewarm_steps=4))
    assert (g.schedule.rewarm_start, g.schedule.rewarm_steps) == (3, 4)
    assert g.schedule.lr_at(3) == pytest.approx(base_state.schedule.scheduled(3) / 4)
    assert g.schedule.lr_at(7) == pytest.approx(base_state.schedule.scheduled(7))
    g = grow(base_state, GrowPlan("stack", factor=2))
    assert g.schedule == base_state.schedule and g.schedule is not base_state.schedule


def test_noise_and_random_are_seeded_and_leave_global_rng(base_state):
    rng = torch.get_rng_state()
    plan = GrowPlan("stack", factor=2, noise=0.2)
    a, b = grow(base_state, plan), grow(base_state, plan)
    assert torch.equal(torch.get_rng_state(), rng)
    plain = grow(base_state, GrowPlan("stack", factor=2))
    for (n, p), q, r in zip(a.model.named_parameters(), b.model.parameters(), plain.model.parameters()):
        assert torch.equal(p, q), n
        if n.startswith("layers.") and p.dim() >= 2:
            eps = (p - 0.8 * r) / 0.2  # the drawn noise: N(0, init_std(name))
            std = a.model.init_std(n)
            assert 0.8 * std < eps.std().item() < 1.2 * std, n
        else:  # norms, embeddings and head get no noise
            assert torch.equal(p, r), n
    other = grow(base_state, GrowPlan("stack", factor=2, noise=0.2, seed=99))
    assert not torch.equal(other.model.layers[0].attn.wqkv.weight, a.model.layers[0].attn.wqkv.weight)


def test_random_blocks_use_target_init(base_state):
    g = grow(base_state, GrowPlan("random", target_layers=12))
    blk = g.model.layers[11]
    for n, p in blk.named_parameters():
        std = g.model.init_std(f"layers.11.{n}")
        if std == 0:
            assert torch.equal(p, torch.ones_like(p))
        else:
            assert 0.8 * std < p.std().item() < 1.2 * std, n
    # wo/w2 of the 12-layer target use std / sqrt(2 * 12), not the base's sqrt(2 * 3).
    assert g.model.init_std("layers.11.attn.wo.weight") < base_state.model.init_std("layers.0.attn.wo.weight")
    assert torch.equal(g.model.layers[2].attn.wo.weight, base_state.model.layers[2].attn.wo.weight)


def test_grow_does_not_modify_input_and_training_continues(base_state):
    before = snapshot(base_state)
    g = grow(base_state, GrowPlan("stack", factor=2))
    for i in range(3):
        loss = train_step(g, batch(61, 50 + i))
        assert torch.isfinite(loss)
    assert_same_snapshot(before, snapshot(base_state))
    assert g.step == 6 and len(g.growth_history) == 1 and base_state.growth_history == []
    g2 = grow(g, GrowPlan("stack", factor=2))
    assert g2.model.cfg.n_layers == 12 and len(g2.growth_history) == 2


def test_unstepped_optimizer_has_nothing_to_carry():
    from fastgrow.state import build_state

    st = build_state(tiny_run(), device="cpu")
    g = grow(st, GrowPlan("zero", factor=2))
    assert len(g.optimizer.state) == 0
    train_step(g, batch(61, 1))


# --- config glue ---------------------------------------------------------------------------------


def test_plan_from_config_and_apply_growth(base_state):
    cfg = GrowthConfig(at_tokens=100, op="partial", spec="1-23*3", noise=0.0, schedule="rewarm", rewarm_steps=2)
    plan = plan_from_config(cfg, base_state.model.cfg)
    assert plan.depth == "partial" and plan.spec == "1-23*3" and plan.rewarm_steps == 2
    g = apply_growth(base_state, cfg)
    assert g.model.cfg.n_layers == 7
    g = apply_growth(base_state, GrowthConfig(at_tokens=1, op="stack", factor=2))
    assert g.model.cfg.n_layers == 6
    g = apply_growth(base_state, GrowthConfig(at_tokens=1, op="width", target_ffn_dim=80))
    assert g.model.cfg.n_layers == 3 and g.model.cfg.ffn_dim == 80
    with pytest.raises(ValueError, match="growth.op"):
        plan_from_config(GrowthConfig(at_tokens=1, op="bogus"), base_state.model.cfg)


def test_stage_tokens():
    run = tiny_run()
    assert stage_tokens(run) == []
    run = RunConfig(model=run.model, data=run.data, train=run.train, growth=(GrowthConfig(at_tokens=512),))
    assert stage_tokens(run) == [512]
    run = RunConfig(model=run.model, data=run.data, train=run.train, growth=(GrowthConfig(at_tokens="auto"),))
    budget = run.train.max_steps * run.data.batch_size * run.data.seq_len
    # Eq. 10 extrapolates far past the budget for a model this small: clamped to half of it.
    assert stage_tokens(run) == [budget // 2]


# --- GPU: no host syncs, no DtoH copies -------------------------------------------------------------


@pytest.mark.gpu
def test_grow_on_gpu_has_no_host_sync():
    from torch.profiler import ProfilerActivity, profile

    from fastgrow.state import build_state

    # Reference kernels / SDPA for the training steps: this test is about grow(), not the kernels.
    cfg = tiny_run(
        dim=128,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=256,
        n_layers=2,
        vocab_size=512,
        kernel_impl="ref",
        attn_backend="sdpa",
    )
    st = build_state(cfg, device="cuda")
    tok = batch(512, 0).cuda()
    for _ in range(2):
        train_step(st, tok)
    torch.cuda.synchronize()
    plans = [
        GrowPlan("stack", factor=4),
        GrowPlan("zero", factor=2, noise=0.2),
        GrowPlan("random", factor=2, target_dim=256, width="random"),
        GrowPlan("stack", factor=2, target_dim=256, target_ffn_dim=512, schedule="rewarm", rewarm_steps=5),
    ]
    for plan in plans:
        torch.cuda.set_sync_debug_mode("error")
        try:
            g = grow(st, plan)
        finally:
            torch.cuda.set_sync_debug_mode(0)
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            g = grow(st, plan)
            torch.cuda.synchronize()
        names = [e.name for e in prof.events()]
        bad = [n for n in names if "DtoH" in n or "Memcpy DtoH" in n or "cudaStreamSynchronize" in n]
        assert not bad, bad
        assert g.model.layers[0].attn.wqkv.weight.is_cuda
        assert all(s["step"].is_cuda for s in g.optimizer.state.values())  # fused AdamW keeps step on device
        train_step(g, tok)


def test_grow_keeps_dtype_and_eval_mode():
    from fastgrow.optim import build_optimizer
    from fastgrow.state import build_state

    st = build_state(tiny_run(), device="cpu")
    st.model.to(torch.bfloat16).eval()
    st.optimizer = build_optimizer(st.model, st.config.train)
    g = grow(st, GrowPlan("stack", factor=2, target_ffn_dim=80))
    assert all(p.dtype == torch.bfloat16 for p in g.model.parameters())
    assert g.model.rope_cos.dtype == st.model.rope_cos.dtype and torch.equal(g.model.rope_cos, st.model.rope_cos)
    assert not g.model.training
    assert torch.equal(g.model.layers[4].attn.wqkv.weight, st.model.layers[1].attn.wqkv.weight)  # 6 <- 1,2,3,1,2,3
