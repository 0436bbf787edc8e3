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

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastgrow.config import GrowthConfig, RunConfig
from fastgrow.grow import apply_growth
from fastgrow.loader import BatchLoader
from fastgrow.state import TrainState, sync_device


@dataclass
class GrowthContext:
    cfg: RunConfig  # the run's config as launched
    stage: int  # index into cfg.growth
    loader: BatchLoader  # the training stream (a learning phase draws its batches here)
    evaluate: Callable[[TrainState], float]  # mean loss on the run's fixed validation batches
    device: torch.device
    # For an operator that trains (G_learn), the trainer's facilities; None offline / in tests.
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    save: Callable[[], Path] | None = None  # checkpoint the trainer's state now (data cursor included)
    should_stop: Callable[[int], bool] | None = None  # stop before step N? (SIGTERM, train(until_step=))
    emit: Callable[[dict[str, Any]], None] | None = None  # write a metrics record (train / val)
    progress: Callable[[int], None] | None = None  # advance the progress bar by N steps

    @property
    def growth(self) -> GrowthConfig:
        return self.cfg.growth[self.stage]


Handler = Callable[[TrainState, GrowthContext], TrainState]


def _grow_builtin(state: TrainState, ctx: GrowthContext) -> TrainState:
    return apply_growth(state, ctx.growth, consume=True)  # the trainer drops the old state


class GrowthPaused(Exception):
    """A handler stopped inside its event (SIGTERM, or the run's until_step reached during G_learn's
    training). The trainer ends the run as for a stop between steps and checkpoints its state, which
    carries the event's progress; a resume re-enters the event and continues it."""


def _learn(state: TrainState, ctx: GrowthContext) -> TrainState:
    from fastgrow.grow_learn_run import learn_event  # imported on use: it is the only heavy handler

    return learn_event(state, ctx)


# growth.op -> handler; ops not listed are grown by one grow() call.
EVENT_HANDLERS: dict[str, Handler] = {"learn": _learn}
# growth.op -> keys its handler adds to the growth record that the trainer's metrics line carries too.
EVENT_RECORD_KEYS: dict[str, tuple[str, ...]] = {
    "learn": ("learn_steps", "learn_tokens", "learn_flops", "learn_lr", "val_loss_learn_start"),
}


def flops_so_far(history: list[dict[str, Any]], tokens: int, flops_per_token_now: float) -> float:
    """Training FLOPs of a run that has seen `tokens` tokens: each phase at its own size (a growth
    record's flops_per_token_before counts the tokens before it), plus an operator's own training
    (G_learn: learn_tokens of the record's tokens were spent training maps, at learn_flops in all)."""
    done = 0.0
    tokens_before = 0
    for g in history:
        small = g["tokens"] - g.get("learn_tokens", 0) - tokens_before
        done += g.get("flops_per_token_before", 0.0) * small + g.get("learn_flops", 0.0)
        tokens_before = g["tokens"]
    return done + flops_per_token_now * (tokens - tokens_before)


def run_growth_event(state: TrainState, ctx: GrowthContext) -> tuple[TrainState, dict[str, Any]]:
    """Grow `state` by stage ctx.stage; return the grown state and the event's measurements
    (grow_seconds: the growth itself, without the two evaluations; val_seconds: the two evaluations;
    val_loss_before/after). The trainer's built-in operators consume `state` (grow(consume=True)):
    it must not be used after this call."""
    t0 = time.perf_counter()
    val_before = ctx.evaluate(state)
    sync_device(ctx.device)
    t1 = time.perf_counter()
    grown = EVENT_HANDLERS.get(ctx.growth.op, _grow_builtin)(state, ctx)
    sync_device(ctx.device)
    t2 = time.perf_counter()
    val_after = ctx.evaluate(grown)
    val_seconds = (t1 - t0) + (time.perf_counter() - t2)
    info = {"stage": ctx.stage, "val_loss_before": val_before, "val_loss_after": val_after}
    record = grown.growth_history[-1]
    record.update(info)
    extra = {k: record[k] for k in EVENT_RECORD_KEYS.get(ctx.growth.op, ()) if k in record}
    return grown, {**info, "grow_seconds": t2 - t1, "val_seconds": val_seconds, **extra}
