"""Growth efficacy study: does growing save compute, and which way of growing saves the most.

One study trains the target model from scratch and a set of grown variants (a base model of the target's
widths and `target layers / factor` layers, grown in the run by `fastgrow.grow` into the target), all with

* the same data order: every run uses the study's data, batch, seq_len and seed, so the deterministic
  loader hands every run the same batches in the same order (grown runs, which train more tokens for the
  same FLOPs, see a longer prefix of that same stream) and evaluates on the same validation batches;
* the same total training FLOPs: the scratch run's budget B = max_steps * tokens_per_step * f_target,
  with f = `fastgrow.model.flops_per_token(model, seq_len, include_attention=True)` (the convention of the
  `flops` field the trainer logs, which counts each phase at its own size). A grown run trains k_g steps
  at f_base, grows, and then trains round((B - k_g * tokens_per_step * f_base) / (tokens_per_step *
  f_target)) steps, so its total is B to within half a target step (the exact total is reported). A
  G_learn variant's learn steps come between the two phases and cost `learn_flops_per_step` each (the
  large model's step plus the maps' expansion, fastgrow.grow_learn), deducted from the budget the same way.

Speedup at equal loss, as Du et al. (2024) define it: FLOPs_scratch / FLOPs_grown - 1 at the scratch
run's final validation loss, on monotone (running-minimum) validation curves interpolated in log-log;
and the loss gap at equal FLOPs. See `fastgrow.speedup` for the method and why.

Growth timing per variant: "planner" (Eq. 10 via `fastgrow.plan.auto_growth_tokens` for the target and
the scratch run's token budget D, clamped to D/2 as the trainer's "auto" does), "planner*X" /
"planner/X", "XD" (a fraction X of D, e.g. "0.1D"), or a token count. It is rounded up to whole steps.

Layout of a study directory: one run directory per variant (`<out>/<name>/`, the run's train.out_dir,
with metrics.jsonl and checkpoints), `study_done.json` in a run directory once that run has finished
(a finished run is reused; an interrupted one is resumed from its newest checkpoint with
`train(cfg, resume=True)`), and next to the runs `study.json` (the plan), `runs.jsonl` (one line per run),
`study.md` (the table) and `study.png` (validation loss vs FLOPs), each written atomically.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastgrow.config import ConfigError, GrowthConfig, ModelConfig, RunConfig, parse_count, preset
from fastgrow.speedup import Curve, load_curve, read_records, speedup_at_equal_loss

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

__all__ = [
    "PlannedRun",
    "RunOutcome",
    "StudyConfig",
    "StudyResult",
    "Variant",
    "analyze",
    "ensure_data",
    "equal_flops_steps",
    "load_curve",
    "load_study",
    "plan_study",
    "planner_tokens",
    "plot_study",
    "resolve_timing",
    "run_study",
    "study_table",
    "write_report",
]

SCRATCH = "scratch"
BASE = "base"  # a control: the base model trained alone for the whole budget, never grown
DONE_MARKER = "study_done.json"
GROWTH_OPS = ("stack", "interpolate", "partial", "sources", "zero", "random", "learn")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.+-]*$")
# Fields that change what a finished run measured although a resume would accept them.
_REUSE_STRICT = ("train.eval_batches",)


# --- configuration ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Variant:
    """One run of a study. op "scratch" is the target trained from scratch (the reference), "base" the base
    model trained alone for the whole budget (a control: is growing better than not growing?), and the
    growth ops (stack, interpolate, partial, sources, zero, random, learn) grow the base into the target.

    timing: "planner", "planner*X", "planner/X", "XD" (fraction of the scratch token budget) or tokens.
    rewarm_steps: for schedule "rewarm" (0: the run's train.warmup_steps).
    learn_steps / learn_lr: for op "learn" (None: G_learn's defaults).
    """

    name: str
    op: str = "stack"
    timing: str | int = "planner"
    spec: str = ""
    noise: float = 0.0
    optimizer: str = "copy"
    schedule: str = "continue"
    rewarm_steps: int = 0
    learn_steps: int | None = None  # op learn: the operator's training steps (None: its default, 100)
    learn_lr: float | None = None  # op learn: its LR (None: its default)

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _NAME.match(self.name):
            raise ConfigError(f"variant name {self.name!r} must be letters, digits, '_', '.', '+' or '-'")
        if self.op not in (SCRATCH, BASE) and self.op not in GROWTH_OPS:
            raise ConfigError(
                f"variant {self.name}: op must be {SCRATCH!r}, {BASE!r} or one of {GROWTH_OPS}, got {self.op!r}"
            )
        if (self.name == SCRATCH) != (self.op == SCRATCH):
            raise ConfigError(f"variant {self.name}: the name {SCRATCH!r} is reserved for op {SCRATCH!r} and back")
        if self.op in ("partial", "sources") and not self.spec:
            raise ConfigError(f"variant {self.name}: op {self.op!r} needs a spec (e.g. '1-2*3')")
        if isinstance(self.rewarm_steps, bool) or not isinstance(self.rewarm_steps, int) or self.rewarm_steps < 0:
            raise ConfigError(f"variant {self.name}: rewarm_steps must be a non-negative integer")
        if self.grows:
            # The growth fields are validated where they live (GrowthConfig), with the variant named.
            try:
                GrowthConfig(
                    at_tokens=1,
                    op=self.op,
                    spec=self.spec,
                    noise=self.noise,
                    optimizer=self.optimizer,
                    schedule=self.schedule,
                    # 0 means "the run's warmup", resolved later
                    rewarm_steps=max(1, self.rewarm_steps) if self.schedule == "rewarm" else self.rewarm_steps,
                    learn_steps=self.learn_steps,
                    learn_lr=self.learn_lr,
                )
            except ConfigError as e:
                raise ConfigError(f"variant {self.name}: {e}") from None
            _parse_timing(self.timing, self.name)

    @property
    def grows(self) -> bool:
        return self.op in GROWTH_OPS


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
        """The model every grown variant starts from: the target's widths, target layers / factor."""
        return dataclasses.replace(self.target.model, n_layers=self.target.model.n_layers // self.factor)

    @property
    def tokens_per_step(self) -> int:
        t = self.target
        return t.data.batch_size * t.data.seq_len * t.train.grad_accum

    @property
    def budget_tokens(self) -> int:
        return self.target.train.max_steps * self.tokens_per_step


_VARIANT_KEYS = {f.name for f in dataclasses.fields(Variant)}
_STUDY_KEYS = {"name", "factor", "prepare", "keep_checkpoints"}


def load_study(path: str | Path) -> StudyConfig:
    """Read a study TOML: `[study]` (name, factor, optional `[study.prepare]` source/vocab_size/max_bytes),
    the target run's `[model]`, `[data]`, `[train]` (and optional top-level `preset`), and `[[variant]]`
    tables (name, op, timing, spec, noise, optimizer, schedule, rewarm_steps, learn_steps, learn_lr)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"study config not found: {p}")
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None
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
        if section not in d or not isinstance(values, dict):
            raise ConfigError(f"{p}: unknown or malformed section [{section}] (known: study, variant, {sorted(d)})")
        for k, v in values.items():
            if k not in d[section]:
                raise ConfigError(f"{p}: unknown key {k!r} in [{section}] (known: {sorted(d[section])})")
            d[section][k] = v
    target = RunConfig.from_dict(d)
    parsed = []
    for i, v in enumerate(variants):
        if not isinstance(v, dict):
            raise ConfigError(f"{p}: [[variant]] #{i + 1} must be a table")
        bad = set(v) - _VARIANT_KEYS
        if bad:
            raise ConfigError(
                f"{p}: [[variant]] #{i + 1}: unknown key(s) {sorted(bad)} (known: {sorted(_VARIANT_KEYS)})"
            )
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
    """("planner", multiplier) | ("fraction", x) | ("tokens", n); ConfigError naming the variant."""
    if isinstance(timing, bool):
        raise ConfigError(f"variant {name}: timing must be a string or a token count, got {timing!r}")
    if isinstance(timing, (int, float)):
        if timing <= 0:
            raise ConfigError(f"variant {name}: timing must be > 0 tokens, got {timing!r}")
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
        if s.endswith(("D", "d")):
            x = float(s[:-1])
            if not x > 0:
                raise ValueError
            return "fraction", x
        n = parse_count(s)
        if n <= 0:
            raise ValueError
        return "tokens", float(n)
    except (ValueError, ZeroDivisionError):
        raise ConfigError(
            f"variant {name}: cannot read timing {timing!r} (use 'planner', 'planner*2', 'planner/2', '0.1D' "
            "= a fraction of the scratch token budget, or a token count such as '2M')"
        ) from None


def planner_tokens(study: StudyConfig) -> int:
    """Eq. 10 growth tokens for the target at the scratch run's token budget, clamped to half of it."""
    from fastgrow.plan import auto_growth_tokens

    return auto_growth_tokens(study.target, target=study.target.model)


def resolve_timing(
    timing: str | int, *, planner: int, budget_tokens: int, tokens_per_step: int, name: str = "?"
) -> int:
    """Growth token count for a timing spec, rounded up to whole steps (the trainer grows at a step)."""
    kind, x = _parse_timing(timing, name)
    raw = planner * x if kind == "planner" else budget_tokens * x if kind == "fraction" else x
    steps = max(1, math.ceil(raw / tokens_per_step - 1e-9))
    return steps * tokens_per_step


def equal_flops_steps(
    budget_flops: float,
    flops_small: float,
    flops_large: float,
    growth_steps: int,
    tokens_per_step: int,
    learn_steps: int = 0,
    learn_flops: float = 0.0,
) -> int:
    """Total steps of a grown run (growth_steps at flops_small per token, then learn_steps of an
    operator's training costing learn_flops in all (G_learn; 0 otherwise), the rest at flops_large) whose
    training FLOPs come closest to budget_flops. ValueError when the phases before the grown model use it up."""
    if min(budget_flops, flops_small, flops_large) <= 0 or tokens_per_step <= 0 or growth_steps < 1:
        raise ValueError("budget, FLOPs per token, tokens per step and growth steps must be positive")
    small = growth_steps * tokens_per_step * flops_small + learn_flops
    left = budget_flops - small
    large_steps = round(left / (tokens_per_step * flops_large))
    if large_steps < 1:
        what = "the small phase and the operator's training cost" if learn_steps else "the small phase costs"
        raise ValueError(
            f"growing after {growth_steps} steps leaves no FLOPs for the grown model ({what} {small:.4g} of "
            f"the {budget_flops:.4g} budget); grow earlier"
        )
    return growth_steps + learn_steps + large_steps


@dataclass(frozen=True)
class PlannedRun:
    variant: Variant
    config: RunConfig
    run_dir: Path
    growth_tokens: int  # 0 for scratch
    growth_step: int
    max_steps: int
    planned_flops: float
    budget_flops: float

    def record(self) -> dict[str, Any]:
        return {
            "variant": self.variant.name,
            "op": self.variant.op,
            "timing": self.variant.timing if self.variant.grows else None,
            "growth_tokens": self.growth_tokens,
            "growth_step": self.growth_step,
            "max_steps": self.max_steps,
            "tokens": self.max_steps
            * self.config.data.batch_size
            * self.config.data.seq_len
            * self.config.train.grad_accum,
            "planned_flops": self.planned_flops,
            "budget_flops": self.budget_flops,
            "config": self.config.to_dict(),
        }


def plan_study(study: StudyConfig, out_dir: str | Path) -> list[PlannedRun]:
    """Every run's RunConfig: scratch first, then the variants in file order (validates everything)."""
    from fastgrow.grow import plan_from_config, resolve_plan
    from fastgrow.grow_learn import DEFAULT_LEARN_STEPS, learn_flops_per_step
    from fastgrow.model import flops_per_token

    out = Path(out_dir)
    t = study.target
    tps = study.tokens_per_step
    f_large = flops_per_token(t.model, t.data.seq_len, include_attention=True)
    f_small = flops_per_token(study.base, t.data.seq_len, include_attention=True)
    budget = t.train.max_steps * tps * f_large
    planner = planner_tokens(study)
    order = sorted(study.variants, key=lambda v: v.op != SCRATCH)
    runs = []
    for v in order:
        run_dir = out / v.name
        if v.op == SCRATCH:
            cfg = dataclasses.replace(t, train=dataclasses.replace(t.train, out_dir=str(run_dir)))
            runs.append(PlannedRun(v, cfg, run_dir, 0, 0, t.train.max_steps, budget, budget))
            continue
        if v.op == BASE:
            steps = max(1, round(budget / (tps * f_small)))
            train = dataclasses.replace(t.train, max_steps=steps, out_dir=str(run_dir))
            cfg = RunConfig(model=study.base, data=t.data, train=train)
            runs.append(PlannedRun(v, cfg, run_dir, 0, 0, steps, steps * tps * f_small, budget))
            continue
        at = resolve_timing(
            v.timing, planner=planner, budget_tokens=study.budget_tokens, tokens_per_step=tps, name=v.name
        )
        k = at // tps
        # G_learn: its learn steps are steps of the run, each costing a large step plus the maps' expansion.
        n_learn = (v.learn_steps or DEFAULT_LEARN_STEPS) if v.op == "learn" else 0
        learn_flops = n_learn * learn_flops_per_step(study.base, t.model, t.data.seq_len, tps) if n_learn else 0.0
        try:
            steps = equal_flops_steps(budget, f_small, f_large, k, tps, n_learn, learn_flops)
        except ValueError as e:
            raise ConfigError(f"variant {v.name} (timing {v.timing!r} = {at:,} tokens): {e}") from None
        growth = GrowthConfig(
            at_tokens=at,
            op=v.op,
            target_layers=t.model.n_layers,
            spec=v.spec,
            noise=v.noise,
            optimizer=v.optimizer,
            schedule=v.schedule,
            rewarm_steps=(v.rewarm_steps or t.train.warmup_steps) if v.schedule == "rewarm" else v.rewarm_steps,
            learn_steps=v.learn_steps,
            learn_lr=v.learn_lr,
        )
        try:
            dst = resolve_plan(plan_from_config(growth, study.base), study.base).dst
        except ValueError as e:
            raise ConfigError(f"variant {v.name}: {e}") from None
        if dst.architecture() != t.model.architecture():
            raise ConfigError(
                f"variant {v.name}: grows the {study.base.n_layers}-layer base into {dst.n_layers} layers, not the "
                f"target's {t.model.n_layers} (check its spec)"
            )
        cfg = RunConfig(
            model=study.base,
            data=t.data,
            train=dataclasses.replace(t.train, max_steps=steps, out_dir=str(run_dir)),
            growth=(growth,),
        )
        flops = k * tps * f_small + learn_flops + (steps - k - n_learn) * tps * f_large
        runs.append(PlannedRun(v, cfg, run_dir, at, k, steps, flops, budget))
    return runs


# --- running ---------------------------------------------------------------------------------------------


@dataclass
class RunOutcome:
    run: PlannedRun
    status: str  # done | reused | aborted | interrupted | pending
    wall_s: float | None = None
    error: str | None = None


@dataclass
class StudyResult:
    out_dir: Path
    outcomes: list[RunOutcome]
    rows: list[dict[str, Any]] = field(default_factory=list)
    interrupted: bool = False

    @property
    def table(self) -> Path:
        return self.out_dir / "study.md"

    @property
    def plot(self) -> Path:
        return self.out_dir / "study.png"

    @property
    def runs_jsonl(self) -> Path:
        return self.out_dir / "runs.jsonl"


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    """Write via a temp file in the same directory, fsync, rename: readers see the old or the new file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _write_text(path: Path, text: str) -> None:
    _atomic_write(path, lambda p: p.write_text(text))


def _reuse_differences(saved: dict[str, Any], cfg: RunConfig) -> list[str]:
    from fastgrow.checkpoint import config_differences

    diffs = config_differences(saved, cfg)
    now = cfg.to_dict()
    for name in _REUSE_STRICT:
        section, key = name.split(".")
        if saved.get(section, {}).get(key) != now[section][key]:
            diffs.append(f"{name}: finished run {saved.get(section, {}).get(key)!r} vs now {now[section][key]!r}")
    return diffs


def _execute(run: PlannedRun, device: str | None, echo: bool, keep_checkpoints: bool = True) -> RunOutcome:
    """Run one planned run to completion, reusing or resuming what its directory holds."""
    from fastgrow.checkpoint import latest_checkpoint
    from fastgrow.train import TrainingAborted, train

    marker = run.run_dir / DONE_MARKER
    if marker.is_file():
        done = json.loads(marker.read_text())
        diffs = _reuse_differences(done["config"], run.config)
        if diffs:
            raise ConfigError(
                f"{run.run_dir} holds a finished run made with another config ({'; '.join(diffs)}); "
                "delete that directory or choose another --out"
            )
        return RunOutcome(
            run, "reused" if done["status"] == "done" else done["status"], done.get("wall_s"), done.get("error")
        )
    resume = latest_checkpoint(run.run_dir) is not None
    if not resume:
        # Started but died before its first checkpoint: its partial log would be appended to.
        (run.run_dir / "metrics.jsonl").unlink(missing_ok=True)
    t0 = time.perf_counter()
    status, error = "done", None
    try:
        result = train(run.config, resume=resume, device=device, echo=echo)
    except TrainingAborted as e:
        status, error = "aborted", str(e)
    else:
        if result.interrupted:
            return RunOutcome(run, "interrupted", time.perf_counter() - t0)
    wall = time.perf_counter() - t0
    payload = {
        "status": status,
        "error": error,
        "wall_s": wall,
        "resumed": resume,
        "config": run.config.to_dict(),
        "finished_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    _write_text(marker, json.dumps(payload, indent=2, sort_keys=True) + "\n")
    if not keep_checkpoints:
        from fastgrow.checkpoint import list_checkpoints

        for ckpt in list_checkpoints(run.run_dir):  # complete step-N dirs of this run only, after the marker
            shutil.rmtree(ckpt)
    return RunOutcome(run, status, wall, error)


def ensure_data(study: StudyConfig, echo: bool) -> None:
    """Make sure data.data_dir holds prepared token shards: prepare them from [study.prepare] if missing
    (this needs `datasets`, so on a machine without it prepare elsewhere and copy the folder)."""
    data_dir = Path(study.target.data.data_dir)
    if (data_dir / "meta.json").is_file():
        return
    if not study.prepare:
        raise FileNotFoundError(
            f"no prepared data in {data_dir}: run `fastgrow prepare --out {data_dir} ...` first "
            "or add a [study.prepare] table (source, vocab_size, max_bytes) to the study config"
        )
    from fastgrow.data import prepare

    p = dict(study.prepare)
    source = p.pop("source")
    max_bytes = p.pop("max_bytes", None)
    vocab = p.pop("vocab_size", study.target.model.vocab_size)
    if p:
        raise ConfigError(f"unknown key(s) in [study.prepare]: {sorted(p)} (known: source, vocab_size, max_bytes)")
    if echo:
        print(f"[study] preparing {source} into {data_dir} (vocab {vocab})", file=sys.stderr)
    prepare(
        source,
        data_dir,
        vocab_size=int(vocab),
        max_bytes=None if max_bytes is None else parse_count(max_bytes),
        progress=echo,
    )


def run_study(
    study: StudyConfig,
    out_dir: str | Path,
    *,
    only: Sequence[str] | None = None,
    device: str | None = None,
    echo: bool = True,
    train_runs: bool = True,
    plot: bool = True,
) -> StudyResult:
    """Run (or reuse / resume) every run of the study, then write runs.jsonl, study.md and study.png.

    only: variant names to run (scratch is always included: the speedups are relative to it).
    train_runs=False only reports on what the directory already holds (finished runs).
    Stops at the first run interrupted by SIGTERM (result.interrupted); a run that aborts on non-finite
    losses is recorded as aborted and the study goes on.
    """
    out = Path(out_dir)
    runs = plan_study(study, out)
    if only:
        unknown = sorted(set(only) - {r.variant.name for r in runs})
        if unknown:
            raise ConfigError(f"unknown variant(s) {unknown}; the study has {[r.variant.name for r in runs]}")
        runs = [r for r in runs if r.variant.op == SCRATCH or r.variant.name in set(only)]
    out.mkdir(parents=True, exist_ok=True)
    plan = {
        "name": study.name,
        "factor": study.factor,
        "target": study.target.model.architecture(),
        "base": study.base.architecture(),
        "budget_tokens": study.budget_tokens,
        "planner_tokens": planner_tokens(study),
        "runs": [r.record() for r in runs],
    }
    _write_text(out / "study.json", json.dumps(plan, indent=2, sort_keys=True) + "\n")
    if train_runs:
        ensure_data(study, echo)
    train_tokens = _train_tokens(study)
    over = [r.variant.name for r in runs if train_tokens and r.record()["tokens"] > train_tokens]
    if over and echo:
        print(f"[study] warning: {', '.join(over)} will train more than one epoch of the data", file=sys.stderr)
    outcomes: list[RunOutcome] = []
    interrupted = False
    for i, run in enumerate(runs):
        if interrupted or not train_runs:
            done = (run.run_dir / DONE_MARKER).is_file()
            outcome = _execute(run, device, echo) if done else RunOutcome(run, "pending")
            outcomes.append(outcome)
            continue
        if echo:
            print(
                f"[study] {i + 1}/{len(runs)} {run.variant.name}: {run.max_steps} steps"
                + (f", grow at step {run.growth_step}" if run.growth_step else ""),
                file=sys.stderr,
            )
        outcome = _execute(run, device, echo, study.keep_checkpoints)
        outcomes.append(outcome)
        if outcome.status == "interrupted":
            interrupted = True
        elif outcome.status != "reused":
            # Partial results are useful while the rest runs: rewrite the report after each run.
            write_report(StudyResult(out, outcomes), study, plot=False, train_tokens=train_tokens)
    result = StudyResult(out, outcomes, interrupted=interrupted)
    write_report(result, study, plot=plot, train_tokens=train_tokens)
    return result


def _train_tokens(study: StudyConfig) -> int | None:
    """Tokens in the training split of the study's data (None when the data is not there)."""
    from fastgrow.loader import TokenData

    d = study.target.data
    if not (Path(d.data_dir) / "meta.json").is_file():
        return None
    data = TokenData.open(d.data_dir, verify=False)
    return data.num_tokens - data.val_tokens(d.val_fraction)


# --- reporting -------------------------------------------------------------------------------------------


def analyze(outcomes: Sequence[RunOutcome], ema: float = 0.0, train_tokens: int | None = None) -> list[dict[str, Any]]:
    """One row per run: its plan and status, and where it has a validation curve its final loss, FLOPs,
    epochs (with train_tokens, the size of the training split), speedup and loss gap vs scratch."""
    curves: dict[str, Curve] = {}
    speeds: dict[str, dict[str, float | None]] = {}
    for o in outcomes:
        log = o.run.run_dir / "metrics.jsonl"
        if o.status in ("done", "reused", "aborted") and log.is_file():
            speeds[o.run.variant.name] = _throughput(read_records(log))
            # A run without validation records has no curve (it is still listed).
            with contextlib.suppress(ValueError):
                curves[o.run.variant.name] = load_curve(o.run.run_dir)
    scratch = curves.get(SCRATCH)
    rows = []
    for o in outcomes:
        row = o.run.record()
        row.update(status=o.status, wall_s=o.wall_s, error=o.error, run_dir=str(o.run.run_dir))
        row["epochs"] = row["tokens"] / train_tokens if train_tokens else None
        row.update(speeds.get(o.run.variant.name, {}))
        c = curves.get(o.run.variant.name)
        if c is not None:
            finite = [x for x in c.loss if math.isfinite(x)]
            row.update(
                final_val_loss=c.loss[-1],
                best_val_loss=min(finite) if finite else None,
                total_flops=c.flops[-1],
                flops_ratio=c.flops[-1] / o.run.budget_flops,
                growth_flops=list(c.growth_flops),
                evals=len(c.flops),
            )
        if c is not None and scratch is not None:
            cmp = speedup_at_equal_loss(scratch, c, ema)
            row.update(
                target_loss=cmp.target_loss,
                flops_scratch=cmp.flops_scratch,
                flops_to_reach=cmp.flops_grown,
                reached=cmp.flops_grown is not None,
                speedup=cmp.speedup,
                loss_at_budget=cmp.loss_grown_at_budget,
                loss_gap=cmp.loss_gap,
            )
        rows.append(row)
    return rows


def _throughput(recs: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """Mean logged tokens/s of the (final) target phase and of the small phase before growth; the first
    logged window of each phase is left out (it holds warm-up: kernel compilation, allocator growth)."""
    grow_step = next((r["step"] for r in recs if r.get("kind") == "growth"), None)
    train = [r for r in recs if r.get("kind") == "train" and r.get("tokens_per_s") is not None]
    before = [r["tokens_per_s"] for r in train if grow_step is not None and r["step"] <= grow_step]
    after = [r["tokens_per_s"] for r in train if grow_step is None or r["step"] > grow_step]

    def mean(xs: list[float]) -> float | None:
        xs = [x for x in (xs[1:] or xs) if math.isfinite(x)]
        return sum(xs) / len(xs) if xs else None

    return {"tokens_per_s": mean(after), "tokens_per_s_before_growth": mean(before) if before else None}


def _fmt(x: float | None, spec: str, none: str = "—") -> str:
    return none if x is None else format(x, spec)


def _table_row(r: dict[str, Any], budget_tokens: int) -> list[str]:
    g = (r["config"]["growth"] or [{"spec": "", "noise": 0.0, "schedule": "", "optimizer": ""}])[0]
    grows = r["op"] in GROWTH_OPS
    op = r["op"] + (f" `{g['spec']}`" if grows and g["spec"] else "") + (f" noise {g['noise']:g}" if g["noise"] else "")
    if g.get("learn_steps"):
        op += f" {g['learn_steps']} steps"
    sched = g["schedule"] + (f" {g['rewarm_steps']}" if g["schedule"] == "rewarm" else "")
    if "flops_to_reach" not in r:
        speed = "—"
    elif r["op"] == SCRATCH:
        speed = "(reference)"
    else:
        speed = _fmt(r.get("speedup"), "+.1%", none="not reached")
    epochs = f" ({r['epochs']:.2f} ep)" if r.get("epochs") is not None else ""
    return [
        r["variant"],
        op,
        g["optimizer"] if grows else "—",
        sched if grows else "—",
        f"{r['growth_tokens']:,} ({r['growth_tokens'] / budget_tokens:.2f})" if grows else "—",
        f"{r['max_steps']} / {r['tokens']:,}{epochs}",
        _fmt(r.get("flops_ratio"), ".4f"),
        _fmt(r.get("final_val_loss"), ".4f"),
        _fmt(r.get("loss_gap"), "+.4f") if r["op"] != SCRATCH else "—",
        _fmt(r.get("flops_to_reach"), ".4g") if r["op"] != SCRATCH else _fmt(r.get("flops_scratch"), ".4g"),
        speed,
        r["status"],
    ]


def study_table(rows: Sequence[dict[str, Any]], study: StudyConfig) -> str:
    """The markdown report: setup, method, and one table row per run."""
    t = study.target
    budget = rows[0]["budget_flops"] if rows else float("nan")
    lines = [
        f"# Growth study: {study.name}",
        "",
        f"Target: {t.model.n_layers} layers, dim {t.model.dim}, {t.model.num_params():,} params; base: "
        f"{study.base.n_layers} layers ({study.base.num_params():,} params), factor {study.factor}. "
        f"Data: {t.data.data_dir}, batch {t.data.batch_size} x seq {t.data.seq_len}, seed {t.train.seed}. "
        f"Scratch budget: {t.train.max_steps} steps = {study.budget_tokens:,} tokens (D), {budget:.4g} training "
        "FLOPs (6N + causal attention per token, each phase counted at its own size).",
        "",
        "Speedup = FLOPs_scratch / FLOPs_grown - 1 at the scratch run's final (best) validation loss, on running-"
        "minimum validation curves interpolated in log-log; *not reached*: the run never got there. Loss gap = "
        "the run's minus scratch's validation loss at the scratch budget (negative: better than scratch). All "
        "runs: same data order and validation batches, same total FLOPs (`total/budget`: rounding to whole "
        f"steps). `{BASE}` (if present) is the base model trained alone for the whole budget, never grown.",
        "",
        "| variant | op | optimizer | schedule | growth at tokens (of D) | steps / tokens | total/budget "
        "| final val loss | loss gap | FLOPs to scratch loss | speedup | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(_table_row(r, study.budget_tokens)) + " |" for r in rows]
    over = [r["variant"] for r in rows if (r.get("epochs") or 0) > 1]
    if over:
        lines += ["", f"Note: {', '.join(over)} trained more than one epoch of the data (repeated tokens)."]
    return "\n".join(lines) + "\n"


def plot_study(rows: Sequence[dict[str, Any]], out_png: str | Path, title: str = "growth study") -> Path:
    """Validation loss vs training FLOPs for every run (growth points marked, the scratch run's final loss
    and the budget as dotted lines); left: the whole run, right: the last 60% of the budget."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [(r, load_curve(r["run_dir"])) for r in rows if "total_flops" in r]
    if not curves:
        raise ValueError("no finished run with validation records to plot")
    fig, axes = plt.subplots(1, 2, figsize=(17, 6))
    budget = curves[0][0]["budget_flops"]
    target = next((r.get("target_loss") for r, _ in curves if r.get("target_loss") is not None), None)
    cmap = plt.get_cmap("tab20")
    for i, (r, c) in enumerate(curves):
        if r["op"] == SCRATCH:
            style = {"color": "black", "lw": 2.4, "zorder": 5}
        else:
            # 20 colours, and a second line style past them, so every run stays distinguishable.
            style = {"color": cmap(i % 20), "lw": 1.3, "ls": "-" if i < 20 else "--"}
        label = r["variant"]
        if r["op"] != SCRATCH and "reached" in r:
            label += f" ({r['speedup']:+.0%})" if r["speedup"] is not None else " (not reached)"
        for ax in axes:
            ax.plot(c.flops, c.loss, label=label, **style)
            for gf in c.growth_flops:
                # The marker sits on the curve at the growth FLOPs (interpolated between evaluations).
                y = _interp(gf, c.flops, c.loss)
                ax.plot([gf], [y], marker="*", ms=11, color=style["color"], mec="black", mew=0.6, zorder=6)
    lo_x = 0.4 * budget
    tail = [y for _, c in curves for x, y in zip(c.flops, c.loss) if x >= lo_x and math.isfinite(y)]
    for ax, zoom in zip(axes, (False, True)):
        ax.axvline(budget, color="gray", ls=":", lw=1)
        if target is not None:
            ax.axhline(target, color="gray", ls=":", lw=1)
        ax.set_xlabel("training FLOPs")
        ax.set_ylabel("validation loss")
        ax.grid(alpha=0.3)
        if zoom and tail:
            pad = 0.05 * (max(tail) - min(tail) or 1.0)
            ax.set_xlim(lo_x, max(max(c.flops) for _, c in curves) * 1.01)
            ax.set_ylim(min(tail) - pad, max(tail) + pad)
            ax.set_title("last 60% of the budget (dotted: scratch final loss, budget)")
        else:
            ax.set_title("validation loss vs FLOPs (★ = growth; legend: speedup at equal loss)")
    axes[1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), ncol=1 if len(curves) <= 16 else 2)
    fig.suptitle(title)
    fig.tight_layout()
    out = Path(out_png)
    _atomic_write(out, lambda p: fig.savefig(p, dpi=110, format="png"))
    plt.close(fig)
    return out


def _interp(x: float, xs: Sequence[float], ys: Sequence[float]) -> float:
    if x <= xs[0]:
        return ys[0]
    for j in range(1, len(xs)):
        if x <= xs[j]:
            t = (x - xs[j - 1]) / (xs[j] - xs[j - 1])
            return ys[j - 1] + t * (ys[j] - ys[j - 1])
    return ys[-1]


def write_report(
    result: StudyResult, study: StudyConfig, *, plot: bool = True, ema: float = 0.0, train_tokens: int | None = None
) -> StudyResult:
    """Write runs.jsonl, study.md (and study.png) for the outcomes so far; fills result.rows."""
    rows = analyze(result.outcomes, ema, train_tokens)
    result.rows = rows
    _write_text(result.runs_jsonl, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    _write_text(result.table, study_table(rows, study))
    if plot and any("total_flops" in r for r in rows):
        try:
            plot_study(rows, result.plot, title=f"growth study {study.name}: validation loss at equal FLOPs")
        except ImportError as e:  # the GPU machine has no matplotlib: plot later with --report-only
            print(f"[study] no plot ({e}); run again with --report-only where matplotlib is installed", file=sys.stderr)
    return result
