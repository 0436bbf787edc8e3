"""Which checkpoint a resume starts from, and the metrics log cut back to it.

`checkpoint_to_resume(run_dir, resume_from)` never falls back silently: the newest step folder must
verify (manifest, every file's size and sha256); when it does not, the error names the problem, the
newest good checkpoint and the flag that resumes from it (`--resume-from step-N`). With `resume_from`
that checkpoint is used, and the step folders newer than it (the abandoned future, damaged or not) are
moved aside to `step-N.abandoned-<random>` so that pruning and the next `--resume` never mix them with
the resumed run's checkpoints; nothing is deleted.

`rewind_metrics(path, ckpt)` makes metrics.jsonl hold each step once after a resume: the checkpoint
records how many records the log held when it was written (`metrics_records` in state.json), and the
log is cut back to them (atomically) before the resumed run re-logs the steps after the checkpoint.
Checkpoints written before that key existed cut by step instead (records after the checkpoint's step,
and growth records beyond its growth history, are dropped).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
from pathlib import Path

from fastgrow.checkpoint import CheckpointError, read_state, step_dirs, step_of, verify_checkpoint
from fastgrow.errors import option_error
from fastgrow.fsutil import fsync_dir, io_errors


def find_checkpoint(run_dir: Path, name: str) -> Path:
    """`step-N`, `N` or a path to a step folder of `run_dir` -> that folder."""
    s = str(name).strip()
    if re.fullmatch(r"\d+", s):
        s = f"step-{int(s):08d}"
    candidate = Path(s)
    if candidate.parent == Path(".") and not re.fullmatch(r"step-\d+", s):
        raise ValueError(f"--resume-from {name!r}: expected step-N, a step number, or a checkpoint folder")
    if candidate.parent != Path("."):
        if candidate.resolve().parent != run_dir.resolve():
            raise ValueError(f"--resume-from {name}: not a checkpoint of the run directory {run_dir}")
        s = candidate.name
    m = re.fullmatch(r"step-(\d+)", s)
    if not m:
        raise ValueError(f"--resume-from {name!r}: expected step-N, a step number, or a checkpoint folder")
    for d in step_dirs(run_dir):
        if step_of(d) == int(m.group(1)):
            return d
    have = ", ".join(d.name for d in step_dirs(run_dir)) or "none"
    raise FileNotFoundError(f"--resume-from {name}: no checkpoint step {int(m.group(1))} in {run_dir} (it has: {have})")


def newest_good_checkpoint(run_dir: Path, below: int | None = None) -> Path | None:
    """The newest step folder (older than step `below`) that verifies."""
    for d in reversed(step_dirs(run_dir)):
        if below is not None and step_of(d) >= below:
            continue
        try:
            verify_checkpoint(d)
        except CheckpointError:
            continue
        return d
    return None


def checkpoint_to_resume(run_dir: str | Path, resume_from: str | None = None, echo: bool = True) -> Path:
    """The verified checkpoint a resume of `run_dir` starts from (see the module docstring)."""
    run = Path(run_dir)
    if resume_from is not None:
        ckpt = find_checkpoint(run, resume_from)
        verify_checkpoint(ckpt)
        for newer in [d for d in step_dirs(run) if step_of(d) > step_of(ckpt)]:
            aside = newer.with_name(f"{newer.name}.abandoned-{secrets.token_hex(3)}")
            with io_errors("move aside", newer):
                os.replace(newer, aside)
            if echo:
                print(f"fastgrow: moved {newer.name} aside to {aside.name} (newer than {ckpt.name})", file=sys.stderr)
        fsync_dir(run)
        return ckpt
    dirs = step_dirs(run)
    if not dirs:
        raise option_error(
            FileNotFoundError, lambda o: f"{o}: no complete checkpoint in {run}", "resume=True", "--resume"
        )
    newest = dirs[-1]
    try:
        verify_checkpoint(newest)
    except CheckpointError as e:
        cause = str(e)
        good = newest_good_checkpoint(run, below=step_of(newest))
        raise option_error(
            CheckpointError,
            lambda o: (
                f"the newest checkpoint {newest.name} is damaged ({cause}); "
                + (
                    f"the newest good checkpoint is {good.name}: resume from it with {o}"
                    if good is not None
                    else "no older checkpoint is intact"
                )
            ),
            f"resume_from={good.name!r}" if good is not None else "",
            f"--resume-from {good.name}" if good is not None else "",
        ) from None
    return newest


def rewind_metrics(path: str | Path, ckpt: Path) -> int:
    """Cut metrics.jsonl back to what it held when `ckpt` was written; return how many records were dropped."""
    p = Path(path)
    if not p.is_file():
        return 0
    meta = read_state(ckpt)
    with io_errors("read", p):
        lines = p.read_bytes().split(b"\n")
    complete = [ln for ln in lines[:-1] if ln.strip()]  # a last line without "\n" was cut by a crash
    cut = lines[-1].strip() != b""
    keep_n = meta.get("metrics_records")
    if isinstance(keep_n, int):
        kept = complete[:keep_n]
    else:
        kept = _keep_by_step(complete, meta["step"], len(meta["growth_history"]))
    dropped = len(complete) - len(kept)
    if not dropped and not cut:
        return 0
    tmp = p.with_name(f"{p.name}.tmp-{secrets.token_hex(4)}")
    try:
        with io_errors("rewrite", p), open(tmp, "wb") as f:
            f.write(b"".join(ln + b"\n" for ln in kept))
            f.flush()
            os.fsync(f.fileno())
        with io_errors("rewrite", p):
            os.replace(tmp, p)
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(p.parent)
    return dropped


def _keep_by_step(lines: list[bytes], step: int, growths: int) -> list[bytes]:
    kept = []
    for ln in lines:
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError:
            continue
        if not isinstance(rec, dict) or int(rec.get("step", 0)) > step:
            continue
        if rec.get("kind") == "growth":
            if growths <= 0:
                continue
            growths -= 1
        kept.append(ln)
    return kept
