"""Width growth: `direct` against the documented linear maps (weights and moments), its gradient shares,
`zero`'s structure, function preservation at growth and full rank 20 steps later, and `random`.

Expected values come from tests/growth_oracle.py, which rebuilds the documented mapping with dense
matrices and imports nothing from fastgrow's growth code.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from growth_helpers import (
    batch,
    opt_state_by_name,
    reference_step,
    stream_run,
    tiny_run,
    train_step,
    trained_state,
    write_token_stream,
)
from growth_oracle import direct_width, fractions, gathered, out_fraction

from fastgrow.config import GrowthConfig
from fastgrow.grow import GrowPlan, grow
from fastgrow.grow_width import AxisMap


@pytest.fixture(scope="module")
def state_nowd():
    # No weight decay and a negligible Adam eps, so one Adam step is exactly m/sqrt(v) per element.
    return trained_state(tiny_run(train_weight_decay=0.0, train_eps=1e-12), steps=3)


DIRECT_PLANS = [
    GrowPlan("none", target_dim=64),  # dim x2: 4 -> 8 heads, 2 -> 4 kv heads
    GrowPlan("none", target_ffn_dim=120),  # ffn x3: three copies per channel
    GrowPlan("none", target_dim=128, target_ffn_dim=60),  # dim x4, ffn x1.5 (a non-integer ratio)
    GrowPlan("stack", factor=2, target_dim=64, target_ffn_dim=80),  # depth and width at once
]


def test_split_fractions_are_the_documented_ones():
    # Two copies: 1/8 and 7/8, the assignment rotated by the unit index (a channel, or a head of 2 here).
    assert AxisMap(4, 8).split().tolist() == [1 / 8, 7 / 8, 1 / 8, 7 / 8, 7 / 8, 1 / 8, 7 / 8, 1 / 8]
    assert AxisMap(4, 8, unit=2).split().tolist() == [1 / 8, 1 / 8, 7 / 8, 7 / 8, 7 / 8, 7 / 8, 1 / 8, 1 / 8]
    # Three copies: 1/8, 1/16, 13/16; a 2 -> 3 axis: channel 0 has two copies, channel 1 one.
    assert AxisMap(1, 3).split().tolist() == [1 / 8, 1 / 16, 13 / 16]
    assert AxisMap(2, 3).split().tolist() == [1 / 8, 1.0, 7 / 8]
    for old, new, unit in [(4, 8, 1), (6, 15, 1), (16, 48, 8), (5, 5, 1)]:
        s = AxisMap(old, new, unit)
        assert s.split().tolist() == fractions(old, new, unit)
        # Every old column is split into fractions that sum to exactly 1; E duplicates.
        assert torch.equal(s.matrix("split").sum(0), torch.ones(old))
        assert torch.equal(s.matrix("duplicate").sum(1), torch.ones(new))


@pytest.mark.parametrize("plan", DIRECT_PLANS)
def test_direct_matches_the_documented_maps(state_nowd, plan):
    st = state_nowd
    g = grow(st, plan)
    src, dst = st.model.cfg, g.model.cfg
    assert dst.head_dim == src.head_dim and dst.n_heads // dst.n_kv_heads == src.n_heads // src.n_kv_heads
    assert dst.norm_eps == src.norm_eps
    layer_src = (lambda i: i % src.n_layers) if plan.depth == "stack" else (lambda i: i)
    old_p = dict(st.model.named_parameters())
    old_m = opt_state_by_name(st)
    new_m = opt_state_by_name(g)
    for n, q in g.model.named_parameters():
        sn = n if not n.startswith("layers.") else f"layers.{layer_src(int(n.split('.')[1]))}.{n.split('.', 2)[2]}"
        assert torch.equal(q, direct_width(src, dst, sn, old_p[sn])), n
        for kind in ("exp_avg", "exp_avg_sq"):
            assert torch.equal(new_m[n][kind], direct_width(src, dst, sn, old_m[sn][kind], kind)), (n, kind)
        assert torch.equal(new_m[n]["step"], old_m[sn]["step"])
    if plan.depth == "none":  # (stacking changes the function; width direct alone does not)
        tok = batch(61, 3)
        with torch.no_grad():
            torch.testing.assert_close(g.model(tok), st.model(tok), rtol=1e-5, atol=1e-5)


def test_direct_gradient_shares_and_first_update(state_nowd):
    """Where the docs call the share exact (q heads, FFN channels, norm gains, and the head's columns,
    whose output is not grown), the grown gradient is the share times the duplicated old gradient, and
    one Adam step moves each element exactly as its source element moves."""
    st = state_nowd
    plan = GrowPlan("none", target_dim=64, target_ffn_dim=80)
    g = grow(st, plan)
    src, dst = st.model.cfg, g.model.cfg
    q_rows = dst.n_heads * dst.head_dim
    exact = {
        "layers.1.attn.wqkv.weight": slice(0, q_rows),  # the q section
        "layers.0.mlp.w13.weight": slice(None),
        "layers.2.attn_norm.weight": slice(None),
        "norm.weight": slice(None),
        "output.weight": slice(None),
    }
    st2, g2 = copy.deepcopy(st), copy.deepcopy(g)
    tok = batch(61, 11)
    for m in (st2.model, g2.model):
        m(tok[:, :-1], tok[:, 1:]).backward()
    old_p, new_p = dict(st2.model.named_parameters()), dict(g2.model.named_parameters())
    for n, rows in exact.items():
        share = out_fraction(src, dst, n)
        expect = share * gathered(src, dst, n, old_p[n].grad)
        atol = 1e-5 * expect.abs().max().item()  # fp32 sums in a different order
        torch.testing.assert_close(new_p[n].grad.double()[rows], expect[rows], rtol=1e-4, atol=atol)
    st2.optimizer.zero_grad(set_to_none=True)
    g2.optimizer.zero_grad(set_to_none=True)
    before_old = {n: p.detach().clone() for n, p in st2.model.named_parameters()}
    before_new = {n: p.detach().clone() for n, p in g2.model.named_parameters()}
    train_step(st2, tok)
    train_step(g2, tok)
    new_p = dict(g2.model.named_parameters())
    for n, rows in exact.items():
        d_old = gathered(src, dst, n, dict(st2.model.named_parameters())[n].detach() - before_old[n])
        d_new = (new_p[n].detach() - before_new[n]).double()
        assert d_old.abs().max() > 1e-4  # the step really moved this tensor
        torch.testing.assert_close(d_new[rows], d_old[rows], rtol=1e-3, atol=1e-7)


def test_one_step_after_direct_growth_equals_a_target_built_from_the_maps(state_nowd):
    st = state_nowd
    g = grow(st, GrowPlan("none", target_dim=64, target_ffn_dim=56))
    src, dst = st.model.cfg, g.model.cfg
    old_p, old_m = dict(st.model.named_parameters()), opt_state_by_name(st)
    params = {n: direct_width(src, dst, n, p) for n, p in old_p.items()}
    moments = {
        n: {
            "exp_avg": direct_width(src, dst, n, s["exp_avg"], "exp_avg"),
            "exp_avg_sq": direct_width(src, dst, n, s["exp_avg_sq"], "exp_avg_sq"),
            "step": s["step"].clone(),
        }
        for n, s in old_m.items()
    }
    tok = batch(61, 12)
    lr = st.schedule.lr_at(st.step)  # schedule "continue"
    model, opt, loss_r = reference_step(dst, st.config.train, params, moments, tok, lr)
    loss_g = train_step(g, tok)
    assert torch.equal(loss_g, loss_r)
    for (n, p), q in zip(g.model.named_parameters(), model.parameters()):
        assert torch.equal(p, q), n
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(g.optimizer.state[p][k], opt.state[q][k]), (n, k)


def test_zero_width_structure():
    st = trained_state(tiny_run(), steps=2)  # norm_eps 1e-5: exact anyway (eps scaled with the width)
    g = grow(st, GrowPlan("none", width="zero", target_dim=64, target_ffn_dim=50))
    old, new = st.model, g.model
    assert (new.cfg.n_heads, new.cfg.n_kv_heads) == (8, 4)
    assert new.cfg.norm_eps == pytest.approx(st.model.cfg.norm_eps * 32 / 64, rel=1e-15)
    tok = batch(61, 6)
    with torch.no_grad():
        torch.testing.assert_close(new(tok), old(tok), rtol=1e-5, atol=2e-6)
    c = (32 / 64) ** 0.5
    ln_new, ln_old = new.layers[0].attn_norm.weight, old.layers[0].attn_norm.weight
    torch.testing.assert_close(ln_new[:32], ln_old * c, rtol=1e-6, atol=0)
    assert torch.allclose(ln_new[32:], torch.full((32,), c))  # new gains open, so new channels learn

    def is_random(t, std):
        return t.numel() > 0 and bool(torch.all(t != 0)) and 0.7 * std < t.std().item() < 1.3 * std

    emb = new.tok_embeddings.weight
    assert torch.equal(emb[:, :32], old.tok_embeddings.weight) and torch.count_nonzero(emb[:, 32:]) == 0
    q, kv = 64, 32  # rows of the q section, of each kv section (grown)
    w_new, w_old = new.layers[1].attn.wqkv.weight, old.layers[1].attn.wqkv.weight
    std = new.init_std("layers.1.attn.wqkv.weight")
    assert torch.equal(w_new[:32, :32], w_old[:32, :32])  # old q heads
    assert torch.equal(w_new[q : q + 16, :32], w_old[32:48])  # old k heads follow all q heads
    assert torch.equal(w_new[q + kv : q + kv + 16, :32], w_old[48:64])  # old v heads
    assert is_random(w_new[32:q], std) and is_random(w_new[q + 16 : q + kv], std)  # new q and k rows: open
    assert torch.count_nonzero(w_new[q + kv + 16 :, :32]) == 0  # new v rows: closed (old columns)
    assert is_random(w_new[q + kv + 16 :, 32:], std) and is_random(w_new[:32, 32:], std)  # new input columns
    w13 = new.layers[0].mlp.w13.weight
    assert torch.count_nonzero(w13[40:50, :32]) == 0 and is_random(w13[40:50, 32:], std)  # new gate rows
    assert is_random(w13[90:100], std)  # new up rows (open)
    for name in ("attn.wo.weight", "mlp.w2.weight"):
        w = dict(new.layers[0].named_parameters())[name]
        n_in = w.shape[1] * 32 // 64 if name.startswith("attn") else 40
        assert torch.count_nonzero(w[32:, :n_in]) == 0  # new residual channels: never written
        assert is_random(w[:, n_in:], new.init_std(f"layers.0.{name}"))  # new input columns
    assert is_random(new.output.weight[:, 32:], new.init_std("output.weight"))
    s_old, s_new = opt_state_by_name(st), opt_state_by_name(g)
    m_old, m_new = s_old["layers.1.mlp.w2.weight"]["exp_avg"], s_new["layers.1.mlp.w2.weight"]["exp_avg"]
    assert torch.equal(m_new[:32, :40], m_old) and torch.count_nonzero(m_new[32:]) == 0
    assert torch.count_nonzero(m_new[:, 40:]) == 0
    v_old = s_old["norm.weight"]["exp_avg_sq"]
    torch.testing.assert_close(s_new["norm.weight"]["exp_avg_sq"][:32], v_old / c**2)
    torch.testing.assert_close(s_new["norm.weight"]["exp_avg"][:32], s_old["norm.weight"]["exp_avg"] / c)


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


def test_width_ratio_limits():
    st = trained_state(tiny_run(), steps=1)
    with pytest.raises(ValueError, match="integer multiple of the resid width"):
        grow(st, GrowPlan("none", target_dim=48))  # 4 -> 6 heads: direct needs an integer ratio
    g = grow(st, GrowPlan("none", width="zero", target_dim=48))  # zero (and random) allow it
    assert (g.model.cfg.dim, g.model.cfg.n_heads, g.model.cfg.n_kv_heads) == (48, 6, 3)


# --- in a run: the loss at growth, and rank 20 steps later ----------------------------------------------


@pytest.fixture(scope="module")
def stream(tmp_path_factory):
    return write_token_stream(tmp_path_factory.mktemp("tokens"))


def _sections(model):
    """Every grown weight, packed sections apart (q, k, v; gate, up)."""
    c = model.cfg
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    out = {}
    for n, p in model.named_parameters():
        if p.dim() < 2:
            continue
        if n.endswith("wqkv.weight"):
            out.update({f"{n}[q]": p[:q], f"{n}[k]": p[q : q + kv], f"{n}[v]": p[q + kv :]})
        elif n.endswith("w13.weight"):
            out.update({f"{n}[gate]": p[: c.ffn_dim], f"{n}[up]": p[c.ffn_dim :]})
        else:
            out[n] = p
    return out


@pytest.mark.parametrize("width_op, ffn", [("direct", 36), ("zero", 40)])
def test_width_growth_in_a_run_keeps_the_loss_and_trains_to_full_rank(stream, tmp_path, width_op, ffn):
    """dim 16 -> 32 (2 -> 4 heads, 1 -> 2 kv heads), ffn 24 -> 36/40 at step 4, then 20 AdamW steps: the
    validation loss right after growth equals the one right before (< 1e-4, fp32), and every grown
    matrix has full rank (fp32 tolerance) along its grown axes. With an even split (or zero's new
    entries left at zero) the copies / new units never train and the rank stays at the old width."""
    from fastgrow.train import train

    growth = GrowthConfig(at_tokens=4 * 64, op="width", target_dim=32, target_ffn_dim=ffn, width_op=width_op)
    cfg = stream_run(
        stream,
        tmp_path / "run",
        (growth,),
        model={"dim": 16, "n_heads": 2, "n_kv_heads": 1, "ffn_dim": 24},
        data={"batch_size": 4},
        train={"max_steps": 24, "seed": 0, "log_every": 8, "eval_batches": 2},
    )
    res = train(cfg, echo=False)
    (rec,) = [r for r in res.records if r["kind"] == "growth"]
    assert rec["step"] == 4 and math.isfinite(rec["val_loss_before"])
    assert abs(rec["val_loss_after"] - rec["val_loss_before"]) < 1e-4
    model = res.state.model
    assert (model.cfg.dim, model.cfg.ffn_dim) == (32, ffn)
    for n, w in _sections(model).items():
        rank = torch.linalg.matrix_rank(w.detach()).item()
        assert rank == min(w.shape), f"{n}: rank {rank} of {min(w.shape)}"
