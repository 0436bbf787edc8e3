"""TrainState: the one object that owns everything a run needs to continue.

Model, optimizer (moments and step), LR schedule, step/token counters, data cursor, growth history
and, while G_learn trains its maps, that phase. `grow()` maps a TrainState to a TrainState;
checkpoints save and restore it whole.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from fastgrow.config import RunConfig
from fastgrow.model import Transformer
from fastgrow.optim import LRSchedule, build_optimizer


@dataclass
class TrainState:
    config: RunConfig
    model: Transformer
    optimizer: torch.optim.AdamW
    schedule: LRSchedule
    step: int = 0  # optimizer steps taken (skipped non-finite steps included)
    tokens: int = 0  # training tokens consumed
    cursor: dict[str, Any] = field(default_factory=dict)  # data loader position
    growth_history: list[dict[str, Any]] = field(default_factory=list)
    bad_steps: int = 0  # consecutive non-finite steps
    # A growth operator's training in progress (fastgrow.grow_learn.LearnPhase over this small model);
    # checkpoints save and restore it, the grown state has none.
    learn: Any = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device


def resolve_device(name: str, what: str = "train.device") -> torch.device:
    """ "auto" (CUDA when there is a GPU, else the CPU) or a torch device name that this machine has.

    what: how the caller's user named the setting, for the error message (a config key or a CLI flag)."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError:
        raise ValueError(f"{what} {name!r} is not a device name (auto, cpu, cuda, cuda:N)") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"{what} {name!r}: CUDA is not available on this machine (use cpu)")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{what} {name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def sync_device(device: torch.device) -> None:
    """Wait for the device's queued kernels (for wall-clock timing); a no-op on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def build_state(config: RunConfig, device: torch.device | str | None = None) -> TrainState:
    """A fresh TrainState: model initialised from train.seed, AdamW, schedule at step 0."""
    dev = resolve_device(config.train.device) if device is None else torch.device(device)
    torch.manual_seed(config.train.seed)
    model = Transformer(config.model).to(dev)
    optimizer = build_optimizer(model, config.train)
    return TrainState(config=config, model=model, optimizer=optimizer, schedule=LRSchedule.from_config(config.train))
