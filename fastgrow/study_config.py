"""A growth study's configuration: its variants, read from a study TOML and validated.

See fastgrow/study.py for the method. A variant is one run: `scratch` (the target from scratch, the
reference), `target` (the target from scratch with the variant's own schedule, e.g. WSD), `base` (the
base model alone for the whole budget, a control), a growth op (stack, interpolate, partial, sources,
zero, random, learn: one growth of the base into the target), or `stages` (several growths, given as
`[[variant.stage]]` tables). Each growth's schedule policy and per-phase settings are the run config's
(fastgrow.growth_config), so a variant can be, e.g., prts's exact recipe (fresh AdamW, new peak LR,
warmup and cosine for the grown model) or Bu et al.'s 1-layer base grown late under WSD. Timings
(`parse_timing`) and equal-FLOPs budgets are planned in fastgrow.study_plan.
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastgrow.config import (
    GROWTH_OPS,
    SCHEDULES,
    ConfigError,
    GrowthConfig,
    ModelConfig,
    RunConfig,
    parse_count,
    preset,
)
from fastgrow.config_files import read_toml, set_keys

SCRATCH = "scratch"
TARGET = "target"  # the target from scratch with the variant's own schedule (not the reference)
BASE = "base"  # a control: the base model trained alone for the whole budget, never grown
STAGES = "stages"  # several growths, from [[variant.stage]] tables
# The growth ops a variant may run: every growth.op but width (the study grows depth).
DEPTH_GROWTH_OPS = tuple(op for op in GROWTH_OPS if op != "width")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
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
        ops = (SCRATCH, TARGET, BASE, STAGES, *DEPTH_GROWTH_OPS)
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
            kind, _ = parse_timing(timing, where)
            if kind == "run" and self.op == STAGES:
                raise ConfigError(f"{where}: timing 'XR' (a fraction of the run) is for one-growth variants")

    @property
    def grows(self) -> bool:
        return self.op in DEPTH_GROWTH_OPS or self.op == STAGES

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
        if self.op not in DEPTH_GROWTH_OPS:
            return []
        fields = {"op": self.op, **{k: getattr(self, k) for k in _GROWTH_KEYS}}
        defaults = {f.name: f.default for f in dataclasses.fields(GrowthConfig)}
        return [(self.timing, {k: v for k, v in fields.items() if v != defaults.get(k)} | {"op": self.op})]


# The growth fields a variant (or a stage) passes to its GrowthConfig besides op: Variant's fields that
# GrowthConfig has too (in Variant's order).
_GROWTH_KEYS = tuple(
    f.name for f in dataclasses.fields(Variant) if f.name in _STAGE_KEYS and f.name not in ("op", "timing")
)


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


def parse_timing(timing: str | int, name: str) -> tuple[str, float]:
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
