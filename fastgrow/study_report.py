"""A growth study's report: one row per run (plan, status, final loss, speedup at equal loss, loss gap,
throughput), `runs.jsonl`, the markdown table `study.md` and the plot `study.png`, each written
atomically. The method is in fastgrow/study.py; the speedup maths in fastgrow.speedup.
"""

from __future__ import annotations

import contextlib
import json
import math
import sys
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fastgrow.fsutil import write_atomically, write_text_atomically
from fastgrow.speedup import Curve, curve_from_records, load_curve, read_records, speedup_at_equal_loss
from fastgrow.study_config import BASE, DEPTH_GROWTH_OPS, SCRATCH, STAGES, TARGET, StudyConfig
from fastgrow.study_plan import PlannedRun


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


def analyze(outcomes: Sequence[RunOutcome], ema: float = 0.0, train_tokens: int | None = None) -> list[dict[str, Any]]:
    """One row per run: its plan and status, and where it has a validation curve its final loss, FLOPs,
    epochs (with train_tokens, the size of the training split), speedup and loss gap vs scratch."""
    curves: dict[str, Curve] = {}
    speeds: dict[str, dict[str, float | None]] = {}
    for o in outcomes:
        log = o.run.run_dir / "metrics.jsonl"
        if o.status in ("done", "reused", "aborted") and log.is_file():
            recs = read_records(log)
            speeds[o.run.variant.name] = _throughput(recs)
            # A run without validation records has no curve (it is still listed).
            with contextlib.suppress(ValueError):
                curves[o.run.variant.name] = curve_from_records(recs, o.run.run_dir)
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
    if r["op"] in (BASE, *DEPTH_GROWTH_OPS, STAGES) and model["n_layers"] != study.base.n_layers:
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
    write_atomically(out, lambda p: fig.savefig(p, dpi=110, format="png"))
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
    write_text_atomically(result.runs_jsonl, "".join(json.dumps(r, sort_keys=True) + "\n" for r in rows))
    write_text_atomically(result.table, study_table(rows, study))
    if plot and any("total_flops" in r for r in rows):
        try:
            plot_study(rows, result.plot, title=f"growth study {study.name}: validation loss at equal FLOPs")
        except ImportError as e:  # the GPU machine has no matplotlib: plot later with --report-only
            print(f"[study] no plot ({e}); run again with --report-only where matplotlib is installed", file=sys.stderr)
    return result
