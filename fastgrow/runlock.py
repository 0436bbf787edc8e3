"""An exclusive lock on a run directory, so two runs never write into one `out_dir`.

`RunLock(out_dir)` takes `fcntl.flock(LOCK_EX | LOCK_NB)` on `out_dir/.lock` and writes the holder's pid
and host into it. The kernel drops the lock when the holder's file descriptor closes, which includes the
process dying by any signal (kill -9 too), so a crashed run never leaves a stale lock behind: the file
stays, the lock does not. A second process (fresh run or `--resume`) gets `RunLockedError` at once, whose
message names the holder's pid.

The file is never deleted: unlinking a lock file races with a process that has just opened it (both would
then "hold" a lock, on different inodes). flock is per open file description, so a second RunLock on the
same directory inside one process is refused too. Under torchrun only rank 0 takes the lock (the other
ranks write into the directory rank 0 coordinates). Local file systems only: on NFS flock may be emulated
or unsupported; an unsupported file system is reported, not ignored.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import socket
import time
from pathlib import Path

from fastgrow.fsutil import IOFailure, io_cause

LOCK_FILE = ".lock"


class RunLockedError(OSError):
    """Another process holds the run directory's lock; the message names its pid."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EBUSY, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class RunLock:
    """Context manager holding the exclusive lock on `out_dir` (created if missing) until exit."""

    def __init__(self, out_dir: str | Path) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            raise RuntimeError(f"RunLock on {self.out_dir} is already held by this object")
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise IOFailure(f"cannot create the run lock {self.path}: {io_cause(e)}", e.errno) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(fd)
            os.close(fd)
            raise RunLockedError(
                f"{self.out_dir} is in use by another fastgrow process ({holder}); wait for it to finish or "
                "stop it, or choose another --train.out_dir"
            ) from None
        except OSError as e:
            os.close(fd)
            raise IOFailure(f"cannot lock {self.path}: {io_cause(e)} (a local file system is needed)", e.errno) from e
        try:
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        except OSError:  # the lock is what matters; the pid is a courtesy (e.g. a full disk)
            pass
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        with contextlib.suppress(OSError):
            fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)

    @property
    def held(self) -> bool:
        return self._fd is not None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_holder(fd: int) -> str:
    """The holder's `pid N on HOST`; a holder that has just taken the lock may not have written it yet."""
    for _ in range(20):
        try:
            text = os.pread(fd, 256, 0).decode(errors="replace").strip()
        except OSError:
            text = ""
        if text:
            return text
        time.sleep(0.01)
    return "pid unknown"
