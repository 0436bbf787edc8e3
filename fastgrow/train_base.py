"""What the trainer's pieces share: the result type, the abort error, the compute-dtype policy and the
validation loss (fastgrow.train runs a job, fastgrow.runner its loop; both import from here)."""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastgrow.config import RunConfig
from fastgrow.state import TrainState, sync_device


class TrainingAborted(RuntimeError):
    """Too many consecutive non-finite steps."""


@dataclass
class TrainResult:
    state: TrainState
    records: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None
    interrupted: bool = False
    stop_signal: int | None = None  # the signal (SIGINT/SIGTERM) that interrupted the run

    def summary(self) -> dict[str, Any]:
        train = [r for r in self.records if r["kind"] == "train"]
        val = [r for r in self.records if r["kind"] == "val"]
        return {
            "steps": self.state.step,
            "tokens": self.state.tokens,
            "final_loss": train[-1]["loss"] if train else None,
            "final_val_loss": val[-1]["val_loss"] if val else None,
            "tokens_per_s": _mean([r["tokens_per_s"] for r in train[1:]] or [r["tokens_per_s"] for r in train]),
            "params": self.state.model.num_params(),
            "checkpoint": str(self.checkpoint) if self.checkpoint else None,
        }


def _mean(xs: list[float]) -> float | None:
    xs = [x for x in xs if x is not None and math.isfinite(x)]
    return sum(xs) / len(xs) if xs else None


def autocast(cfg: RunConfig, device: torch.device):
    """The run's compute dtype: bf16 autocast (train.dtype bf16, or auto on CUDA), else fp32."""
    dtype = cfg.train.dtype
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class LogWindow:
    """The sums of one logging window (loss of the good steps, non-finite steps, tokens), kept on the
    device so that a step never waits for the host; read once per log step (`summary`)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.loss = torch.zeros((), device=device)
        self.bad = torch.zeros((), device=device)
        self.reset()

    def reset(self) -> None:
        self.loss.zero_()
        self.bad.zero_()
        self.steps = 0
        self.tokens = 0
        self.start = time.perf_counter()
        self.paused = 0.0  # seconds of evaluation / checkpointing inside the window, kept out of tokens/s

    def add(self, loss: torch.Tensor, bad: torch.Tensor, tokens: int) -> None:
        self.loss += torch.where(bad, torch.zeros_like(loss), loss)
        self.bad += bad.float()
        self.steps += 1
        self.tokens += tokens

    def summary(self) -> tuple[float, int, float]:
        """(mean loss of the good steps, number of skipped steps, tokens/s) of the window (a sync)."""
        sync_device(self.device)
        elapsed = time.perf_counter() - self.start - self.paused
        n_bad = int(self.bad.item())
        good = self.steps - n_bad
        loss = float(self.loss.item()) / good if good else float("nan")
        return loss, n_bad, self.tokens / elapsed if elapsed > 0 else float("nan")


def ckpt_name(step: int) -> str:
    return f"step-{step:08d}"


def evaluate(model: torch.nn.Module, batches: list[tuple[torch.Tensor, torch.Tensor]], cfg: RunConfig) -> float:
    """Mean loss of `model` on `batches`, in eval mode and the run's compute dtype (a host sync)."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    with torch.no_grad(), autocast(cfg, device):
        for x, y in batches:
            total += model(x.to(device, non_blocking=True), y.to(device, non_blocking=True)).float()
    model.train(was_training)
    return (total / len(batches)).item()
