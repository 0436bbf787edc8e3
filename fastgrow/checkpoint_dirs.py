"""The step folders of a run directory: how a checkpoint is committed, listed, found and deleted.

A checkpoint is written into `step-N.tmp-<random>`, each file fsynced, the manifest last
(`commit_checkpoint`), then the directory is renamed to `step-N` and the parent fsynced. Only
directories named `step-N` (no `.tmp-`) that hold a manifest count as complete, so a process killed
mid-write leaves the previous checkpoint as the newest complete one. The newest `keep` complete
checkpoints are kept (`prune_checkpoints`).

Deleting is the same protocol backwards: a checkpoint is first renamed to `step-N.del-<random>` (and the
parent fsynced), then removed, so a process killed while pruning never leaves a `step-N` that looks
complete but is not. `.del-` and `.tmp-` leftovers are never listed; `clean_leftovers` (run by the lock
holder) removes them. Every layout (fastgrow.checkpoint_format) goes through these steps.
"""

from __future__ import annotations

import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path
from typing import Any

from fastgrow.checkpoint_format import FORMAT_VERSION, MANIFEST, STEP_RE, CheckpointError
from fastgrow.fsutil import (
    IOFailure,
    fsync_dir,
    fsync_file,
    io_cause,
    io_errors,
    is_io_error,
    sha256_file,
    write_json_durable,
)

# Leftovers: a write that was killed (`step-N.tmp-*`) or a delete that was killed (`step-N.del-*`).
_LEFTOVER_RE = re.compile(r"^step-\d+\.(tmp|del)-")


def checkpoint_dir(run_dir: str | Path, step: int, keep: int) -> Path:
    """Where the checkpoint of `step` goes (`run_dir/step-<step>`, 8 digits). `keep`, the number of
    checkpoints kept, must be >= 2 so that a crash during a write always leaves a good checkpoint."""
    if keep < 2:
        raise ValueError(f"keep must be >= 2 so a crash during a write leaves a good checkpoint, got {keep}")
    return Path(run_dir) / f"step-{step:08d}"


def step_dirs(run_dir: str | Path) -> list[Path]:
    """Every `step-N` directory of `run_dir`, complete or not, oldest first (leftovers excluded)."""
    d = Path(run_dir)
    if not d.is_dir():
        return []
    found = []
    for child in d.iterdir():
        m = STEP_RE.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `run_dir` (named step-N, with a manifest), oldest first."""
    return [p for p in step_dirs(run_dir) if (p / MANIFEST).is_file()]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def step_of(ckpt: str | Path) -> int:
    m = STEP_RE.match(Path(ckpt).name)
    if not m:
        raise ValueError(f"{ckpt} is not a checkpoint folder name (step-N)")
    return int(m.group(1))


def clean_leftovers(run_dir: str | Path) -> list[str]:
    """Remove the `step-N.tmp-*` / `step-N.del-*` folders of killed writes and deletes; return their names.
    Only the holder of the run's lock may call this: another process's write in progress is a `.tmp-`."""
    d = Path(run_dir)
    if not d.is_dir():
        return []
    gone = []
    for child in d.iterdir():
        if _LEFTOVER_RE.match(child.name) and child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
            gone.append(child.name)
    return sorted(gone)


def remove_checkpoint(ckpt: Path) -> None:
    """Delete a checkpoint folder so that no crash can leave it looking complete: rename it to a `.del-`
    name first (made durable), then remove it."""
    doomed = ckpt.with_name(f"{ckpt.name}.del-{secrets.token_hex(4)}")
    with io_errors("remove checkpoint", ckpt):
        os.replace(ckpt, doomed)
        fsync_dir(ckpt.parent)
    shutil.rmtree(doomed, ignore_errors=True)


def checkpoint_io_failure(e: BaseException, final: Path) -> BaseException:
    """What a failed write of checkpoint `final` raises: an I/O error becomes one IOFailure line naming the
    checkpoint, the cause and the newest complete checkpoint; anything else is raised as it is."""
    if isinstance(e, Exception) and is_io_error(e) and not isinstance(e, IOFailure):
        newest = latest_checkpoint(final.parent)
        where = f"the newest complete checkpoint is {newest}" if newest else "no complete checkpoint exists"
        return IOFailure(f"cannot write checkpoint {final}: {io_cause(e)}; {where}", getattr(e, "errno", None))
    return e


def new_checkpoint_dir(final: Path) -> Path:
    """The temporary directory `<final>.tmp-<random>` a checkpoint is written into."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a checkpoint should be as readable as any dir
    return tmp


def commit_checkpoint(
    tmp: Path, final: Path, step: int, layout: str, hashed: dict[str, dict[str, Any]] | None = None
) -> None:
    """Manifest last (every file under `tmp`, sizes and sha256; `hashed`: entries already fsynced and
    hashed elsewhere, e.g. by the rank that wrote them), then rename `tmp` to `final`, fsyncing both."""
    hashed = hashed or {}
    files = {}
    for f in sorted(tmp.rglob("*")):
        if not f.is_file():
            continue
        rel = f.relative_to(tmp).as_posix()
        if rel in hashed:
            files[rel] = hashed[rel]
            continue
        fsync_file(f)
        files[rel] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    manifest = {"format_version": FORMAT_VERSION, "layout": layout, "step": step, "files": files}
    write_json_durable(tmp / MANIFEST, manifest)
    for d in sorted({f.parent for f in tmp.rglob("*")} | {tmp}, key=lambda x: -len(x.parts)):
        fsync_dir(d)
    if final.exists():  # an earlier checkpoint of the same step (e.g. re-saved after a resume)
        remove_checkpoint(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def prune_checkpoints(run: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; remove older step folders (complete or damaged) and
    the leftovers of killed writes/deletes."""
    complete = list_checkpoints(run)
    if len(complete) > keep:
        oldest_kept = step_of(complete[-keep])
        for old in step_dirs(run):
            if step_of(old) < oldest_kept:
                remove_checkpoint(old)
    clean_leftovers(run)


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory as given, or the newest checkpoint of a run directory. A newest step folder that
    is incomplete is an error naming the newest complete one (never a silent fall back to it)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path not found: {p}")
    if (p / MANIFEST).is_file():
        return p
    if STEP_RE.match(p.name) or ".tmp-" in p.name or ".del-" in p.name:
        raise CheckpointError(f"{p} is an incomplete checkpoint (no {MANIFEST}); it was not fully written")
    dirs = step_dirs(p)
    if not dirs:
        raise FileNotFoundError(f"no complete checkpoint (step-N/{MANIFEST}) in {p}")
    newest = dirs[-1]
    if not (newest / MANIFEST).is_file():
        older = latest_checkpoint(p)
        hint = f"the newest complete one is {older}; pass that folder" if older else "no complete one exists"
        raise CheckpointError(f"the newest checkpoint {newest} is incomplete (no {MANIFEST}); {hint}")
    return newest
