"""Planner: Eq. 10 of Du et al. 2024 against values worked out by hand, FLOPs split, base configs."""

from __future__ import annotations

import argparse
import dataclasses
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


# --- Staged Training's multi-stage planner -------------------------------------------------------------------


def _numeric_efficiency(law, n, loss):
    """-dL/dC along n's training curve at `loss`, by a central difference of L(n, D) at the D that reaches
    it (D found by bisection on L itself): independent of the closed forms in plan_stages."""
    lo, hi = 1.0, 1e30
    for _ in range(300):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if law.loss(n, mid) > loss else (lo, mid)
    d, h = math.sqrt(lo * hi), 1e-4
    return -(law.loss(n, d * (1 + h)) - law.loss(n, d * (1 - h))) / (6 * n * 2 * h * d)


def test_staged_growth_point_equalises_loss_per_flop():
    from fastgrow.plan_stages import ScalingLaw

    law = ScalingLaw()
    for n1, n2 in [(7.7e7, 1.54e8), (3e8, 1.2e9), (1e6, 2e6)]:
        l_star = law.crossover(n1, n2)
        e1, e2 = _numeric_efficiency(law, n1, l_star), _numeric_efficiency(law, n2, l_star)
        assert e1 == pytest.approx(e2, rel=1e-5)
        # Above the crossover (earlier in training) the small model is the more efficient, below it the large.
        assert _numeric_efficiency(law, n1, l_star * 1.05) > _numeric_efficiency(law, n2, l_star * 1.05)
        assert _numeric_efficiency(law, n1, l_star * 0.999) < _numeric_efficiency(law, n2, l_star * 0.999)


def test_staged_plan_for_410m():
    from fastgrow.plan_stages import ScalingLaw, plan_stages

    law, tps = ScalingLaw(), 524288
    target = MODEL_PRESETS["410M"]
    plan = plan_stages(target, 100 * 10**9, stages=2, grow="depth", tokens_per_step=tps, rewarm_steps=200)
    assert [s.model.n_layers for s in plan.stages] == [6, 12, 24] and plan.dropped == 0
    assert plan.stages[0].model == dataclasses.replace(target, n_layers=6)
    n = [s.params for s in plan.stages]
    assert n == [dataclasses.replace(target, n_layers=k).num_params(include_embeddings=False) for k in (6, 12, 24)]
    ats = [g["at_tokens"] for g in plan.growths]
    assert ats == sorted(ats) and all(a % tps == 0 for a in ats)
    assert sum(s.tokens for s in plan.stages) == plan.budget_tokens
    eff = 0.0
    for k, (st, g) in enumerate(zip(plan.stages, plan.growths)):
        # Grown where the efficiencies cross (to within the rounding to a whole step) ...
        assert st.loss_end == pytest.approx(law.crossover(n[k], n[k + 1]), abs=2e-3)
        # ... the next phase starts at that loss (growth preserves it) ...
        assert plan.stages[k + 1].loss_start == st.loss_end
        # ... and the schedule jumps to where a from-scratch run of the grown model is at that loss.
        d_next = law.d_c * (st.loss_end - (law.n_c / n[k + 1]) ** law.alpha_n) ** (-1 / law.alpha_d)
        assert g["jump_to_step"] == round(d_next / tps) and g["schedule"] == "jump" and g["rewarm_steps"] == 200
        assert st.loss_end == pytest.approx(law.loss(n[k], eff + st.tokens), rel=1e-12)
        eff = d_next
    assert plan.flops == pytest.approx(sum(6 * s.params * s.tokens for s in plan.stages), rel=1e-9)
    assert plan.flops < plan.scratch_flops  # the staged run reaches the final loss for less compute


def test_plan_stages_command_prints_a_config_that_loads(tmp_path, capsys):
    from fastgrow.config_files import load_toml
    from fastgrow.grow_cli import add_growth_commands
    from fastgrow.stages import check_stages

    p = argparse.ArgumentParser(prog="fastgrow")
    add_growth_commands(p.add_subparsers(dest="command", required=True))
    for grow in ("depth", "width", "alternate"):
        args = p.parse_args(["plan", "--preset", "410M", "--tokens", "100B", "--stages", "2", "--grow", grow])
        assert args.func(args, []) == 0
        out = capsys.readouterr().out
        toml_text = out[out.index("[model]") :]
        f = tmp_path / f"{grow}.toml"
        f.write_text(toml_text + "\n[data]\nseq_len = 2048\nbatch_size = 256\n[train]\nmax_steps = 190735\n")
        cfg = load_toml(f)
        assert len(cfg.growth) == 2 and all(g.schedule == "jump" for g in cfg.growth)
        # The chain is valid stage after stage, reachable in the run, and ends at the 410M target.
        check_stages(cfg, cfg.model)
        from fastgrow.stages import stage_targets

        assert stage_targets(cfg)[-1].architecture() == MODEL_PRESETS["410M"].architecture()
    args = p.parse_args(["plan", "--params", "13B", "--tokens", "300B", "--stages", "2"])
    with pytest.raises(ValueError, match="needs the target's architecture"):
        args.func(args, [])
    args = p.parse_args(["plan", "--params", "13B", "--tokens", "300B"])
    assert args.func(args, []) == 0
    assert "no preset within 1.25x" in capsys.readouterr().out
