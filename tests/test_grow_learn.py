"""G_learn (LiGO): the maps' expansion, step-0 exactness, moments, FLOPs, training, save/restore (CPU, tiny).

The oracle for the expansion is written independently of fastgrow.grow_learn_maps: dense channel-level
matrices (kron(M, I_head_dim) for the head-level q/kv maps, divisors applied as a diagonal), applied
section by section and layer by layer in float64, then mixed over depth in a Python loop.
"""

from __future__ import annotations

import dataclasses
import warnings

import pytest
import torch
from growth_helpers import opt_state_by_name, tiny_run, trained_state
from safetensors.torch import load_file, save_file
from torch.utils.flop_counter import FlopCounterMode

from fastgrow.grow import GrowPlan, grow, resolve_plan
from fastgrow.grow_learn import LearnPhase, learn_flops_per_step, learn_grow
from fastgrow.grow_learn_maps import (
    AXIS_SIDES,
    GrowthMaps,
    SideMap,
    direct_width_maps,
    expansion_flops,
    head_level,
    map_moments,
    map_params,
)
from fastgrow.model import flops_per_token

PLANS = [
    GrowPlan("stack", factor=2),  # G_stack 3 -> 6 layers
    GrowPlan("stack", target_layers=7, target_dim=64, target_ffn_dim=120),  # + width x2 (heads 4 -> 8), ffn x3
    GrowPlan("none", target_dim=96),  # width only, x3 (a division that is not a power of two)
    GrowPlan("partial", spec="1-23*2"),  # a partial stack: 1, 2, 3, 2, 3
    GrowPlan("interpolate", factor=2, target_ffn_dim=80),
]


@pytest.fixture(scope="module")
def state():
    return trained_state(tiny_run(), steps=3)


# --- the independent oracle -------------------------------------------------------------------------------


def _dense_maps(maps: GrowthMaps) -> dict[tuple[str, str], torch.Tensor]:
    hd = maps.src.head_dim
    out = {}
    for axis, side in (*AXIS_SIDES, ("kv", "read")):
        m, div = maps.width_map(axis, side)
        m = m.detach().double()
        if axis in ("q", "kv"):
            m = torch.kron(m, torch.eye(hd, dtype=torch.float64))
            div = None if div is None else div.repeat_interleave(hd)
        out[(axis, side)] = m if div is None else m / div.double()[:, None]
    return out


def oracle_expand(maps, small, dense=None, depth=None):
    """W' per parameter name: sections of each small layer through dense maps, then a loop over depth."""
    src, dst = maps.src, maps.dst
    dense = dense or _dense_maps(maps)
    depth = depth or {k: c.detach().double() for k, c in maps.depth.items()}
    W = lambda a: dense[(a, "write")]
    R = lambda a: dense[(a, "read")]
    s = {n: t.double() for n, t in small.items()}
    out = {
        "tok_embeddings.weight": s["tok_embeddings.weight"] @ W("resid").T,
        "output.weight": s["output.weight"] @ R("resid").T,
        "norm.weight": W("resid") @ s["norm.weight"],
    }
    q_rows, kv_rows = src.n_heads * src.head_dim, src.n_kv_heads * src.head_dim
    per_layer = []
    for i in range(src.n_layers):
        p = lambda suffix: s[f"layers.{i}.{suffix}"]  # noqa: B023
        q, k, v = p("attn.wqkv.weight").split([q_rows, kv_rows, kv_rows])
        gate, up = p("mlp.w13.weight").split([src.ffn_dim, src.ffn_dim])
        per_layer.append(
            {
                "attn_norm": W("resid") @ p("attn_norm.weight"),
                "mlp_norm": W("resid") @ p("mlp_norm.weight"),
                "q": W("q") @ q @ R("resid").T,
                "k": W("kv") @ k @ R("resid").T,
                "v": W("kv") @ v @ R("resid").T,
                "wo": W("resid") @ p("attn.wo.weight") @ R("q").T,
                "gate": W("ffn") @ gate @ R("resid").T,
                "up": W("ffn") @ up @ R("resid").T,
                "w2": W("resid") @ p("mlp.w2.weight") @ R("ffn").T,
            }
        )
    for t in range(dst.n_layers):
        mixed = {kind: sum(depth[kind][t, i] * per_layer[i][kind] for i in range(src.n_layers)) for kind in depth}
        out[f"layers.{t}.attn_norm.weight"] = mixed["attn_norm"]
        out[f"layers.{t}.mlp_norm.weight"] = mixed["mlp_norm"]
        out[f"layers.{t}.attn.wqkv.weight"] = torch.cat([mixed["q"], mixed["k"], mixed["v"]])
        out[f"layers.{t}.attn.wo.weight"] = mixed["wo"]
        out[f"layers.{t}.mlp.w13.weight"] = torch.cat([mixed["gate"], mixed["up"]])
        out[f"layers.{t}.mlp.w2.weight"] = mixed["w2"]
    return out


def _small(state):
    return {n: p.detach() for n, p in state.model.named_parameters()}


def _randomise(maps: GrowthMaps, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in maps.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.3)


# --- expansion ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("plan", PLANS)
def test_step0_equals_the_copy_operator_exactly(state, plan):
    """Learn step 0 is G_stack (or the given copy operator) with width direct, bit for bit."""
    r = resolve_plan(plan, state.model.cfg)
    ref = dict(grow(state, plan).model.named_parameters())
    maps = GrowthMaps(r.src, r.dst, r.sources, direct_width_maps(r.src, r.dst))
    out = maps.expand(_small(state))
    assert out.keys() == ref.keys()
    for n, p in ref.items():
        assert out[n].dtype == p.dtype and out[n].shape == p.shape, n
        assert torch.equal(out[n], p), n
    # And materialise() of an untrained phase is that model too, with the same growth record fields.
    grown = LearnPhase(state, plan, steps=1).materialise()
    for n, p in grown.model.named_parameters():
        assert torch.equal(p, ref[n]), n
    rec = grown.growth_history[-1]
    assert rec["op"] == "learn" and rec["init_op"] == plan.depth and rec["sources"] == r.sources


@pytest.mark.parametrize("plan", PLANS[1:3])
def test_expansion_of_general_maps_matches_dense_oracle(state, plan):
    r = resolve_plan(plan, state.model.cfg)
    maps = GrowthMaps(r.src, r.dst, r.sources, direct_width_maps(r.src, r.dst))
    _randomise(maps, 5)
    out = maps.expand(_small(state))
    ref = oracle_expand(maps, _small(state))
    assert out.keys() == ref.keys()
    for n in ref:
        torch.testing.assert_close(out[n].double(), ref[n], rtol=1e-5, atol=1e-6, msg=n)


def test_initial_width_maps_are_an_input(state):
    """Any explicit per-axis map initialises the operator (here: a random invertible resid map)."""
    plan = GrowPlan("stack", factor=2, target_dim=64)
    r = resolve_plan(plan, state.model.cfg)
    init = direct_width_maps(r.src, r.dst)
    g = torch.Generator().manual_seed(1)
    init[("resid", "write")] = SideMap(torch.randn(64, 32, generator=g))
    init[("q", "read")] = SideMap(torch.kron(torch.randn(8, 4, generator=g), torch.eye(8)), torch.full((64,), 4.0))
    maps = GrowthMaps(r.src, r.dst, r.sources, init)
    out = maps.expand(_small(state))
    ref = oracle_expand(maps, _small(state))
    for n in ref:
        torch.testing.assert_close(out[n].double(), ref[n], rtol=1e-5, atol=1e-6, msg=n)
    assert torch.equal(maps.q_read, init[("q", "read")].matrix[::8, ::8])


def test_q_k_maps_must_act_on_whole_heads(state):
    plan = GrowPlan("none", target_dim=64)
    r = resolve_plan(plan, state.model.cfg)
    init = direct_width_maps(r.src, r.dst)
    m = init[("q", "write")].matrix.clone()
    m[0, 1] = 0.5  # mixes channel 1 into channel 0 of the same head: RoPE would rotate it wrongly
    init[("q", "write")] = SideMap(m)
    with pytest.raises(ValueError, match="whole heads"):
        GrowthMaps(r.src, r.dst, r.sources, init)
    with pytest.raises(ValueError, match="constant within a head"):
        head_level(SideMap(torch.eye(16), torch.arange(1.0, 17.0)), 8)
    with pytest.raises(ValueError, match="shape"):
        GrowthMaps(r.src, r.dst, r.sources, {**direct_width_maps(r.src, r.dst), ("ffn", "read"): SideMap(torch.eye(3))})


@pytest.mark.parametrize("plan", [PLANS[0], PLANS[1], PLANS[4]])
def test_expansion_flops_match_torch_flop_counter(state, plan):
    r = resolve_plan(plan, state.model.cfg)
    maps = GrowthMaps(r.src, r.dst, r.sources, direct_width_maps(r.src, r.dst))
    with FlopCounterMode(display=False) as fwd:
        out = maps.expand(_small(state))
    f, b = expansion_flops(r.src, r.dst)
    assert fwd.get_total_flops() == f
    assert map_params(r.src, r.dst) == sum(p.numel() for p in maps.parameters())
    loss = sum((t * t).sum() for t in out.values())
    with FlopCounterMode(display=False) as bwd:
        loss.backward()
    assert bwd.get_total_flops() == b
    tokens = 2 * 16
    assert learn_flops_per_step(r.src, r.dst, 16, tokens) == tokens * flops_per_token(r.dst, 16) + f + b


# --- moments -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("plan", [PLANS[0], PLANS[1], PLANS[2]])
def test_mapped_moments_at_step0_are_the_copy_operators(state, plan):
    ref = opt_state_by_name(grow(state, plan))  # G_stack / width direct with optimizer "copy"
    grown = LearnPhase(state, plan, steps=1).materialise()
    got = opt_state_by_name(grown)
    assert got.keys() == ref.keys()
    for n in ref:  # bit for bit: each copy's share a of its unit's gradient, m a and v a^2
        for key in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(got[n][key], ref[n][key]), f"{n}.{key}"
    fresh = LearnPhase(state, dataclasses.replace(plan, optimizer="reset"), steps=1).materialise()
    assert not fresh.optimizer.state


def test_mapped_moments_of_learned_maps_match_dense_oracle(state):
    """exp_avg through (read map on the output axis, write map on the input axis), exp_avg_sq through their
    squares, depth through c and c^2: the dense oracle with the maps' roles swapped."""
    plan = PLANS[1]
    r = resolve_plan(plan, state.model.cfg)
    maps = GrowthMaps(r.src, r.dst, r.sources, direct_width_maps(r.src, r.dst))
    _randomise(maps, 9)
    dense = _dense_maps(maps)
    swapped = {(a, s): dense[(a, "read" if s == "write" else "write")] for a, s in AXIS_SIDES}
    for kind, power in (("exp_avg", 1), ("exp_avg_sq", 2)):
        small = {n: st[kind] for n, st in opt_state_by_name(state).items()}
        got = map_moments(maps, small, kind)
        gdense = {k: m**power for k, m in swapped.items()}
        depth = {k: c.detach().double() ** power for k, c in maps.depth.items()}
        ref = oracle_expand(maps, small, dense=gdense, depth=depth)
        for n in ref:
            atol = 1e-5 * float(ref[n].abs().max())  # fp32 sums with cancellations (random signed maps)
            torch.testing.assert_close(got[n].double(), ref[n], rtol=1e-4, atol=atol, msg=f"{n} {kind}")
        if kind == "exp_avg_sq":
            assert all((got[n] >= 0).all() for n in got)


# --- training ------------------------------------------------------------------------------------------------


def _pattern_batches(vocab: int, seed: int, n: int, b: int = 4, s: int = 16):
    """A learnable stream: a repeating ramp with 10% noise, cut into (x, y) windows at random offsets."""
    g = torch.Generator().manual_seed(seed)
    base = torch.arange(1, 41).repeat(60)
    noise = torch.randint(1, vocab, base.shape, generator=g)
    toks = torch.where(torch.rand(base.shape, generator=g) < 0.1, noise, base)
    out = []
    for _ in range(n):
        starts = torch.randint(0, toks.numel() - s - 1, (b,), generator=g)
        rows = torch.stack([toks[i : i + s + 1] for i in starts.tolist()])
        out.append((rows[:, :-1], rows[:, 1:]))
    return out


@pytest.fixture(scope="module")
def pattern_state():
    """A 2-layer model trained 40 AdamW steps on the pattern stream."""
    from growth_helpers import train_step

    st = trained_state(tiny_run(n_layers=2, train_lr=3e-3, train_max_steps=100), steps=0)
    for x, y in _pattern_batches(61, 0, 40):
        train_step(st, torch.cat([x, y[:, -1:]], dim=1))
    return st


def _val_loss(model, batches):
    with torch.no_grad():
        return sum(float(model(x, y)) for x, y in batches) / len(batches)


def test_learning_lowers_the_loss_below_g_stack(pattern_state):
    plan = GrowPlan("stack", factor=2)
    val = _pattern_batches(61, 99, 4)
    stack_loss = _val_loss(grow(pattern_state, plan).model, val)
    phase = LearnPhase(pattern_state, plan, steps=8, lr=3e-2)
    assert phase.evaluate(val) == pytest.approx(stack_loss, abs=1e-6)  # step 0 is G_stack
    for x, y in _pattern_batches(61, 1, 8):
        loss, gnorm, bad = phase.train_step([(x, y)])
        assert torch.isfinite(loss) and not bool(bad)
    learned = phase.materialise()
    learn_loss = _val_loss(learned.model, val)
    assert learn_loss < stack_loss - 0.01, (learn_loss, stack_loss)
    assert phase.evaluate(val) == pytest.approx(learn_loss, abs=1e-5)
    rec = learned.growth_history[-1]
    assert rec["learn_steps"] == 8 and rec["op"] == "learn"
    # The small state is untouched and the maps moved from their one-hot start.
    assert pattern_state.model.cfg.n_layers == 2
    assert not torch.equal(
        phase.maps.depth["q"],
        GrowthMaps(
            phase.resolved.src,
            phase.resolved.dst,
            phase.resolved.sources,
            direct_width_maps(phase.resolved.src, phase.resolved.dst),
        ).depth["q"],
    )


def test_no_large_model_is_allocated_while_learning(pattern_state):
    """Between steps the phase holds the maps, their Adam state and a meta-device skeleton: no tensor
    shaped like a weight of the (3x wider) large model survives a learn step."""
    import gc

    phase = LearnPhase(pattern_state, GrowPlan("stack", factor=2, target_dim=96), steps=2)
    phase.train_step(_pattern_batches(61, 1, 1))
    assert all(p.is_meta for p in phase.skeleton.parameters())
    large_shapes = {tuple(p.shape) for p in phase.skeleton.parameters()} - {
        tuple(p.shape) for p in pattern_state.model.parameters()
    }
    assert (61, 96) in large_shapes
    gc.collect()
    own = {id(b) for b in phase.maps.buffers()}  # the fixed divisors, [new] vectors
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # isinstance() on some torch module attributes warns
        live = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and not o.is_meta and id(o) not in own]
    assert not [tuple(t.shape) for t in live if tuple(t.shape) in large_shapes]


def test_non_finite_learn_step_is_skipped(pattern_state, monkeypatch):
    phase = LearnPhase(pattern_state, GrowPlan("stack", factor=2), steps=3)
    before = {n: p.detach().clone() for n, p in phase.maps.named_parameters()}
    monkeypatch.setattr(phase, "_loss", lambda params, x, y: params["output.weight"].sum() * float("nan"))
    loss, gnorm, bad = phase.train_step(_pattern_batches(61, 1, 1))
    assert bool(bad) and phase.done == 1 and not phase.optimizer.state
    for n, p in phase.maps.named_parameters():
        assert torch.equal(p, before[n]), n


def test_save_and_restore_mid_learning_is_bitwise(pattern_state, tmp_path):
    plan = GrowPlan("stack", factor=2, target_dim=64)
    batches = _pattern_batches(61, 3, 5)
    straight, _ = learn_grow(pattern_state, plan, batches, steps=5, lr=3e-2)

    first = LearnPhase(pattern_state, plan, steps=5, lr=3e-2)
    for x, y in batches[:3]:
        first.train_step([(x, y)])
    save_file(first.state_tensors(), str(tmp_path / "learn.safetensors"))
    meta = first.state_meta()
    resumed = LearnPhase.restore(pattern_state, meta, load_file(str(tmp_path / "learn.safetensors")))
    assert resumed.done == 3
    for x, y in batches[3:]:
        resumed.train_step([(x, y)])
    assert resumed.finished
    with pytest.raises(RuntimeError, match="already taken"):
        resumed.train_step(batches[:1])
    grown = resumed.materialise()
    for (n, p), (_, q) in zip(straight.model.named_parameters(), grown.model.named_parameters()):
        assert torch.equal(p, q), n
    a, b = opt_state_by_name(straight), opt_state_by_name(grown)
    for n in a:
        for key in a[n]:
            assert torch.equal(a[n][key], b[n][key]), (n, key)


@pytest.mark.parametrize(
    "plan,kw,err",
    [
        (GrowPlan("stack", factor=2), {"steps": 0}, "learn_steps must be an integer >= 1"),
        (GrowPlan("stack", factor=2), {"lr": 0.0}, "learn_lr must be a positive number"),
        (GrowPlan("zero", factor=2), {}, "starts from a copy operator"),
        (GrowPlan("stack", factor=2, width="zero", target_dim=64), {}, "width 'direct'"),
        (GrowPlan("stack", factor=2, noise=0.2), {}, "no noise"),
        (
            GrowPlan("none", target_dim=48),
            {},
            "needs the hidden width .* to grow by an integer multiple, not resid 32 -> 48",
        ),  # 4 -> 6 heads: no direct map
        (GrowPlan("none", target_dim=36), {}, "not divisible by the head dim"),
        (GrowPlan("none", target_dim=40), {}, "multiple of the GQA group size"),
    ],
)
def test_bad_learn_settings_raise(state, plan, kw, err):
    with pytest.raises(ValueError, match=err):
        LearnPhase(state, plan, **kw)


@pytest.mark.gpu
def test_on_gpu_step0_is_exact_and_a_learn_step_needs_less_memory_than_training():
    """On CUDA (TF32 off for the expansion): learn step 0 is G_stack + width direct bit for bit, and the
    peak memory of a bf16 learn step (small state + maps) is below a training step of the grown model."""
    from fastgrow.grow_learn_maps import exact_matmuls
    from fastgrow.optim import set_lr
    from fastgrow.state import build_state

    dev = torch.device("cuda")
    cfg = tiny_run(vocab_size=4096, dim=256, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=688, max_seq_len=512)
    st = build_state(cfg, device=dev)
    x = torch.randint(0, 4096, (8, 512), device=dev)
    y = torch.roll(x, -1, 1)
    amp = lambda: torch.autocast("cuda", dtype=torch.bfloat16)  # noqa: E731
    with amp():
        st.model(x, y).backward()
    st.optimizer.step()
    st.optimizer.zero_grad(set_to_none=True)
    plan = GrowPlan("stack", factor=4, target_dim=512, target_ffn_dim=1376)
    phase = LearnPhase(st, plan, steps=3)
    with exact_matmuls():
        out = phase.expand()
    ref = grow(st, plan)
    for n, p in ref.model.named_parameters():
        assert torch.equal(out[n], p), n
    del out, ref
    phase.train_step([(x, y)], amp)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    phase.train_step([(x, y)], amp)
    torch.cuda.synchronize()
    learn_peak = torch.cuda.max_memory_allocated()
    grown = phase.materialise()
    del phase, st
    for _ in range(2):  # the first step allocates the Adam state, the second is measured
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        set_lr(grown.optimizer, 1e-4)
        with amp():
            grown.model(x, y).backward()
        grown.optimizer.step()
        grown.optimizer.zero_grad(set_to_none=True)
        torch.cuda.synchronize()
    train_peak = torch.cuda.max_memory_allocated()
    assert learn_peak < train_peak, (learn_peak, train_peak)


def test_micro_batches_accumulate_like_one_batch(pattern_state):
    """A step over two micro-batches (gradients accumulated into the expansion once) moves the maps as
    one step over their concatenation (equal-size batches: the mean of means is the mean)."""
    plan = GrowPlan("stack", factor=2, target_ffn_dim=80)
    (x1, y1), (x2, y2) = _pattern_batches(61, 4, 2)
    split, joint = LearnPhase(pattern_state, plan, steps=1), LearnPhase(pattern_state, plan, steps=1)
    loss_a, gnorm_a, _ = split.train_step([(x1, y1), (x2, y2)])
    loss_b, gnorm_b, _ = joint.train_step([(torch.cat([x1, x2]), torch.cat([y1, y2]))])
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gnorm_a, gnorm_b, rtol=1e-5, atol=1e-7)
    for (n, p), (_, q) in zip(split.maps.named_parameters(), joint.maps.named_parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=n)
