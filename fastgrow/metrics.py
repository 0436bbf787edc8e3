"""Throughput, MFU and the JSONL metrics log.

MFU convention (used everywhere in fastgrow): model FLOPs per token = 6 * N (N = all parameters except
the input embedding, which is a lookup, not a matmul) + 6 * n_layers * seq_len * (n_heads * head_dim)
for causal attention (QK^T and PV: 4 * S * d per token per layer forward, x3 for backward, halved by the
causal mask). `mfu = flops_per_token * tokens_per_s / peak`, peak = the device's dense bf16 rate.
`mfu_6n` reports the 6N-only convention next to it.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from pathlib import Path
from typing import Any

import torch

from fastgrow.fsutil import io_errors

# Dense bf16 peak FLOP/s (no sparsity), from the vendors' datasheets.
_PEAKS = (
    ("H200", 989e12),
    ("H100", 989e12),  # SXM; the PCIe card is 756e12 and reports "H100 PCIe"
    ("A100", 312e12),
    ("L40S", 362e12),
    ("A10G", 70e12),
    ("L4", 121e12),
    ("RTX 4090", 165e12),
)


def peak_flops(device: torch.device) -> float | None:
    """bf16 dense peak of `device`, or None when unknown (CPUs). FASTGROW_PEAK_FLOPS overrides."""
    env = os.environ.get("FASTGROW_PEAK_FLOPS")
    if env:
        return float(env)
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H100" in name and "PCIe" in name:
        return 756e12
    for key, peak in _PEAKS:
        if key in name:
            return peak
    return None


def mfu(flops_per_token: float, tokens_per_s: float, peak: float | None) -> float | None:
    if peak is None or not math.isfinite(tokens_per_s):
        return None
    return flops_per_token * tokens_per_s / peak


class MetricsLog:
    """Appends one JSON object per line to `path` (flushed per line, so a crash loses nothing logged).

    `records` counts the complete records in the file (those already there when opened included); a
    checkpoint stores it so a resume can cut the log back to the checkpoint (`fastgrow.resume`). A failed
    write (disk full, ...) raises IOFailure naming the file."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        with io_errors("open the metrics log", self.path):
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.records = _count_records(self.path)
            self._f = open(self.path, "a")  # noqa: SIM115 - held open for the run, closed by close()

    def write(self, record: dict[str, Any]) -> None:
        with io_errors("write", self.path):
            self._f.write(json.dumps(record, sort_keys=True) + "\n")
            self._f.flush()
        self.records += 1

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a full disk fails the last flush again; write() reported it
            self._f.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _count_records(path: Path) -> int:
    if not path.is_file():
        return 0
    n = 0
    with open(path, "rb") as f:
        for line in f:
            n += line.endswith(b"\n") and bool(line.strip())
    return n


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """The records of a metrics.jsonl, in file order, each (kind, step) once: logs of runs resumed by older
    fastgrow versions repeat the steps replayed after a checkpoint, and the later record wins (at the
    position of the first, so the order stays by step). A last line cut by a crash is skipped; a bad line
    elsewhere is an error naming it."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"metrics file not found: {p}")
    out: list[dict[str, Any]] = []
    where: dict[tuple[str, Any], int] = {}
    lines = p.read_text().split("\n")
    for i, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            if i == len(lines):
                break
            raise ValueError(f"{p}:{i}: not a JSON line") from None
        key = (rec.get("kind"), rec.get("step"))
        if key in where and key[1] is not None:
            out[where[key]] = rec
        else:
            where[key] = len(out)
            out.append(rec)
    return out
