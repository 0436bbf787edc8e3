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
configured in `fastgrow.study_config`, planned in `fastgrow.study_plan` and reported by
`fastgrow.study_report`.

Layout of a study directory: one run directory per variant (`<out>/<name>/`, the run's train.out_dir,
with metrics.jsonl and checkpoints), `study_done.json` in a run directory once that run has finished
(a finished run is reused; an interrupted one is resumed from its newest checkpoint with
`train(cfg, resume=True)`), and next to the runs `study.json` (the plan), `runs.jsonl` (one line per run),
`study.md` (the table) and `study.png` (validation loss vs FLOPs), each written atomically.
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from fastgrow.config import ConfigError, RunConfig, parse_count
from fastgrow.fsutil import write_text_atomically
from fastgrow.speedup import load_curve
from fastgrow.study_config import SCRATCH, StudyConfig, Variant, load_study
from fastgrow.study_plan import (
    PlannedRun,
    equal_flops_steps,
    equal_flops_steps_phases,
    plan_study,
    planner_tokens,
    resolve_timing,
)
from fastgrow.study_report import RunOutcome, StudyResult, analyze, plot_study, study_table, write_report

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
    write_text_atomically(marker, json.dumps(payload, indent=2, sort_keys=True) + "\n")
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
    write_text_atomically(out / "study.json", json.dumps(plan, indent=2, sort_keys=True) + "\n")
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
