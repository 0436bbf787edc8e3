"""The trainer's growth event: validation loss before, growth, validation loss after, the record.

`run_growth_event(state, ctx)` is what `fastgrow.train` calls when a stage's token count is reached.
The built-in operators are one `grow()` call (`fastgrow.grow.apply_growth`). An operator that needs
more than that, such as a learning phase that trains growth maps on the training stream before the
grown model is materialised, registers a handler in `EVENT_HANDLERS` under its `growth.op`: it gets
the live state and the context (the stage's config, the training batch loader, the device, the
validation-loss function) and returns the grown state, whose last `growth_history` record it may
extend with its own keys.

Every growth record gets `stage`, `val_loss_before` and `val_loss_after`: the validation loss on the
run's fixed validation batches right before and right after growth, before any step of the grown
model (the loss jump a user reads, and what the tests use to check function preservation).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from fastgrow.config import GrowthConfig, RunConfig
from fastgrow.grow import apply_growth
from fastgrow.loader import BatchLoader
from fastgrow.state import TrainState


@dataclass
class GrowthContext:
    cfg: RunConfig  # the run's config as launched
    stage: int  # index into cfg.growth
    loader: BatchLoader  # the training stream (a learning phase draws its batches here)
    evaluate: Callable[[TrainState], float]  # mean loss on the run's fixed validation batches
    device: torch.device

    @property
    def growth(self) -> GrowthConfig:
        return self.cfg.growth[self.stage]


Handler = Callable[[TrainState, GrowthContext], TrainState]


def _grow_builtin(state: TrainState, ctx: GrowthContext) -> TrainState:
    return apply_growth(state, ctx.growth)


# growth.op -> handler; ops not listed are grown by one grow() call.
EVENT_HANDLERS: dict[str, Handler] = {}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_growth_event(state: TrainState, ctx: GrowthContext) -> tuple[TrainState, dict[str, Any]]:
    """Grow `state` by stage ctx.stage; return the grown state and the event's measurements
    (grow_seconds: the growth itself, without the two evaluations; val_loss_before/after)."""
    val_before = ctx.evaluate(state)
    _sync(ctx.device)
    t0 = time.perf_counter()
    grown = EVENT_HANDLERS.get(ctx.growth.op, _grow_builtin)(state, ctx)
    _sync(ctx.device)
    seconds = time.perf_counter() - t0
    val_after = ctx.evaluate(grown)
    info = {"stage": ctx.stage, "val_loss_before": val_before, "val_loss_after": val_after}
    grown.growth_history[-1].update(info)
    return grown, {**info, "grow_seconds": seconds}
