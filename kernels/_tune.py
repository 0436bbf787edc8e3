"""Launch configs chosen by timing on first use: a small candidate list per key, the first one the fallback.

A kernel's launcher calls `pick(key, candidates, run)`. The first time a key is seen on a CUDA device,
every candidate is run on the real inputs (its first call compiles it), timed with CUDA events (median
of a few calls), and the fastest is cached for the process; candidates that do not fit the device
(out of shared memory / registers) are skipped. Otherwise the fallback, candidates[0], is used:
- on CPU (the Triton interpreter runs the kernels' logic, timing means nothing there),
- while a CUDA graph is being captured (no synchronising timing allowed; nothing is cached),
- with FASTGROW_TUNE=0 (runs are then reproducible bit for bit across processes: the chosen tile
  shapes change the order of floating-point sums, so two processes that tuned differently can differ
  in the last bits; within a process a key always gets the same config),
- when a key has a single candidate.
`run(cfg)` must be idempotent: it writes fresh outputs only (every kernel here does), so re-running it
for timing changes nothing. The cost is paid once per key and process: the compiles (seconds per
candidate, then cached on disk by Triton) and a few ms of timing.

`tuning_log()` returns what was chosen and measured, for benchmarks and reports.
"""

from __future__ import annotations

import os
import statistics
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar

import torch

C = TypeVar("C")

_CHOSEN: dict[Hashable, Any] = {}
_LOG: dict[Hashable, dict[str, Any]] = {}
_REPS = 5


def tuning_enabled() -> bool:
    """False when FASTGROW_TUNE=0 (use every table's fallback config)."""
    return os.environ.get("FASTGROW_TUNE", "1") not in ("0", "", "false", "no")


def _out_of_resources(e: Exception) -> bool:
    name = type(e).__name__
    return name in ("OutOfResources", "OutOfResourcesError") or "out of resource" in str(e).lower()


def _capturing() -> bool:
    return torch.cuda.is_current_stream_capturing()


def _sync(device: torch.device) -> None:
    torch.cuda.synchronize(device)


def _time_ms(fn: Callable[[], None], reps: int) -> float:
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def pick(key: Hashable, candidates: Sequence[C], run: Callable[[C], None], device: torch.device) -> C:
    """The config for `key`: the fastest candidate on first use on CUDA (cached), else candidates[0]."""
    if len(candidates) == 1 or device.type != "cuda" or not tuning_enabled():
        return candidates[0]
    hit = _CHOSEN.get(key)
    if hit is not None:
        return hit
    if _capturing():
        return candidates[0]
    times: dict[C, float] = {}
    skipped: dict[str, str] = {}
    for cfg in candidates:
        try:
            run(cfg)  # compiles on its first call, outside the timing
            _sync(device)
        except Exception as e:  # noqa: BLE001 - only resource exhaustion is expected; the rest re-raises
            if not _out_of_resources(e):
                raise
            skipped[repr(cfg)] = str(e).splitlines()[0][:200]
            continue
        times[cfg] = _time_ms(lambda c=cfg: run(c), _REPS)
    best = min(times, key=times.__getitem__) if times else candidates[0]
    _CHOSEN[key] = best
    _LOG[key] = {
        "chosen": repr(best),
        "fallback": repr(candidates[0]),
        "times_ms": {repr(c): t for c, t in times.items()},
        "skipped": skipped,
    }
    return best


def tuning_log() -> dict[str, dict[str, Any]]:
    """{str(key): {"chosen", "fallback", "times_ms" per candidate, "skipped"}} of this process's tuning."""
    return {repr(k): dict(v) for k, v in _LOG.items()}


def reset() -> None:
    """Forget every choice (tests; a benchmark that wants to re-tune)."""
    _CHOSEN.clear()
    _LOG.clear()


def length_bucket(n: int) -> int:
    """Sequence lengths grouped by powers of two from 256 to 16384 (one tuned config per bucket)."""
    b = 256
    while b < n and b < 16384:
        b *= 2
    return b
