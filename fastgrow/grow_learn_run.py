"""G_learn in a run (the trainer's growth event for `growth.op = "learn"`) and offline (`fastgrow grow --op
learn`, which then needs the data to learn on).

In a run, the stage's event (fastgrow.grow_event) measures val_loss_before on the small model, then this
handler builds a `LearnPhase` (maps at G_stack + width direct), evaluates the untrained expansion
(`val_loss_learn_start`, G_stack's loss), and trains the maps for learn_steps steps on the run's training
stream: every learn step is a step of the run (train.grad_accum batches from the trainer's loader, so the
data cursor advances and the tokens are counted; state.step and state.tokens move on). It logs `train`
records (with `"phase": "learn"`) every train.log_every steps and the expansion's `val` loss every
train.eval_every steps, checkpoints every train.ckpt_every steps (the small model, its optimizer, the
cursor and the phase: maps and their Adam state, see fastgrow.checkpoint), and stops inside the phase
when the trainer must stop (SIGTERM, train(until_step=)) by raising GrowthPaused after which the trainer
checkpoints; a resume re-enters the event and continues the phase where it stopped, bit for bit on the
CPU. Then the grown state is materialised and the event measures val_loss_after.

The growth record (and the trainer's metrics line) carries learn_steps, learn_tokens, learn_flops
(`learn_flops_per_step` per step: the large model's forward + backward on the step's tokens plus the
expansion's), learn_lr and val_loss_learn_start; the run's `flops` counts the learning steps at that cost.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import torch

from fastgrow.grow import GrowPlan, plan_from_config
from fastgrow.grow_event import GrowthContext, GrowthPaused, flops_so_far
from fastgrow.grow_learn import (
    DEFAULT_LEARN_LR,
    DEFAULT_LEARN_STEPS,
    LearnPhase,
    check_learn_settings,
    learn_flops_per_step,
    resolve_learn_plan,
)
from fastgrow.metrics import mfu, peak_flops
from fastgrow.model import flops_per_token
from fastgrow.stages import learn_steps
from fastgrow.state import TrainState
from fastgrow.train_base import LogWindow, TrainingAborted, autocast, evaluate

__all__ = ["learn_checkpoint", "learn_event", "run_learn"]


def learn_event(state: TrainState, ctx: GrowthContext) -> TrainState:
    """The growth event handler of op "learn" (registered in fastgrow.grow_event.EVENT_HANDLERS)."""
    g = ctx.growth
    plan = plan_from_config(g, state.model.cfg)
    return run_learn(state, ctx, plan, learn_steps(g), g.learn_lr or DEFAULT_LEARN_LR)


def run_learn(state: TrainState, ctx: GrowthContext, plan: GrowPlan, steps: int, lr: float) -> TrainState:
    """Train G_learn's maps on ctx.loader (continuing `state.learn` if the state carries one) and return
    the grown state. `state` (the small model's) is advanced in place: step, tokens, bad_steps, learn."""
    tcfg = state.config.train
    tps = state.config.tokens_per_step
    phase: LearnPhase | None = state.learn
    if phase is None:
        phase = LearnPhase(state, plan, steps=steps, lr=lr)
        r = phase.resolved
        phase.info = {
            "stage": ctx.stage,
            "start_step": state.step,
            "tokens": 0,
            "flops_start": flops_so_far(
                state.growth_history, state.tokens, flops_per_token(r.src, state.config.data.seq_len)
            ),
            "flops_per_step": learn_flops_per_step(r.src, r.dst, state.config.data.seq_len, tps),
            "val_loss_learn_start": ctx.evaluate(_expanded_state(state, phase)),
        }
        state.learn = phase
    info = phase.info
    dev = state.device
    peak = peak_flops(dev)
    flops_tok = info["flops_per_step"] / tps
    consec = torch.full((), float(state.bad_steps), device=dev)
    max_run = consec.clone()
    window = LogWindow(dev)
    gnorm = torch.zeros((), device=dev)
    while not phase.finished:
        if ctx.should_stop is not None and ctx.should_stop(state.step):
            state.bad_steps = int(consec.item())
            raise GrowthPaused(f"stopped at step {state.step}, after {phase.done} of {phase.steps} G_learn steps")
        micro = []
        for _ in range(tcfg.grad_accum):
            x, y = ctx.loader.next_batch()
            micro.append((x.to(dev, non_blocking=True), y.to(dev, non_blocking=True)))
        loss, gnorm, bad = phase.train_step(micro, ctx.autocast)
        state.step += 1
        state.tokens += tps
        info["tokens"] += tps
        consec = (consec + 1) * bad
        max_run = torch.maximum(max_run, consec)
        window.add(loss, bad, tps)
        if ctx.progress is not None:
            ctx.progress(1)
        if state.step % tcfg.log_every == 0 or phase.finished:
            mean_loss, n_bad, tok_s = window.summary()
            _emit(
                ctx,
                {
                    "kind": "train",
                    "phase": "learn",
                    "step": state.step,
                    "tokens": state.tokens,
                    "flops": info["flops_start"] + phase.done * info["flops_per_step"],
                    "loss": mean_loss,
                    "lr": phase.lr,
                    "tokens_per_s": tok_s,
                    "mfu": mfu(flops_tok, tok_s, peak),
                    "mfu_6n": None,
                    "skipped_steps": n_bad,
                    "layers": phase.resolved.dst.n_layers,
                    "grad_norm": float(gnorm),
                },
            )
            run = int(max_run.item())
            max_run = consec.clone()
            if run >= tcfg.max_bad_steps:
                raise TrainingAborted(
                    f"{run} consecutive non-finite G_learn steps up to step {state.step}; aborting "
                    f"(train.max_bad_steps={tcfg.max_bad_steps})"
                )
            window.reset()
        t_pause = time.perf_counter()  # evaluation and checkpoints are kept out of tokens/s
        if tcfg.eval_every and state.step % tcfg.eval_every == 0:
            _emit(
                ctx,
                {
                    "kind": "val",
                    "phase": "learn",
                    "step": state.step,
                    "tokens": state.tokens,
                    "flops": info["flops_start"] + phase.done * info["flops_per_step"],
                    "val_loss": ctx.evaluate(_expanded_state(state, phase)),
                },
            )
        if tcfg.ckpt_every and state.step % tcfg.ckpt_every == 0 and ctx.save is not None:
            state.bad_steps = int(consec.item())
            ctx.save()
        window.paused += time.perf_counter() - t_pause
    state.bad_steps = int(consec.item())
    grown = phase.materialise()
    grown.growth_history[-1].update(
        learn_steps=phase.done,
        learn_tokens=info["tokens"],
        learn_flops=phase.done * info["flops_per_step"],
        learn_lr=phase.lr,
        val_loss_learn_start=info["val_loss_learn_start"],
    )
    return grown


def _expanded_state(state: TrainState, phase: LearnPhase) -> TrainState:
    """A view of `state` whose model is the phase's current expansion (for the run's evaluate())."""
    return dataclasses.replace(state, model=phase.as_model(), learn=None)


def _emit(ctx: GrowthContext, rec: dict[str, Any]) -> None:
    if ctx.emit is not None:
        ctx.emit(rec)


def learn_checkpoint(
    in_path: str | Path,
    out_path: str | Path,
    plan: GrowPlan,
    data_dir: str | Path | None,
    *,
    steps: int = DEFAULT_LEARN_STEPS,
    lr: float = DEFAULT_LEARN_LR,
    device: str | torch.device = "cpu",
    keep: int = 2,
) -> Path:
    """G_learn on a checkpoint on disk: learn on the run's training stream from the checkpoint's data
    cursor (data_dir holds the run's prepared data; its settings are the checkpoint's run config), then
    save the grown state into out_path, as a run that grew by G_learn at that step would have it (step,
    tokens and cursor advanced by the learn steps, the growth record with val_loss_before / after on
    the run's validation batches). Returns the written step directory."""
    from fastgrow.checkpoint import load_checkpoint
    from fastgrow.grow_cli import caller_rng_kept, checked_paths, save_grown  # as `fastgrow grow`
    from fastgrow.loader import BatchLoader, TokenData

    if data_dir is None:
        raise ValueError("fastgrow grow --op learn needs --data DIR: G_learn trains its maps on the training data")
    src, out = checked_paths(in_path, out_path)
    with caller_rng_kept():
        state = load_checkpoint(src, device, restore_rng=True)
        if state.learn is not None:
            raise ValueError(f"{src} was saved during a G_learn phase: resume that run to finish it")
        cfg = state.config
        check_learn_settings(steps, lr)  # before any data is read
        resolve_learn_plan(plan, state.model.cfg)
        data = TokenData.open(data_dir)
        loader = BatchLoader.for_run(data, cfg, "train")
        if state.cursor:
            loader.load_state_dict(state.cursor)
        val = BatchLoader.for_run(data, cfg, "val").val_batches(cfg.train.eval_batches)
        dev = state.device
        ctx = GrowthContext(
            cfg=cfg,
            stage=len(state.growth_history),
            loader=loader,
            evaluate=lambda st: evaluate(st.model, val, cfg),
            device=dev,
            autocast=lambda: autocast(cfg, dev),
        )
        before = ctx.evaluate(state)
        grown = run_learn(state, ctx, plan, steps, lr)
        grown.growth_history[-1].update(val_loss_before=before, val_loss_after=ctx.evaluate(grown))
        grown.cursor = loader.state_dict()
        return save_grown(grown, src, out, keep)
