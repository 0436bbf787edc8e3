"""AdamW with decay / no-decay parameter groups, and the learning-rate schedule.

The schedule is a small serialisable object (not a torch LRScheduler) so that growth can change it
(`continue`, `rewarm`, `restart`) and a checkpoint can store it as JSON.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
from torch import nn

from fastgrow.config import TrainConfig


def decays(name: str, p: torch.Tensor) -> bool:
    """Weight decay applies to matrices (linear weights, embeddings), not to norm gains."""
    return p.dim() >= 2


def param_groups(
    model: nn.Module, weight_decay: float, named: list[tuple[str, torch.Tensor]] | None = None
) -> list[dict]:
    """named: the model's named_parameters() when the caller has them already (grow())."""
    decay, no_decay = [], []
    for name, p in model.named_parameters() if named is None else named:
        if p.requires_grad:
            (decay if decays(name, p) else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "group": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "group": "no_decay"},
    ]


def build_optimizer(
    model: nn.Module, cfg: TrainConfig, named: list[tuple[str, torch.Tensor]] | None = None
) -> torch.optim.AdamW:
    """AdamW over `model` (torch's fused implementation on CUDA, the single-tensor one on CPU).

    The CPU path uses foreach=False so results are bitwise reproducible across processes. named: as
    for param_groups.
    """
    on_cuda = next(model.parameters()).is_cuda
    kwargs = {"fused": True} if on_cuda else {"foreach": False}
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay, named),
        lr=cfg.lr,
        betas=(cfg.beta1, cfg.beta2),
        eps=cfg.eps,
        **kwargs,
    )


@dataclass
class LRSchedule:
    """Warmup then cosine / constant / WSD decay, with the state growth may change.

    The schedule is a function of the position pos = step - offset: warmup over warmup_steps, then
    decay from peak_lr to min_lr by pos = horizon (0: the end of the run, total_steps - offset), then
    min_lr. Growth (fastgrow.grow) changes it per stage:
    offset: a `restart` sets it to the growth step, so the schedule starts over (warmup included); a
    `jump` to step J of the target's schedule sets it to growth step - J (negative when it jumps ahead).
    peak_lr/min_lr/warmup_steps/horizon: a `restart` may give the grown phase its own.
    rewarm_start/rewarm_steps: a `rewarm` (or a `jump`) ramps linearly from ~0 to the scheduled LR over
    that many steps from rewarm_start, without moving the schedule itself.
    """

    peak_lr: float
    min_lr: float
    warmup_steps: int
    total_steps: int
    kind: str = "cosine"
    decay_fraction: float = 0.2
    offset: int = 0
    rewarm_start: int = -1
    rewarm_steps: int = 0
    horizon: int = 0

    @classmethod
    def from_config(cls, cfg: TrainConfig) -> LRSchedule:
        return cls(
            peak_lr=cfg.lr,
            min_lr=cfg.min_lr,
            warmup_steps=cfg.warmup_steps,
            total_steps=cfg.max_steps,
            kind=cfg.schedule,
            decay_fraction=cfg.decay_fraction,
        )

    def scheduled(self, step: int) -> float:
        pos = step - self.offset
        horizon = self.horizon or max(1, self.total_steps - self.offset)
        if pos < self.warmup_steps:
            return self.peak_lr * (pos + 1) / self.warmup_steps
        if self.kind == "constant":
            return self.peak_lr
        if self.kind == "wsd":
            decay_steps = max(1, int(round(self.decay_fraction * horizon)))
            start = horizon - decay_steps
            if pos < start:
                return self.peak_lr
            frac = min(1.0, (pos - start) / decay_steps)
            return self.peak_lr + frac * (self.min_lr - self.peak_lr)
        # cosine
        span = max(1, horizon - self.warmup_steps)
        frac = min(1.0, (pos - self.warmup_steps) / span)
        return self.min_lr + 0.5 * (self.peak_lr - self.min_lr) * (1.0 + math.cos(math.pi * frac))

    def lr_at(self, step: int) -> float:
        lr = self.scheduled(step)
        if self.rewarm_steps > 0 and self.rewarm_start >= 0:
            k = step - self.rewarm_start
            if 0 <= k < self.rewarm_steps:
                lr *= (k + 1) / self.rewarm_steps
        return lr

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_state_dict(cls, d: dict) -> LRSchedule:
        return cls(**d)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
