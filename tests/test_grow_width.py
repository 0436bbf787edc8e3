"""Width growth: function preservation, the gradient / Adam-moment scaling rule, zero and random ops.

The oracle for `direct` is written independently of fastgrow.grow_width: each packed section of a weight
is `Tensor.repeat`-tiled (channel j' of a k-times wider axis copies channel j' mod n) and divided by the
multiplicity of the axis it reads.
"""

from __future__ import annotations

import pytest
import torch
from growth_helpers import batch, fresh_target_like, opt_state_by_name, tiny_run, train_step, trained_state

from fastgrow.grow import GrowPlan, grow


def _sections(cfg, name):
    hd = cfg.head_dim
    sizes = {
        "resid": cfg.dim,
        "q": cfg.n_heads * hd,
        "kv": cfg.n_kv_heads * hd,
        "ffn": cfg.ffn_dim,
        "vocab": cfg.vocab_size,
    }
    if name == "tok_embeddings.weight":
        return sizes, [("vocab", "resid")], "out_cols"
    if name == "output.weight":
        return sizes, [("vocab", "resid")], "out_rows"
    if name.endswith("norm.weight"):
        return sizes, [("resid", None)], "out_rows"
    if name.endswith("wqkv.weight"):
        return sizes, [("q", "resid"), ("kv", "resid"), ("kv", "resid")], "out_rows"
    if name.endswith("wo.weight"):
        return sizes, [("resid", "q")], "out_rows"
    if name.endswith("w13.weight"):
        return sizes, [("ffn", "resid"), ("ffn", "resid")], "out_rows"
    assert name.endswith("w2.weight")
    return sizes, [("resid", "ffn")], "out_rows"


def tile_oracle(src_cfg, dst_cfg, name, t, what):
    """what: 'param' (divide by input multiplicity), 'grad' (divide by output multiplicity), 'raw'."""
    so, secs, kind = _sections(src_cfg, name)
    sn, _, _ = _sections(dst_cfg, name)
    parts, row0 = [], 0
    for row, col in secs:
        piece = t[row0 : row0 + so[row]]
        row0 += so[row]
        rr = sn[row] // so[row]
        rc = 1 if col is None else sn[col] // so[col]
        tiled = piece.repeat(rr) if col is None else piece.repeat(rr, rc)
        out_mult = rc if kind == "out_cols" else rr
        in_mult = 1 if (col is None or kind == "out_cols") else rc
        if what == "param":
            tiled = tiled / in_mult
        elif what == "grad":
            tiled = tiled / out_mult
        parts.append(tiled)
    return torch.cat(parts, 0)


@pytest.fixture(scope="module")
def state_nowd():
    # No weight decay and a negligible Adam eps, so one Adam step is exactly m/sqrt(v) per element.
    return trained_state(tiny_run(train_weight_decay=0.0, train_eps=1e-12), steps=3)


DIRECT_PLANS = [
    GrowPlan("none", target_dim=64),  # 4 -> 8 heads, 2 -> 4 kv heads
    GrowPlan("none", target_ffn_dim=120),  # ffn x3
    GrowPlan("none", target_dim=128, target_ffn_dim=80),  # dim x4, ffn x2
    GrowPlan("none", target_heads=8),
]


@pytest.mark.parametrize("plan", DIRECT_PLANS)
def test_direct_width_preserves_logits_and_tiles_weights(state_nowd, plan):
    st = state_nowd
    g = grow(st, plan)
    src, dst = st.model.cfg, g.model.cfg
    assert dst.head_dim == src.head_dim
    assert dst.n_heads // dst.n_kv_heads == src.n_heads // src.n_kv_heads
    tok = batch(61, 3)
    st.model.eval()
    g.model.eval()
    ref = st.model(tok)
    out = g.model(tok)
    st.model.train()
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for (n, p), (_, q) in zip(st.model.named_parameters(), g.model.named_parameters()):
        torch.testing.assert_close(q, tile_oracle(src, dst, n, p, "param"), rtol=0, atol=0)


def test_direct_width_with_stacking_preserves_logits(state_nowd):
    g = grow(state_nowd, GrowPlan("zero", factor=2, target_dim=64, target_ffn_dim=80))
    tok = batch(61, 4)
    with torch.no_grad():
        torch.testing.assert_close(g.model(tok), state_nowd.model(tok), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("plan", DIRECT_PLANS[:3])
def test_direct_width_gradient_and_moment_scaling(state_nowd, plan):
    """grad(new) = s * tile(grad(old)) with s = 1/multiplicity of the output axis; moments m*s, v*s^2;
    so one Adam step moves every grown element exactly as its source element moves."""
    st = state_nowd
    g = grow(st, plan)
    src, dst = st.model.cfg, g.model.cfg
    old_m, new_m = opt_state_by_name(st), opt_state_by_name(g)
    for n, _ in st.model.named_parameters():
        s_old = old_m[n]
        torch.testing.assert_close(new_m[n]["exp_avg"], tile_oracle(src, dst, n, s_old["exp_avg"], "grad"))
        v_expect = tile_oracle(src, dst, n, s_old["exp_avg_sq"], "raw")
        scale = tile_oracle(src, dst, n, torch.ones_like(s_old["exp_avg_sq"]), "grad") ** 2
        torch.testing.assert_close(new_m[n]["exp_avg_sq"], v_expect * scale)
        assert torch.equal(new_m[n]["step"], s_old["step"])

    tok = batch(61, 11)
    # Gradients on the same batch: the symmetry argument of grow_width, checked numerically.
    small = {n: p.detach().clone() for n, p in st.model.named_parameters()}
    grown = {n: p.detach().clone() for n, p in g.model.named_parameters()}
    for m in (st.model, g.model):
        m(tok[:, :-1], tok[:, 1:]).backward()
    for (n, p), (_, q) in zip(st.model.named_parameters(), g.model.named_parameters()):
        torch.testing.assert_close(q.grad, tile_oracle(src, dst, n, p.grad, "grad"), rtol=1e-4, atol=1e-8)
    st.optimizer.zero_grad(set_to_none=True)
    g.optimizer.zero_grad(set_to_none=True)

    # One Adam step on each (on copies of the states: the fixture is shared).
    import copy

    st2, g2 = copy.deepcopy(st), copy.deepcopy(g)
    train_step(st2, tok)
    train_step(g2, tok)
    for (n, p), (_, q) in zip(st2.model.named_parameters(), g2.model.named_parameters()):
        d_small = p.detach() - small[n]
        d_grown = q.detach() - grown[n]
        torch.testing.assert_close(d_grown, tile_oracle(src, dst, n, d_small, "raw"), rtol=1e-3, atol=1e-7)
        assert d_small.abs().max() > 1e-4  # the step really moved this tensor


@pytest.mark.parametrize(
    "plan",
    [
        GrowPlan("none", target_dim=64, target_ffn_dim=56),
        GrowPlan("none", width="zero", target_dim=64, target_ffn_dim=50),
        GrowPlan("stack", factor=2, width="random", target_dim=48, target_heads=6),
    ],
)
def test_one_step_after_width_growth_equals_fresh_target(state_nowd, plan):
    if plan.width == "direct" and plan.target_ffn_dim == 56:
        with pytest.raises(ValueError, match="integer multiples"):
            grow(state_nowd, plan)
        return
    g = grow(state_nowd, plan)
    model, opt = fresh_target_like(g)
    tok = batch(61, 12)
    lr = g.schedule.lr_at(g.step)
    train_step(g, tok)
    for grp in opt.param_groups:
        grp["lr"] = lr
    model(tok[:, :-1], tok[:, 1:]).backward()
    opt.step()
    for (n, p), (_, q) in zip(g.model.named_parameters(), model.named_parameters()):
        assert torch.equal(p, q), n


def test_zero_width_growth():
    st = trained_state(tiny_run(norm_eps=1e-10), steps=2)
    g = grow(st, GrowPlan("none", width="zero", target_dim=64, target_ffn_dim=50))
    assert (g.model.cfg.n_heads, g.model.cfg.n_kv_heads) == (8, 4)
    tok = batch(61, 6)
    with torch.no_grad():
        # Exact but for RMSNorm's eps (here 1e-10; see grow_width's doc): tight tolerance.
        torch.testing.assert_close(g.model(tok), st.model(tok), rtol=1e-5, atol=1e-5)
    c = (32 / 64) ** 0.5
    old, new = st.model, g.model
    torch.testing.assert_close(new.layers[0].attn_norm.weight[:32], old.layers[0].attn_norm.weight * c)
    assert torch.count_nonzero(new.tok_embeddings.weight[:, 32:]) == 0
    assert torch.equal(new.tok_embeddings.weight[:, :32], old.tok_embeddings.weight)
    wqkv_new, wqkv_old = new.layers[1].attn.wqkv.weight, old.layers[1].attn.wqkv.weight
    assert torch.equal(wqkv_new[:32, :32], wqkv_old[:32, :32])  # old q heads
    assert torch.count_nonzero(wqkv_new[32:64]) == 0  # new q heads
    assert torch.equal(wqkv_new[64:80, :32], wqkv_old[32:48])  # old k heads come right after all q
    assert torch.count_nonzero(new.layers[1].mlp.w13.weight[40:50]) == 0  # new gate rows
    m_old = opt_state_by_name(st)["layers.1.mlp.w2.weight"]["exp_avg"]
    m_new = opt_state_by_name(g)["layers.1.mlp.w2.weight"]["exp_avg"]
    assert torch.equal(m_new[:32, :40], m_old) and torch.count_nonzero(m_new[32:]) == 0
    v_old = opt_state_by_name(st)["norm.weight"]["exp_avg_sq"]
    torch.testing.assert_close(opt_state_by_name(g)["norm.weight"]["exp_avg_sq"][:32], v_old / c**2)


def test_random_width_growth():
    st = trained_state(tiny_run(), steps=2)
    g = grow(st, GrowPlan("none", width="random", target_dim=128, target_ffn_dim=200))
    new, old = g.model, st.model
    assert torch.equal(new.output.weight[:, :32], old.output.weight)
    fresh = new.output.weight[:, 32:]
    assert 0.85 * 0.02 < fresh.std().item() < 1.15 * 0.02
    assert torch.equal(new.norm.weight[32:], torch.ones(96))
    w2 = new.layers[0].mlp.w2.weight
    std = new.init_std("layers.0.mlp.w2.weight")
    assert 0.85 * std < w2[32:, :].std().item() < 1.15 * std
    assert torch.count_nonzero(opt_state_by_name(g)["output.weight"]["exp_avg"][:, 32:]) == 0
    # Reproducible: same seed and step, same draws.
    g2 = grow(st, GrowPlan("none", width="random", target_dim=128, target_ffn_dim=200))
    assert torch.equal(g2.model.output.weight, new.output.weight)
