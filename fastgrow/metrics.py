"""Throughput, MFU and the JSONL metrics log.

MFU convention (used everywhere in fastgrow): model FLOPs per token = 6 * N (N = all parameters except
the input embedding, which is a lookup, not a matmul) + 6 * n_layers * seq_len * (n_heads * head_dim)
for causal attention (QK^T and PV: 4 * S * d per token per layer forward, x3 for backward, halved by the
causal mask). `mfu = flops_per_token * tokens_per_s / peak`, peak = the device's dense bf16 rate.
`mfu_6n` reports the 6N-only convention next to it.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import torch

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
    """Appends one JSON object per line to `path` (flushed per line, so a crash loses nothing logged)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a")  # noqa: SIM115 - held open for the run, closed by close()

    def write(self, record: dict[str, Any]) -> None:
        self._f.write(json.dumps(record, sort_keys=True) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self) -> MetricsLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"metrics file not found: {p}")
    out = []
    for i, line in enumerate(p.read_text().splitlines(), 1):
        if line.strip():
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                raise ValueError(f"{p}:{i}: not a JSON line") from None
    return out
