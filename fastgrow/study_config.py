"""A growth study's configuration and plan: its variants, their timings, and equal-FLOPs budgets.

See fastgrow/study.py for the method. A variant is one run: `scratch` (the target from scratch, the
reference), `target` (the target from scratch with the variant's own schedule, e.g. WSD), `base` (the
base model alone for the whole budget, a control), a growth op (stack, interpolate, partial, sources,
zero, random, learn: one growth of the base into the target), or `stages` (several growths, given as
`[[variant.stage]]` tables). Each growth's schedule policy and per-phase settings are the run config's
(fastgrow.growth_config), so a variant can be, e.g., prts's exact recipe (fresh AdamW, new peak LR,
warmup and cosine for the grown model) or Bu et al.'s 1-layer base grown late under WSD.

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
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastgrow.config import SCHEDULES, ConfigError, GrowthConfig, ModelConfig, RunConfig, parse_count, preset
from fastgrow.config_files import read_toml, set_keys

SCRATCH = "scratch"
TARGET = "target"  # the target from scratch with the variant's own schedule (not the reference)
BASE = "base"  # a control: the base model trained alone for the whole budget, never grown
STAGES = "stages"  # several growths, from [[variant.stage]] tables
GROWTH_OPS = ("stack", "interpolate", "partial", "sources", "zero", "random", "learn")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# Growth fields a variant (or a stage) passes to its GrowthConfig, besides op.
_GROWTH_KEYS = (
    "spec",
    "noise",
    "optimizer",
    "schedule",
    "rewarm_steps",
    "lr",
    "min_lr",
    "warmup_steps",
    "horizon_steps",
    "jump_to_step",
    "learn_steps",
    "learn_lr",
)
_STAGE_KEYS = {f.name for f in dataclasses.fields(GrowthConfig)} - {"at_tokens"} | {"timing"}


@dataclass(frozen=True)
class Variant:
    """One run of a study (module doc). timing and the growth fields (spec ... learn_lr, as in
    [growth]) describe a one-growth variant; `stage` the growths of op "stages" (each a table of timing
    and [growth] fields). rewarm_steps 0 with schedule "rewarm": the run's train.warmup_steps.
    base_layers: the base's depth (default: target layers / study factor); 0 and 1 are allowed (Bu et
    al. 2025). lr_schedule / decay_fraction: the run's train.schedule / decay_fraction (default the
    study's), for every variant but scratch."""

    name: str
    op: str = "stack"
    timing: str | int = "planner"
    spec: str = ""
    noise: float = 0.0
    optimizer: str = "copy"
    schedule: str = "continue"
    rewarm_steps: int = 0
    lr: float | None = None
    min_lr: float | None = None
    warmup_steps: int | None = None
    horizon_steps: int | None = None
    jump_to_step: int | None = None
    learn_steps: int | None = None  # op learn: the operator's training steps (None: G_learn's default)
    learn_lr: float | None = None  # op learn: its LR (None: G_learn's default)
    base_layers: int | None = None
    lr_schedule: str = ""
    decay_fraction: float | None = None
    stage: tuple[dict[str, Any], ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ConfigError(f"variant name {self.name!r} must be letters, digits, '_', '.', '+' or '-'")
        ops = (SCRATCH, TARGET, BASE, STAGES, *GROWTH_OPS)
        if self.op not in ops:
            raise ConfigError(f"variant {self.name}: op must be one of {ops}, got {self.op!r}")
        if (self.name == SCRATCH) != (self.op == SCRATCH):
            raise ConfigError(f"variant {self.name}: the name {SCRATCH!r} is reserved for op {SCRATCH!r} and back")
        object.__setattr__(self, "stage", tuple(self.stage))
        defaults = {f.name: f.default for f in dataclasses.fields(self)}
        unused = []
        if self.op != STAGES:
            unused.append("stage")
        if not self.grows or self.op == STAGES:
            unused += ["timing", *_GROWTH_KEYS]
        if self.op in (SCRATCH, TARGET):
            unused.append("base_layers")
        if self.op == SCRATCH:
            unused += ["lr_schedule", "decay_fraction"]
        for key in unused:
            if getattr(self, key) != defaults[key]:
                raise ConfigError(f"variant {self.name}: {key} is not used by op {self.op!r}")
        if self.op in ("partial", "sources") and not self.spec:
            raise ConfigError(f"variant {self.name}: op {self.op!r} needs a spec (e.g. '1-2*3')")
        if self.base_layers is not None and (
            isinstance(self.base_layers, bool) or not isinstance(self.base_layers, int) or self.base_layers < 0
        ):
            raise ConfigError(f"variant {self.name}: base_layers must be a non-negative integer")
        if self.lr_schedule not in ("", *SCHEDULES):
            raise ConfigError(f"variant {self.name}: lr_schedule must be one of {SCHEDULES}, got {self.lr_schedule!r}")
        if self.decay_fraction is not None and not 0 < self.decay_fraction <= 1:
            raise ConfigError(f"variant {self.name}: decay_fraction must be in (0, 1]")
        if self.op == STAGES and not self.stage:
            raise ConfigError(f"variant {self.name}: op 'stages' needs [[variant.stage]] tables")
        for i, (timing, fields) in enumerate(self.growths()):
            where = f"variant {self.name}" + (f" stage {i}" if self.op == STAGES else "")
            try:
                # The growth fields are validated where they live, with the variant named.
                GrowthConfig(at_tokens=1, **_growth_check_fields(fields))
            except ConfigError as e:
                raise ConfigError(f"{where}: {e}") from None
            kind, _ = _parse_timing(timing, where)
            if kind == "run" and self.op == STAGES:
                raise ConfigError(f"{where}: timing 'XR' (a fraction of the run) is for one-growth variants")

    @property
    def grows(self) -> bool:
        return self.op in GROWTH_OPS or self.op == STAGES

    def growths(self) -> list[tuple[str | int, dict[str, Any]]]:
        """[(timing, growth fields without at_tokens)] for each growth of the variant."""
        if self.op == STAGES:
            out = []
            for i, st in enumerate(self.stage):
                _check_table(st, _STAGE_KEYS, f"variant {self.name} stage {i}")
                if "timing" not in st:
                    raise ConfigError(f"variant {self.name} stage {i}: needs a timing")
                out.append((st["timing"], {k: v for k, v in st.items() if k != "timing"}))
            return out
        if self.op not in GROWTH_OPS:
            return []
        fields = {"op": self.op, **{k: getattr(self, k) for k in _GROWTH_KEYS}}
        defaults = {f.name: f.default for f in dataclasses.fields(GrowthConfig)}
        return [(self.timing, {k: v for k, v in fields.items() if v != defaults.get(k)} | {"op": self.op})]


def _check_table(table: Any, known: set[str], where: str) -> None:
    if not isinstance(table, dict):
        raise ConfigError(f"{where} must be a table")
    bad = set(table) - known
    if bad:
        raise ConfigError(f"{where}: unknown key(s) {sorted(bad)} (known: {sorted(known)})")


def _growth_check_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """Fields for validating a growth before its timing is known (rewarm_steps 0 = the run's warmup)."""
    out = dict(fields)
    if out.get("schedule") == "rewarm" and not out.get("rewarm_steps"):
        out["rewarm_steps"] = 1
    return out


@dataclass(frozen=True)
class StudyConfig:
    """target: the scratch run (its model is the target, its train.max_steps sets the FLOPs budget)."""

    target: RunConfig
    variants: tuple[Variant, ...]
    factor: int = 4
    name: str = "study"
    prepare: dict[str, Any] | None = None  # how to make data.data_dir when it is missing
    # False: delete a run's checkpoints once it has finished (its marker and metrics are all a study
    # needs; a ~100M-parameter run's checkpoints are GBs and a study has a dozen runs).
    keep_checkpoints: bool = True

    def __post_init__(self) -> None:
        if isinstance(self.factor, bool) or not isinstance(self.factor, int) or self.factor < 2:
            raise ConfigError(f"study.factor must be an integer >= 2, got {self.factor!r}")
        if self.target.model.n_layers % self.factor:
            raise ConfigError(
                f"target layers ({self.target.model.n_layers}) are not divisible by study.factor ({self.factor})"
            )
        if self.target.growth:
            raise ConfigError("the study's [growth] section must be empty: growth is set per [[variant]]")
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ConfigError(f"study.name {self.name!r} must be letters, digits, '_', '.', '+' or '-'")
        names = [v.name for v in self.variants]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ConfigError(f"duplicate variant name(s): {dup}")
        if SCRATCH not in names:
            raise ConfigError(f"a study needs the {SCRATCH!r} variant (op = {SCRATCH!r}) to compare against")

    @property
    def base(self) -> ModelConfig:
        """The default base of the grown variants: the target's widths, target layers / factor."""
        return self.base_for(None)

    def base_for(self, base_layers: int | None) -> ModelConfig:
        t = self.target.model
        return dataclasses.replace(t, n_layers=t.n_layers // self.factor if base_layers is None else base_layers)

    @property
    def tokens_per_step(self) -> int:
        return self.target.tokens_per_step

    @property
    def budget_tokens(self) -> int:
        return self.target.train.max_steps * self.tokens_per_step


_VARIANT_KEYS = {f.name for f in dataclasses.fields(Variant)}
_STUDY_KEYS = {"name", "factor", "prepare", "keep_checkpoints"}


def load_study(path: str | Path) -> StudyConfig:
    """Read a study TOML: `[study]` (name, factor, optional `[study.prepare]` source/vocab_size/max_bytes),
    the target run's `[model]`, `[data]`, `[train]` (and optional top-level `preset`), and `[[variant]]`
    tables (Variant's fields; `[[variant.stage]]` tables for op "stages")."""
    p = Path(path)
    raw = read_toml(p, "study config")
    study = raw.pop("study", {})
    variants = raw.pop("variant", [])
    if not isinstance(study, dict):
        raise ConfigError(f"{p}: [study] must be a table")
    unknown = set(study) - _STUDY_KEYS
    if unknown:
        raise ConfigError(f"{p}: unknown key(s) in [study]: {sorted(unknown)} (known: {sorted(_STUDY_KEYS)})")
    if not isinstance(variants, list) or not variants:
        raise ConfigError(f"{p}: the study needs [[variant]] tables (at least name = 'scratch', op = 'scratch')")
    start = preset(str(raw.pop("preset"))) if "preset" in raw else RunConfig()
    d = start.to_dict()
    for section, values in raw.items():
        if section not in d or section == "growth" or not isinstance(values, dict):
            raise ConfigError(
                f"{p}: unknown or malformed section [{section}] (known: study, variant, model, data, train)"
            )
        set_keys(p, d, section, values)
    target = RunConfig.from_dict(d)
    parsed = []
    for i, v in enumerate(variants):
        _check_table(v, _VARIANT_KEYS, f"{p}: [[variant]] #{i + 1}")
        if "name" not in v:
            raise ConfigError(f"{p}: [[variant]] #{i + 1} has no name")
        parsed.append(Variant(**v))
    prep = study.get("prepare")
    if prep is not None and not (isinstance(prep, dict) and "source" in prep):
        raise ConfigError(f"{p}: [study.prepare] must be a table with at least `source`")
    return StudyConfig(
        target=target,
        variants=tuple(parsed),
        factor=study.get("factor", 4),
        name=str(study.get("name", p.stem)),
        prepare=prep,
        keep_checkpoints=_bool(study.get("keep_checkpoints", True), f"{p}: study.keep_checkpoints"),
    )


def _bool(v: Any, name: str) -> bool:
    if not isinstance(v, bool):
        raise ConfigError(f"{name} must be true or false, got {v!r}")
    return v


# --- timing and equal-FLOPs budgets ------------------------------------------------------------------


def _parse_timing(timing: str | int, name: str) -> tuple[str, float]:
    """("planner", multiplier) | ("fraction", x) | ("run", x) | ("tokens", n); ConfigError naming `name`."""
    if isinstance(timing, bool):
        raise ConfigError(f"{name}: timing must be a string or a token count, got {timing!r}")
    if isinstance(timing, (int, float)):
        if timing <= 0:
            raise ConfigError(f"{name}: timing must be > 0 tokens, got {timing!r}")
        return "tokens", float(timing)
    s = str(timing).strip().replace(" ", "")
    m = re.fullmatch(r"planner(?:([*/])([0-9.eE+-]+))?", s)
    try:
        if m:
            x = float(m.group(2)) if m.group(2) else 1.0
            mult = x if m.group(1) != "/" else 1.0 / x
            if not (mult > 0 and math.isfinite(mult)):
                raise ValueError
            return "planner", mult
        if s.endswith(("D", "d", "R", "r")):
            x = float(s[:-1])
            if not 0 < x < (1 if s[-1] in "Rr" else math.inf):
                raise ValueError
            return ("run" if s[-1] in "Rr" else "fraction"), x
        n = parse_count(s)
        if n <= 0:
            raise ValueError
        return "tokens", float(n)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(
            f"{name}: cannot read timing {timing!r} (use 'planner', 'planner*2', 'planner/2', '0.1D' = a fraction "
            "of the scratch token budget, '0.8R' = a fraction of the run's own steps, or a token count such as '2M')"
        ) from None


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
    kind, x = _parse_timing(timing, f"variant {name}")
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
            "timing": self.variant.timing if self.variant.op in GROWTH_OPS else None,
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
