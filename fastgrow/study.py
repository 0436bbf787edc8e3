"""Growth efficacy study: does growing save compute, and which way of growing saves the most.

One study trains the target model from scratch and a set of grown variants (a base model of the target's
widths and `target layers / factor` layers, grown in the run by `fastgrow.grow` into the target), all with

* the same data order: every run uses the study's data, batch, seq_len and seed, so the deterministic
  loader hands every run the same batches in the same order (grown runs, which train more tokens for the
  same FLOPs, see a longer prefix of that same stream) and evaluates on the same validation batches;
* the same total training FLOPs: the scratch run's budget B = max_steps * tokens_per_step * f_target,
  with f = `fastgrow.model.flops_per_token(model, seq_len, include_attention=True)` (the convention of the
  `flops` field the trainer logs, which counts each phase at its own size). A grown run trains each phase
  (the base, then the model after each growth) at its own f, and as many final-phase steps as bring its
  total to B to within half a target step (the exact total is reported).

Speedup at equal loss, as Du et al. (2024) define it: FLOPs_scratch / FLOPs_grown - 1 at the scratch
run's final validation loss, on monotone (running-minimum) validation curves interpolated in log-log;
and the loss gap at equal FLOPs. See `fastgrow.speedup` for the method and why. The variants (one
growth, several stages, per-phase schedules, 0- and 1-layer bases, controls) and their timings are
configured and planned in `fastgrow.study_config`.

Layout of a study directory: one run directory per variant (`<out>/<name>/`, the run's train.out_dir,
with metrics.jsonl and checkpoints), `study_done.json` in a run directory once that run has finished
(a finished run is reused; an interrupted one is resumed from its newest checkpoint with
`train(cfg, resume=True)`), and next to the runs `study.json` (the plan), `runs.jsonl` (one line per run),
`study.md` (the table) and `study.png` (validation loss vs FLOPs), each written atomically.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastgrow.config import ConfigError, RunConfig, parse_count
from fastgrow.speedup import Curve, load_curve, read_records, speedup_at_equal_loss
from fastgrow.study_config import (
    BASE,
    GROWTH_OPS,
    SCRATCH,
    STAGES,
    TARGET,
    PlannedRun,
    StudyConfig,
    Variant,
    equal_flops_steps,
    equal_flops_steps_phases,
    load_study,
    plan_study,
    planner_tokens,
    resolve_timing,
)

__all__ = [
    "PlannedRun",
    "RunOutcome",
    "StudyConfig",
    "StudyResult",
    "Variant",
    "analyze",
    "ensure_data",
    "equal_flops_steps",
    "equal_flops_steps_phases",
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

DONE_MARKER = "study_done.json"
# Fields that change what a finished run measured although a resume would accept them.
_REUSE_STRICT = ("train.eval_batches",)


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
        from fastgrow.checkpoint import list_checkpoints, remove_checkpoint

        for ckpt in list_checkpoints(run.run_dir):  # complete step-N dirs of this run only, after the marker
            remove_checkpoint(ckpt)  # renamed to .del- first: a kill here leaves nothing that looks complete
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
    """Mean logged tokens/s of the final (target) phase and of the base phase before the first growth;
    the first logged window of each phase is left out (it holds warm-up: kernel compilation, allocator
    growth)."""
    grows = [r["step"] for r in recs if r.get("kind") == "growth"]
    first, last = (grows[0], grows[-1]) if grows else (None, None)
    train = [
        r for r in recs if r.get("kind") == "train" and r.get("tokens_per_s") is not None and r.get("phase") != "learn"
    ]
    before = [r["tokens_per_s"] for r in train if first is not None and r["step"] <= first]
    after = [r["tokens_per_s"] for r in train if last is None or r["step"] > last]

    def mean(xs: list[float]) -> float | None:
        xs = [x for x in (xs[1:] or xs) if math.isfinite(x)]
        return sum(xs) / len(xs) if xs else None

    return {"tokens_per_s": mean(after), "tokens_per_s_before_growth": mean(before) if before else None}


def _fmt(x: float | None, spec: str, none: str = "—") -> str:
    return none if x is None else format(x, spec)


def _describe_growth(g: dict[str, Any]) -> tuple[str, str]:
    """(operator, schedule) of one growth stage's config, as the table shows them."""
    op = g["op"]
    if g.get("factor"):
        op += f" x{g['factor']}"
    op += (f" `{g['spec']}`" if g.get("spec") else "") + (f" noise {g['noise']:g}" if g.get("noise") else "")
    if g["op"] == "learn":
        from fastgrow.grow_learn import DEFAULT_LEARN_STEPS

        op += f" ({g.get('learn_steps') or DEFAULT_LEARN_STEPS} learn steps)"
    if g["schedule"] == "rewarm":
        return op, f"rewarm {g['rewarm_steps']}"
    extras = [
        f"{k.replace('_steps', '')} {g[k]:g}" if isinstance(g[k], float) else f"{k.replace('_steps', '')} {g[k]}"
        for k in ("lr", "min_lr", "warmup_steps", "horizon_steps", "jump_to_step", "rewarm_steps")
        if g.get(k)
    ]
    return op, g["schedule"] + (f" ({', '.join(extras)})" if extras else "")


def _table_row(r: dict[str, Any], study: StudyConfig) -> list[str]:
    budget_tokens = study.budget_tokens
    stages = r["config"]["growth"]
    grows = bool(stages)
    described = [_describe_growth(g) for g in stages]
    model = r["config"]["model"]
    op = r["op"] if not grows else " → ".join(d[0] for d in described)
    if r["op"] in (BASE, *GROWTH_OPS, STAGES) and model["n_layers"] != study.base.n_layers:
        op += f" (base: {model['n_layers']} layer{'' if model['n_layers'] == 1 else 's'})"
    if r["op"] != SCRATCH and r["config"]["train"]["schedule"] != study.target.train.schedule:
        op += f", {r['config']['train']['schedule']} LR"
    if "flops_to_reach" not in r:
        speed = "—"
    elif r["op"] == SCRATCH:
        speed = "(reference)"
    else:
        speed = _fmt(r.get("speedup"), "+.1%", none="not reached")
    epochs = f" ({r['epochs']:.2f} ep)" if r.get("epochs") is not None else ""
    at = ", ".join(f"{g['at_tokens']:,} ({g['at_tokens'] / budget_tokens:.2f})" for g in stages)
    return [
        r["variant"],
        op,
        " → ".join(g["optimizer"] for g in stages) if grows else "—",
        " → ".join(d[1] for d in described) if grows else "—",
        at if grows else "—",
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
        f"steps). `{BASE}` (if present) is the base model trained alone for the whole budget, never grown; "
        f"`{TARGET}` the target from scratch with its own schedule. Several growths read left to right (→).",
        "",
        "| variant | op | optimizer | schedule | growth at tokens (of D) | steps / tokens | total/budget "
        "| final val loss | loss gap | FLOPs to scratch loss | speedup | status |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    lines += ["| " + " | ".join(_table_row(r, study)) + " |" for r in rows]
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
