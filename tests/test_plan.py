"""Planner: Eq. 10 of Du et al. 2024 against values worked out by hand, FLOPs split, base configs."""

from __future__ import annotations

import json
import math

import pytest

from fastgrow.config import MODEL_PRESETS, preset
from fastgrow.plan import auto_growth_tokens, base_config, growth_tokens, plan_growth


def test_eq10_by_hand_7b_300b():
    # N = 7e9, D = 3e11: C = 6 * 7e9 * 3e11 = 1.26e22, log10(C) = 22.10037.
    # 0.88 * log10(7e9) = 0.88 * 9.845098 = 8.663686;  163.27 / 22.10037 = 7.387659.
    # log10(d) = 8.663686 + 7.387659 - 5.74 = 10.311345  ->  d = 2.0481e10 (~20.5B tokens, 6.8% of D).
    d = growth_tokens(7e9, 1.26e22)
    assert d == pytest.approx(2.0481e10, rel=2e-4)


def test_eq10_by_hand_410m_100b():
    # N = 4.1e8, D = 1e11: C = 2.46e20, log10(C) = 20.390935; 163.27 / 20.390935 = 8.006990;
    # 0.88 * log10(4.1e8) = 0.88 * 8.612784 = 7.579250; log10(d) = 9.846240 -> d = 7.0184e9 tokens.
    assert growth_tokens(4.1e8, 2.46e20) == pytest.approx(7.0184e9, rel=2e-4)


def test_eq10_monotone_and_errors():
    # More compute for the same N: the 163.27/log10(C) term shrinks, so d falls slowly with C.
    assert growth_tokens(7e9, 1e23) < growth_tokens(7e9, 1e22)
    # Bigger target at equal compute: grow later.
    assert growth_tokens(7e9, 1e22) > growth_tokens(1e9, 1e22)
    for n, c in [(0, 1e20), (1e9, 5), (float("nan"), 1e20), (1e9, float("inf"))]:
        with pytest.raises(ValueError):
            growth_tokens(n, c)


def test_plan_410m_preset():
    p = plan_growth(None, "300B", factor=4, preset="410M")
    target = MODEL_PRESETS["410M"]
    base = MODEL_PRESETS["410M-base"]
    assert p.params == target.num_params()
    assert (p.base_layers, p.target_layers) == (6, 24)
    assert p.base_model == base.architecture()
    assert p.params_small == base.num_params() and p.params_small_exact
    # g is counted on non-embedding params: per-layer params are exactly g times fewer (the final norm
    # is the only non-embedding tensor outside the layers).
    assert p.params_non_embedding - target.dim == 4 * (p.params_small_non_embedding - target.dim)
    assert p.tokens == 300 * 10**9
    assert p.flops == pytest.approx(6 * p.params * p.tokens)
    assert p.growth_tokens == round(growth_tokens(p.params, p.flops))
    assert p.flops_small == pytest.approx(6 * p.params_small * p.growth_tokens)
    assert p.flops_large == pytest.approx(6 * p.params * (p.tokens - p.growth_tokens))
    assert p.flops_scratch - p.flops_grown_total == pytest.approx(6 * (p.params - p.params_small) * p.growth_tokens)
    assert p.in_fit_range
    d = p.to_dict()
    for key in ("growth_tokens", "factor", "base_layers", "target_layers", "flops_small", "flops_large"):
        assert key in d
    json.dumps(d)


def test_plan_parses_counts_and_matches_paper_targets():
    p = plan_growth("1.1B", "2e12")
    assert p.params == 1_100_000_000 and p.tokens == 2 * 10**12
    assert p.preset == "1.1B" and p.base_layers == 6 and not p.params_small_exact
    # params_small from N: embeddings kept, non-embedding part / g.
    emb = MODEL_PRESETS["1.1B"].num_params() - MODEL_PRESETS["1.1B"].num_params(include_embeddings=False)
    assert p.params_small == round(emb + (1.1e9 - emb) / 4)
    p = plan_growth("7B", "300B")
    assert p.preset == "7B" and (p.base_layers, p.target_layers) == (8, 32)
    assert p.growth_tokens == pytest.approx(2.0481e10, rel=2e-4)
    # No paper target within 2x: architecture unknown, base estimated as N / g.
    p = plan_growth("100B", "2T", factor=2)
    assert p.preset is None and p.base_layers is None and p.params_small == 50 * 10**9
    p = plan_growth("100B", "2T", factor=2, layers=80)
    assert (p.base_layers, p.target_layers) == (40, 80)


def test_plan_errors():
    with pytest.raises(ValueError, match="divisible"):
        plan_growth(None, "300B", factor=5, preset="410M")
    with pytest.raises(ValueError, match="factor"):
        plan_growth("410M", "300B", factor=0)
    with pytest.raises(ValueError, match="cannot parse"):
        plan_growth("410X", "300B")
    with pytest.raises(ValueError, match="token budget"):
        plan_growth("410M", 0)
    with pytest.raises(ValueError, match="unknown preset"):
        plan_growth(None, "1B", preset="13B")
    with pytest.raises(ValueError, match="divisible"):
        base_config(MODEL_PRESETS["3B"], 3)


def test_tiny_runs_are_outside_the_fit_and_get_clamped():
    p = plan_growth(None, "400K", preset="tiny", factor=4)
    assert not p.in_fit_range
    assert p.growth_tokens_raw > p.tokens  # Eq. 10 extrapolated far beyond the budget
    # Clamped to half the budget, the same clamp as the trainer's at_tokens = "auto" (they used to
    # differ: the planner printed d = D, a large phase of 0 FLOPs).
    assert p.growth_tokens == p.tokens // 2
    run = preset("tiny-base")
    budget = run.train.max_steps * run.data.batch_size * run.data.seq_len
    assert auto_growth_tokens(run, MODEL_PRESETS["tiny"]) == budget // 2
    assert plan_growth(None, budget, preset="tiny").growth_tokens == budget // 2
    assert auto_growth_tokens(run, MODEL_PRESETS["tiny"], max_fraction=0.25) == budget // 4
    assert math.isfinite(p.flops_small)
