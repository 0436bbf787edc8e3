"""Depth growth of a live TrainState: sources, exactness, moments, policies, validation (CPU, tiny models)."""

from __future__ import annotations

import json
import math

import pytest
import torch
from growth_helpers import (
    assert_same_snapshot,
    batch,
    expected_depth_state,
    opt_state_by_name,
    reference_step,
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
        (GrowPlan("none", target_dim=48), "integer multiple"),
        (GrowPlan("zero", factor=2, spec="1020"), "give no factor"),
        (GrowPlan("sources", spec="1,0,2"), "out of range 1..3"),
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
        # strict settings: fields the operator does not read are refused, not ignored
        ({"depth": "stack", "spec": "12-3456*5-56"}, "spec = '12-3456\\*5-56' is not used: op 'stack'"),
        ({"depth": "partial", "spec": "1-2*3", "factor": 4}, "factor = 4 is not used: op 'partial'"),
        ({"depth": "none", "target_dim": 64, "noise": 0.2}, "noise = 0.2 is not used: op 'width'"),
        ({"depth": "stack", "factor": 2, "width": "zero"}, "width = 'zero' is not used: it needs a width target"),
        ({"depth": "stack", "factor": 2, "rewarm_steps": 3}, "rewarm_steps = 3 is not used: schedule 'continue'"),
        ({"depth": "stack", "factor": 2, "schedule": "rewarm", "rewarm_steps": 2, "warmup_steps": 5}, "warmup_steps"),
        ({"depth": "stack", "factor": 2, "target_layers": 8}, "give one"),
    ]:
        with pytest.raises(ValueError, match=err):
            GrowPlan(**kw)


# --- exactness -----------------------------------------------------------------------------------


def test_zero_depth_growth_keeps_logits_exactly(base_state):
    tok = batch(61, 5)
    base_state.model.eval()
    ref = base_state.model(tok)
    # New blocks appended on top (factor 3: 3 old + 6 new), or where the spec's 0s put them.
    for plan, new in ((GrowPlan("zero", factor=3), range(3, 9)), (GrowPlan("zero", spec="102030"), (1, 3, 5))):
        g = grow(base_state, plan)
        assert g.model.cfg.n_layers == (9 if plan.factor else 6)
        out = g.model(tok)
        # New blocks add exact zeros to the residual stream: bitwise equal logits.
        assert torch.equal(out, ref)
        old_at = [i for i in range(g.model.cfg.n_layers) if i not in new]
        for i, j in zip(old_at, range(3)):
            assert torch.equal(g.model.layers[i].attn.wqkv.weight, base_state.model.layers[j].attn.wqkv.weight)
        for i in new:
            blk = g.model.layers[i]
            assert torch.count_nonzero(blk.attn.wo.weight) == 0 and torch.count_nonzero(blk.mlp.w2.weight) == 0
            assert blk.attn.wqkv.weight.std() > 0  # initialised, so wo/w2 get gradients at once
            st = g.optimizer.state[blk.attn.wqkv.weight]
            assert torch.count_nonzero(st["exp_avg"]) == 0 and torch.equal(st["step"], torch.tensor(3.0))
    base_state.model.train()


# Expected 0-based sources, written out by hand from the operators' definitions (3-layer base).
DEPTH_CASES = [
    (GrowPlan("stack", factor=4), [0, 1, 2] * 4),
    (GrowPlan("stack", target_layers=7), [0, 1, 2, 0, 1, 2, 0]),
    (GrowPlan("interpolate", factor=2), [0, 0, 1, 1, 2, 2]),
    (GrowPlan("interpolate", target_layers=7), [0, 0, 0, 1, 1, 2, 2]),
    (GrowPlan("partial", spec="1-23*3-3"), [0, 1, 2, 1, 2, 1, 2, 2]),
    (GrowPlan("sources", spec="3,2,1,1,2,3"), [2, 1, 0, 0, 1, 2]),
]


@pytest.mark.parametrize("plan,sources", DEPTH_CASES)
def test_stack_maps_layers_moments_and_step(base_state, plan, sources):
    g = grow(base_state, plan)
    assert g.model.cfg.n_layers == len(sources)
    params, moments = expected_depth_state(base_state, sources)
    new_p = dict(g.model.named_parameters())
    new_s = opt_state_by_name(g)
    assert set(new_p) == set(params) and set(new_s) == set(moments)
    old_ptrs = {p.data_ptr() for p in base_state.model.parameters()}
    old_ptrs |= {st["exp_avg"].data_ptr() for st in base_state.optimizer.state.values()}
    for n, p in new_p.items():
        assert torch.equal(p, params[n]), n
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(new_s[n][key], moments[n][key]), (n, key)
        # Fresh storage, not aliases: training the grown model must not touch the old one.
        assert p.data_ptr() not in old_ptrs and new_s[n]["exp_avg"].data_ptr() not in old_ptrs
    assert g.step == base_state.step and g.tokens == base_state.tokens
    assert g.config is base_state.config  # the run config as launched; the live arch is model.cfg
    assert g.cursor == base_state.cursor and g.cursor is not base_state.cursor
    rec = g.growth_history[-1]
    assert rec["sources"] == sources and rec["step"] == 3 and rec["stage"] == 0
    assert rec["params_after"] == g.model.num_params() and rec["params_before"] == base_state.model.num_params()
    json.dumps(rec)


@pytest.mark.parametrize(
    "plan,sources,lr_factor",
    [
        (GrowPlan("stack", factor=2), [0, 1, 2, 0, 1, 2], 1.0),
        # rewarm over 3 steps: the first step after growth runs at 1/3 of the scheduled LR
        (GrowPlan("partial", spec="1-23*2", schedule="rewarm", rewarm_steps=3), [0, 1, 2, 1, 2], 1 / 3),
    ],
)
def test_one_step_after_growth_equals_a_target_built_from_the_sources(base_state, plan, sources, lr_factor):
    """The reference is a fresh target model + AdamW loaded with the documented image of the *source*
    state (layer i <- layer sources[i], moments and step with it), stepped once at the LR the policy
    gives: the grown state's first step must land on it bit for bit."""
    g = grow(base_state, plan)
    params, moments = expected_depth_state(base_state, sources)
    tok = batch(61, 9)
    lr = base_state.schedule.scheduled(base_state.step) * lr_factor
    model, opt, loss_r = reference_step(g.model.cfg, base_state.config.train, params, moments, tok, lr)
    loss_g = train_step(g, tok)
    assert torch.equal(loss_g, loss_r)
    for grp_new, grp_ref in zip(g.optimizer.param_groups, opt.param_groups):
        assert (grp_new["group"], grp_new["weight_decay"]) == (grp_ref["group"], grp_ref["weight_decay"])
        assert len(grp_new["params"]) == len(grp_ref["params"])
    for (n, p), q in zip(g.model.named_parameters(), model.parameters()):
        assert torch.equal(p, q), n
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(g.optimizer.state[p][k], opt.state[q][k]), (n, k)


def test_reset_optimizer_starts_from_nothing(base_state):
    g = grow(base_state, GrowPlan("stack", factor=2, optimizer="reset"))
    assert len(g.optimizer.state) == 0
    params, _ = expected_depth_state(base_state, [0, 1, 2, 0, 1, 2])
    for n, p in g.model.named_parameters():
        assert torch.equal(p, params[n]), n
    train_step(g, batch(61, 2))
    assert all(torch.equal(st["step"], torch.tensor(1.0)) for st in g.optimizer.state.values())


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


def test_schedule_policies_by_hand():
    """Each policy's LR at a few steps, worked out by hand from the policy's definition. Base schedule:
    cosine, peak 1e-2 -> 1e-3, warmup 2, 20 steps; growth at step 3."""
    st = trained_state(tiny_run(), steps=3)

    def cos(peak, lo, pos, warmup, horizon):
        if pos < warmup:
            return peak * (pos + 1) / warmup
        frac = min(1.0, (pos - warmup) / (horizon - warmup))
        return lo + 0.5 * (peak - lo) * (1 + math.cos(math.pi * frac))

    g = grow(st, GrowPlan("stack", factor=2))  # continue: the same schedule
    assert g.schedule == st.schedule and g.schedule is not st.schedule
    g = grow(st, GrowPlan("stack", factor=2, schedule="rewarm", rewarm_steps=4))
    for step, ramp in ((3, 1 / 4), (5, 3 / 4), (7, 1.0), (12, 1.0)):
        assert g.schedule.lr_at(step) == pytest.approx(cos(1e-2, 1e-3, step, 2, 20) * ramp, rel=1e-12)
    # restart, defaults: the base's peak, min, warmup, decaying to the end of the run from step 3.
    g = grow(st, GrowPlan("stack", factor=2, schedule="restart"))
    for step in (3, 4, 5, 11, 19):
        assert g.schedule.lr_at(step) == pytest.approx(cos(1e-2, 1e-3, step - 3, 2, 17), rel=1e-12)
    # restart with the grown phase's own peak / warmup / horizon (min_lr keeps the base's ratio 1/10).
    g = grow(st, GrowPlan("stack", factor=2, schedule="restart", lr=4e-3, warmup_steps=3, horizon_steps=10))
    for step in (3, 5, 6, 9, 13, 15, 40):
        assert g.schedule.lr_at(step) == pytest.approx(cos(4e-3, 4e-4, step - 3, 3, 10), rel=1e-12)
    g = grow(st, GrowPlan("stack", factor=2, schedule="restart", lr=4e-3, min_lr=0.0))
    assert g.schedule.lr_at(19) == pytest.approx(cos(4e-3, 0.0, 16, 2, 17), rel=1e-12)
    # jump to step 10 of the target's schedule, which ends with the run: position 10 at step 3, and the
    # horizon is 10 + the 17 steps left = 27; re-warm over 2 steps.
    g = grow(st, GrowPlan("stack", factor=2, schedule="jump", jump_to_step=10, rewarm_steps=2))
    for step, ramp in ((3, 1 / 2), (4, 1.0), (8, 1.0), (19, 1.0)):
        assert g.schedule.lr_at(step) == pytest.approx(cos(1e-2, 1e-3, step + 7, 2, 27) * ramp, rel=1e-12)
    g = grow(st, GrowPlan("stack", factor=2, schedule="jump", jump_to_step=0, lr=5e-3))
    assert g.schedule.lr_at(3) == pytest.approx(cos(5e-3, 5e-4, 0, 2, 17), rel=1e-12)
    with pytest.raises(ValueError, match="min_lr"):
        grow(st, GrowPlan("stack", factor=2, schedule="restart", min_lr=0.5))
    with pytest.raises(ValueError, match="jump_to_step"):
        GrowPlan("stack", factor=2, schedule="jump")
    with pytest.raises(ValueError, match="lr = 0.1 is not used: schedule 'continue'"):
        GrowPlan("stack", factor=2, lr=0.1)


def test_prts_recipe_schedule():
    """prts (tongxuluo/prts, pretrain/run_pretrain.py + g_stack.sh): the grown model starts a fresh AdamW
    and a new cosine schedule, peak 3e-4, min 3e-5, 3000 warmup steps, decaying over 300000 steps from
    the growth step (its base ran at peak 1e-3). prts's get_lr(it) = peak * it / warmup in warmup; ours
    is one step ahead in warmup ((pos + 1) / warmup: the first step does not run at LR 0)."""
    run = tiny_run(train_lr=1e-3, train_min_lr=1e-4, train_warmup_steps=3000, train_max_steps=305_000)
    st = trained_state(run, steps=1)
    st.step = 5000
    plan = GrowPlan("stack", factor=2, optimizer="reset", schedule="restart", lr=3e-4, min_lr=3e-5, warmup_steps=3000)
    plan = GrowPlan(**{**plan.to_dict(), "horizon_steps": 300_000})
    g = grow(st, plan)
    assert len(g.optimizer.state) == 0

    def prts_get_lr(it, peak=3e-4, lo=3e-5, warmup=3000, decay=300_000):
        if it < warmup:
            return peak * it / warmup
        if it > decay:
            return lo
        ratio = (it - warmup) / (decay - warmup)
        return lo + 0.5 * (1.0 + math.cos(math.pi * ratio)) * (peak - lo)

    for it in (0, 1, 1500, 2999):
        assert g.schedule.lr_at(5000 + it) == pytest.approx(prts_get_lr(it + 1), rel=1e-12)
    for it in (3000, 3001, 150_000, 299_999, 300_000, 310_000):
        assert g.schedule.lr_at(5000 + it) == pytest.approx(prts_get_lr(it), rel=1e-12)


def test_zero_and_random_grow_a_0_layer_base():
    """Bu et al. 2025: a 0-layer base (embeddings, final norm, head) is a model; zero / random fill it
    with layers (zero keeps its function exactly), stack has nothing to copy."""
    st = trained_state(tiny_run(n_layers=0), steps=2)
    assert st.model.cfg.n_layers == 0 and len(st.model.layers) == 0
    tok = batch(61, 4)
    with torch.no_grad():
        ref = st.model(tok)
        g = grow(st, GrowPlan("zero", target_layers=4))
        assert torch.equal(g.model(tok), ref)
    assert g.growth_history[-1]["sources"] == [-1, -1, -1, -1]
    for blk in g.model.layers:
        assert torch.count_nonzero(blk.attn.wo.weight) == 0 and torch.count_nonzero(blk.mlp.w2.weight) == 0
    assert torch.equal(g.model.output.weight, st.model.output.weight)
    assert torch.equal(
        opt_state_by_name(g)["output.weight"]["exp_avg"], opt_state_by_name(st)["output.weight"]["exp_avg"]
    )
    r = grow(st, GrowPlan("random", target_layers=2))
    assert r.model.cfg.n_layers == 2 and r.model.layers[1].attn.wo.weight.std() > 0
    train_step(g, tok)
    with pytest.raises(ValueError, match="has none"):
        grow(st, GrowPlan("stack", target_layers=4))
    with pytest.raises(ValueError, match="give target_layers"):
        grow(st, GrowPlan("zero", factor=2))


def test_stack_grows_a_1_layer_base():
    st = trained_state(tiny_run(n_layers=1), steps=2)
    g = grow(st, GrowPlan("stack", target_layers=5))
    params, moments = expected_depth_state(st, [0] * 5)
    for n, p in g.model.named_parameters():
        assert torch.equal(p, params[n]), n
        assert torch.equal(opt_state_by_name(g)[n]["exp_avg_sq"], moments[n]["exp_avg_sq"]), n
    assert g.growth_history[-1]["connection_rate"] == 0.0
    train_step(g, batch(61, 5))


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
    tok = batch(512, 0).cuda()

    def stepped():
        st = build_state(cfg, device="cuda")
        for _ in range(2):
            train_step(st, tok)
        torch.cuda.synchronize()
        return st

    st = stepped()
    plans = [
        GrowPlan("stack", factor=4),
        GrowPlan("zero", factor=2, noise=0.2),
        GrowPlan("random", factor=2, target_dim=256, width="random"),
        GrowPlan("stack", factor=2, target_dim=256, target_ffn_dim=512, schedule="rewarm", rewarm_steps=5),
        GrowPlan("none", width="zero", target_dim=256, target_ffn_dim=320),
        GrowPlan("none", target_ffn_dim=384),  # direct, a non-integer FFN ratio (index_select path)
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
        src = stepped()  # the trainer's path: the input's tensors taken over
        torch.cuda.set_sync_debug_mode("error")
        try:
            grow(src, plan, consume=True)
        finally:
            torch.cuda.set_sync_debug_mode(0)
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
