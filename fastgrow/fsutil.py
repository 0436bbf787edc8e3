"""Durable-file helpers shared by data preparation, checkpoints and exports: checksums, fsync, I/O
failures reported as one line naming the path, and paths from metadata files kept inside their folder."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any


def sha256_file(path: str | Path, chunk: int = 8 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def fsync_file(path: str | Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | Path) -> None:
    """Make a rename or new entry in `path` durable (a no-op where directories cannot be opened)."""
    if os.name != "posix":
        return
    with contextlib.suppress(OSError):  # file systems that refuse directory fsync
        fsync_file(path)


def write_json_durable(path: str | Path, obj: Any, indent: int = 1) -> None:
    """Write `obj` as JSON and fsync it before returning (an I/O failure is an IOFailure naming `path`)."""
    text = json.dumps(obj, indent=indent, sort_keys=True) + "\n"
    with io_errors("write", path), open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_atomically(path: Path, write: Callable[[Path], None]) -> None:
    """`write(tmp)` into a temp file in `path`'s directory, fsync, rename over `path`: readers see the old
    file or the new one, never a part (reports, plots, markers)."""
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


def write_text_atomically(path: Path, text: str) -> None:
    write_atomically(path, lambda p: p.write_text(text))


# --- I/O failures as one line -----------------------------------------------------------------------------


class IOFailure(OSError):
    """An I/O operation failed (disk full, permission, read-only file system, ...). `str()` is one line
    naming the path and the cause, which the CLI prints as `fastgrow: error: ...`."""

    def __init__(self, message: str, errno_: int | None = None) -> None:
        super().__init__(errno_ or 0, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def io_cause(e: BaseException) -> str:
    """The cause of an I/O failure in words. OSError: its strerror (plus the file it names). safetensors
    (Rust) reports a failed write as `... IoError(Os { code: 28, ... })` or `... (os error 28)`: the code
    is decoded."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror + (f" ({e.filename})" if e.filename else "")
    m = re.search(r"\bcode: (\d+)|\(os error (\d+)\)", str(e))
    if m:
        return os.strerror(int(m.group(1) or m.group(2)))
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0]}" if lines else type(e).__name__


def is_io_error(e: BaseException) -> bool:
    """OSError, or a library's wrapper of one (safetensors' SafetensorError carries the OS error code)."""
    return isinstance(e, OSError) or type(e).__name__ == "SafetensorError"


@contextlib.contextmanager
def io_errors(action: str, path: str | Path) -> Iterator[None]:
    """Turn an I/O failure inside the block into one IOFailure line: `cannot <action> <path>: <cause>`."""
    try:
        yield
    except IOFailure:
        raise
    except Exception as e:
        if not is_io_error(e):
            raise
        raise IOFailure(f"cannot {action} {path}: {io_cause(e)}", getattr(e, "errno", None)) from e


# --- paths read from metadata -----------------------------------------------------------------------------


def contained_path(folder: str | Path, name: str, what: str) -> Path:
    """`folder / name` for a relative `name` read from a metadata file (`what` names that file), refusing
    absolute names, `..` components and symlinks that resolve outside `folder`."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what}: bad file name {name!r}")
    p = PurePosixPath(name)
    if p.is_absolute() or PureWindowsPath(name).is_absolute() or ".." in p.parts or "\\" in name:
        raise ValueError(f"{what}: file name {name!r} leaves its folder (absolute paths and '..' are refused)")
    base = Path(folder)
    path = base / name
    if os.path.islink(path) or any(os.path.islink(base / Path(*p.parts[: i + 1])) for i in range(len(p.parts))):
        real, root = os.path.realpath(path), os.path.realpath(base)
        if os.path.commonpath([real, root]) != root:
            raise ValueError(f"{what}: {name!r} is a symlink that leaves {base}")
    return path
