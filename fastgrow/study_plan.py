"""A growth study's plan: every variant's run config, its growth timings, and equal-FLOPs budgets.

Growth timing ("timing", per variant or per stage): "planner" (Eq. 10 via
`fastgrow.plan.auto_growth_tokens` for the target at the scratch run's token budget D, clamped to D/2
as the trainer's "auto" does), "planner*X" / "planner/X", "XD" (a fraction X of D), "XR" (a fraction X
of the run's own steps, one-growth variants only: the run grows later in absolute terms, since its
small phase costs less), or a token count. It is rounded up to whole steps.

Equal FLOPs: the scratch run's budget B = max_steps * tokens_per_step * f_target; a grown run trains
each phase at its own model's FLOPs per token f (`fastgrow.model.flops_per_token`, with attention) and
as many final-phase steps as bring its total closest to B. A G_learn growth's learn steps are a phase
of their own, right after its growth step, at `learn_flops_per_step` (the grown model's step plus the
maps' expansion, fastgrow.grow_learn).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastgrow.config import ConfigError, GrowthConfig, RunConfig
from fastgrow.study_config import BASE, DEPTH_GROWTH_OPS, SCRATCH, TARGET, StudyConfig, Variant, parse_timing


def planner_tokens(study: StudyConfig) -> int:
    """Eq. 10 growth tokens for the target at the scratch run's token budget, clamped to half of it."""
    from fastgrow.plan import auto_growth_tokens

    return auto_growth_tokens(study.target, target=study.target.model)


def resolve_timing(
    timing: str | int,
    *,
    planner: int,
    budget_tokens: int,
    tokens_per_step: int,
    name: str = "?",
    flops_ratio: float | None = None,
) -> int:
    """Growth token count for a timing spec, rounded up to whole steps (the trainer grows at a step).

    "XR" (grow after a fraction x of the run's own steps) needs flops_ratio = f_small / f_target: with
    S the scratch run's steps, a run that grows after k steps has k + S - k * flops_ratio steps in all
    (equal FLOPs), so k = x S / (1 - x + x * flops_ratio)."""
    kind, x = parse_timing(timing, f"variant {name}")
    if kind == "run":
        if flops_ratio is None:
            raise ConfigError(f"variant {name}: timing {timing!r} needs the run's phases (one-growth variants only)")
        scratch_steps = budget_tokens / tokens_per_step
        raw = tokens_per_step * x * scratch_steps / (1.0 - x + x * flops_ratio)
    else:
        raw = planner * x if kind == "planner" else budget_tokens * x if kind == "fraction" else x
    steps = max(1, math.ceil(raw / tokens_per_step - 1e-9))
    return steps * tokens_per_step


def equal_flops_steps(
    budget_flops: float, flops_small: float, flops_large: float, growth_steps: int, tokens_per_step: int
) -> int:
    """Total steps of a grown run (growth_steps at flops_small per token, the rest at flops_large) whose
    training FLOPs come closest to budget_flops. ValueError when the small phase alone uses it up."""
    return equal_flops_steps_phases(budget_flops, [(growth_steps, flops_small)], flops_large, tokens_per_step)


def equal_flops_steps_phases(
    budget_flops: float, phases: list[tuple[int, float]], flops_final: float, tokens_per_step: int
) -> int:
    """Total steps of a run whose phases [(steps, FLOPs per token), ...] come before a final phase at
    flops_final per token, with training FLOPs closest to budget_flops. ValueError when the phases
    before the last use it up."""
    if budget_flops <= 0 or flops_final <= 0 or tokens_per_step <= 0 or not phases:
        raise ValueError("budget, FLOPs per token, tokens per step and phases must be positive")
    if any(steps < 1 or f <= 0 for steps, f in phases):
        raise ValueError("every phase needs >= 1 step and positive FLOPs per token")
    early = sum(steps * tokens_per_step * f for steps, f in phases)
    large_steps = round((budget_flops - early) / (tokens_per_step * flops_final))
    if large_steps < 1:
        raise ValueError(
            f"growing after {sum(s for s, _ in phases)} steps leaves no FLOPs for the grown model (the phases "
            f"before it cost {early:.4g} of the {budget_flops:.4g} budget); grow earlier"
        )
    return sum(s for s, _ in phases) + large_steps


@dataclass(frozen=True)
class PlannedRun:
    variant: Variant
    config: RunConfig
    run_dir: Path
    growth_tokens: int  # of the first growth; 0 for runs that do not grow
    growth_step: int
    max_steps: int
    planned_flops: float
    budget_flops: float
    growth_steps: tuple[int, ...] = ()  # every growth's step

    def record(self) -> dict[str, Any]:
        return {
            "variant": self.variant.name,
            "op": self.variant.op,
            "timing": self.variant.timing if self.variant.op in DEPTH_GROWTH_OPS else None,
            "growth_tokens": self.growth_tokens,
            "growth_step": self.growth_step,
            "growth_steps": list(self.growth_steps),
            "max_steps": self.max_steps,
            "tokens": self.max_steps * self.config.tokens_per_step,
            "planned_flops": self.planned_flops,
            "budget_flops": self.budget_flops,
            "config": self.config.to_dict(),
        }


def _train_overrides(v: Variant, train: Any, run_dir: Path, steps: int) -> Any:
    kw: dict[str, Any] = {"max_steps": steps, "out_dir": str(run_dir)}
    if v.lr_schedule:
        kw["schedule"] = v.lr_schedule
    if v.decay_fraction is not None:
        kw["decay_fraction"] = v.decay_fraction
    return dataclasses.replace(train, **kw)


def _stage_fields(study: StudyConfig, fields: dict[str, Any], one_growth: bool) -> dict[str, Any]:
    """A growth's GrowthConfig fields: rewarm_steps 0 means the run's warmup; a one-growth variant grows
    into the target's depth (target_layers; a spec must give it)."""
    out = dict(fields)
    if out.get("schedule") == "rewarm" and not out.get("rewarm_steps"):
        out["rewarm_steps"] = study.target.train.warmup_steps
    if one_growth:
        out.setdefault("target_layers", study.target.model.n_layers)
    return out


def plan_study(study: StudyConfig, out_dir: str | Path) -> list[PlannedRun]:
    """Every run's RunConfig: scratch first, then the variants in file order (validates everything)."""
    from fastgrow.grow_learn import learn_flops_per_step
    from fastgrow.model import flops_per_token
    from fastgrow.stages import learn_steps, stage_targets

    out = Path(out_dir)
    t = study.target
    tps = study.tokens_per_step
    seq = t.data.seq_len
    f_target = flops_per_token(t.model, seq, include_attention=True)
    budget = t.train.max_steps * tps * f_target
    planner = planner_tokens(study)
    order = sorted(study.variants, key=lambda v: v.op != SCRATCH)
    runs = []
    for v in order:
        run_dir = out / v.name
        if v.op == SCRATCH:
            cfg = dataclasses.replace(t, train=dataclasses.replace(t.train, out_dir=str(run_dir)))
            runs.append(PlannedRun(v, cfg, run_dir, 0, 0, t.train.max_steps, budget, budget))
            continue
        if v.op == TARGET:
            cfg = dataclasses.replace(t, train=_train_overrides(v, t.train, run_dir, t.train.max_steps))
            runs.append(PlannedRun(v, cfg, run_dir, 0, 0, t.train.max_steps, budget, budget))
            continue
        base = study.base_for(v.base_layers)
        f_base = flops_per_token(base, seq, include_attention=True)
        if v.op == BASE:
            steps = max(1, round(budget / (tps * f_base)))
            cfg = RunConfig(model=base, data=t.data, train=_train_overrides(v, t.train, run_dir, steps))
            runs.append(PlannedRun(v, cfg, run_dir, 0, 0, steps, steps * tps * f_base, budget))
            continue
        growths = v.growths()
        fields = [_stage_fields(study, f, len(growths) == 1) for _, f in growths]
        try:
            # The model after each growth (each resolved against the previous), so every phase is
            # counted at its own size.
            chain = stage_targets(
                RunConfig(model=base, growth=tuple(GrowthConfig(at_tokens=i + 1, **f) for i, f in enumerate(fields)))
            )
        except ConfigError as e:
            raise ConfigError(f"variant {v.name}: {e}") from None
        if chain[-1].architecture() != t.model.architecture():
            raise ConfigError(
                f"variant {v.name}: grows the {base.n_layers}-layer base into {chain[-1].n_layers} layers x dim "
                f"{chain[-1].dim}, not the target's {t.model.n_layers} x {t.model.dim} (check its spec / stages)"
            )
        f_phase = [f_base] + [flops_per_token(m, seq, include_attention=True) for m in chain]
        ats = [
            resolve_timing(
                timing,
                planner=planner,
                budget_tokens=study.budget_tokens,
                tokens_per_step=tps,
                name=v.name,
                flops_ratio=f_base / f_target if len(growths) == 1 else None,
            )
            for timing, _ in growths
        ]
        if any(b <= a for a, b in zip(ats, ats[1:])):
            raise ConfigError(f"variant {v.name}: its stages' timings must grow strictly, got tokens {ats}")
        ks = [a // tps for a in ats]
        # Phases before the final one: each model from its growth step (after its learn steps, for G_learn)
        # to the next growth, and G_learn's learn steps at their own cost per token.
        phases, done = [], 0
        for i, (k, f) in enumerate(zip(ks, f_phase)):
            phases.append((k - done, f))
            done = k
            n_learn = learn_steps(GrowthConfig(at_tokens=1, **fields[i]))
            if n_learn:
                learn_step = learn_flops_per_step([base, *chain][i], chain[i], seq, tps)
                phases.append((n_learn, learn_step / tps))
                done += n_learn
        try:
            steps = equal_flops_steps_phases(budget, phases, f_phase[-1], tps)
        except ValueError as e:
            raise ConfigError(f"variant {v.name} (growth at {ats[-1]:,} tokens): {e}") from None
        cfg = RunConfig(
            model=base,
            data=t.data,
            train=_train_overrides(v, t.train, run_dir, steps),
            growth=tuple(GrowthConfig(at_tokens=a, **f) for a, f in zip(ats, fields)),
        )
        flops = sum(n * tps * f for n, f in phases) + (steps - done) * tps * f_phase[-1]
        runs.append(PlannedRun(v, cfg, run_dir, ats[0], ks[0], steps, flops, budget, tuple(ks)))
    return runs
