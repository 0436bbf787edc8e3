"""What a complete checkpoint folder holds, and checking it.

Every checkpoint folder `step-N` ends with `manifest.json`, written last: the layout and every file
with its size and sha256. A layout (`LAYOUTS`) names the files its loader reads: "single" (one
process's safetensors files, fastgrow.checkpoint) and "dcp" (the sharded layout of distributed runs,
fastgrow.checkpoint_dcp). Manifests written before layouts existed have no "layout" key and are read
as "single".

Verification (`verify_checkpoint`) is strict: each file the layout's loader reads must be listed,
present, of the listed size and sha256, and inside the folder; state.json must hold the keys the loader
needs. Every problem is a CheckpointError naming the file.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastgrow.fsutil import contained_path, io_cause, sha256_file

FORMAT_VERSION = 1
# A complete checkpoint's folder name (writes and deletes in progress carry `.tmp-` / `.del-` suffixes).
STEP_RE = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"
STATE = "state.json"
# Keys of state.json that load_checkpoint reads (the others are optional or informational).
STATE_KEYS = ("format_version", "step", "tokens", "cursor", "schedule", "growth_history", "config", "model_config")


@dataclass(frozen=True)
class Layout:
    """The files a checkpoint layout's loader reads. Every `required` file must be listed in the manifest;
    an `optional` file is read when present, so when present it must be listed too; names matching
    `pattern` (e.g. per-rank shards) may be listed as well. Anything else listed is an error.
    `whole_dir`: a folder the loader reads whole (DCP reads every file under dcp/): every file in it must
    be listed too."""

    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    pattern: str | None = None
    whole_dir: str | None = None

    def allows(self, name: str) -> bool:
        return name in self.required or name in self.optional or bool(self.pattern and re.fullmatch(self.pattern, name))


# The single-process layout, and the sharded layout of distributed runs (fastgrow.checkpoint_dcp: DCP's
# index and one data file per rank).
LAYOUTS: dict[str, Layout] = {
    "single": Layout(
        "single", ("model.safetensors", "optimizer.safetensors", STATE), ("tokenizer.json", "learn.safetensors")
    ),
    "dcp": Layout(
        "dcp", (STATE, "dcp/.metadata"), ("tokenizer.json",), pattern=r"dcp/__\d+_\d+\.distcp", whole_dir="dcp"
    ),
}
DEFAULT_LAYOUT = "single"  # manifests written before the "layout" key existed


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names the file."""


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable {what} ({io_cause(e)})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON in the {what} ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: the {what} is not a JSON object")
    return obj


def read_manifest(ckpt: Path) -> dict[str, Any]:
    """The manifest, checked for shape: a known layout listing every file its loader reads, each with an
    integer size and a sha256, each name inside the folder."""
    path = ckpt / MANIFEST
    manifest = _read_json(path, "manifest")
    name = manifest.get("layout", DEFAULT_LAYOUT)
    layout = LAYOUTS.get(name) if isinstance(name, str) else None
    if layout is None:
        raise CheckpointError(f"{path}: unknown checkpoint layout {name!r} (this fastgrow reads {sorted(LAYOUTS)})")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{path}: lists no files (a complete checkpoint lists {', '.join(layout.required)})")
    for fname, info in files.items():
        try:
            contained_path(ckpt, fname, str(path))
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        if not layout.allows(fname):
            raise CheckpointError(f"{path}: lists {fname!r}, which is not a file of the {layout.name!r} layout")
        ok = isinstance(info, dict) and isinstance(info.get("bytes"), int) and isinstance(info.get("sha256"), str)
        if not ok:
            raise CheckpointError(f"{path}: entry {fname!r} needs integer 'bytes' and string 'sha256', got {info!r}")
    missing = [f for f in layout.required if f not in files]
    if missing:
        raise CheckpointError(
            f"{path}: does not list {', '.join(missing)} (every file the loader reads must be listed and checked)"
        )
    unlisted = [f for f in layout.optional if f not in files and (ckpt / f).exists()]
    if unlisted:
        raise CheckpointError(f"{path}: {', '.join(unlisted)} is present but not listed (it would be read unchecked)")
    m = STEP_RE.match(ckpt.name)
    if m and "step" in manifest and manifest["step"] != int(m.group(1)):
        raise CheckpointError(f"{path}: step {manifest['step']!r} does not match the folder name {ckpt.name}")
    return manifest


def checkpoint_layout(manifest: dict[str, Any]) -> str:
    """The manifest's layout: "single" (one process's safetensors files; also manifests written before
    layouts existed) or "dcp" (sharded, fastgrow.checkpoint_dcp)."""
    return manifest.get("layout", DEFAULT_LAYOUT)


def check_listing(ckpt: Path, manifest: dict[str, Any]) -> None:
    """For a layout whose loader reads a folder whole (`Layout.whole_dir`), every file in that folder must
    be in the manifest (and its required files present); other layouts pass."""
    layout = LAYOUTS[checkpoint_layout(manifest)]
    if layout.whole_dir is None:
        return
    d = ckpt / layout.whole_dir
    for name in layout.required:
        if name.startswith(f"{layout.whole_dir}/") and not (ckpt / name).is_file():
            raise CheckpointError(f"{ckpt / name}: missing (the checkpoint is incomplete)")
    listed = set(manifest.get("files", {}))
    needed = [STATE] + [f"{layout.whole_dir}/{f.name}" for f in sorted(d.iterdir()) if f.is_file()]
    unlisted = [n for n in needed if n not in listed]
    if unlisted:
        raise CheckpointError(f"{ckpt}: {', '.join(unlisted)} not listed in the manifest (the checkpoint is corrupt)")


def verify_file(ckpt: Path, name: str, info: dict[str, Any]) -> None:
    """One listed file: present, of the listed size and sha256."""
    f = ckpt / name
    if not f.is_file():
        raise CheckpointError(f"{f}: listed in the manifest but missing")
    try:
        good = f.stat().st_size == info["bytes"] and sha256_file(f) == info["sha256"]
    except OSError as e:
        raise CheckpointError(f"{f}: unreadable ({io_cause(e)})") from None
    if not good:
        raise CheckpointError(f"{f}: checksum mismatch (the checkpoint is corrupt)")


def verify_checkpoint(ckpt: Path) -> dict[str, Any]:
    """Check the manifest (`read_manifest`), every file it lists (size and sha256) and state.json's keys
    (`read_state`); return the manifest."""
    ckpt = Path(ckpt)
    manifest = read_manifest(ckpt)
    check_listing(ckpt, manifest)
    for name, info in manifest["files"].items():
        verify_file(ckpt, name, info)
    read_state(ckpt)
    return manifest


def read_state(ckpt: Path) -> dict[str, Any]:
    """state.json with the keys the loader needs (a missing one is a CheckpointError naming the file)."""
    path = Path(ckpt) / STATE
    meta = _read_json(path, "training state")
    missing = [k for k in STATE_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: missing key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")
    if meta["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format {meta['format_version']!r}")
    return meta
