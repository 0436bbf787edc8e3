"""The training loop of one `train()` call (fastgrow.train builds it): the step, the logging windows,
evaluation, checkpoints, stop signals, and growth (fastgrow.runner_growth).

The loop never syncs with the host except at log/eval/checkpoint steps, and on CPU (where a sync costs
nothing) to decide whether to skip a non-finite step. On CUDA the skip happens on the device: torch's
fused AdamW takes a `found_inf` flag and leaves moments and step untouched when it is set, and a
device-side counter of consecutive bad steps is read at the next log step.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path
from typing import Any

import torch

from fastgrow import distributed
from fastgrow.checkpoint import latest_checkpoint, save_checkpoint
from fastgrow.grow_event import GrowthPaused, flops_so_far
from fastgrow.interrupts import StopSignals
from fastgrow.loader import batch_split, shard_val_batches
from fastgrow.metrics import MetricsLog, mfu, peak_flops
from fastgrow.model import flops_per_token
from fastgrow.optim import set_lr
from fastgrow.regional import compile_regions, uncompile_regions
from fastgrow.report import Reporter
from fastgrow.runner_growth import RunnerGrowth
from fastgrow.state import TrainState
from fastgrow.train_base import LogWindow, TrainingAborted, TrainResult, autocast, ckpt_name, evaluate


def due_stage(state: TrainState, stage_tokens: list[int]) -> int | None:
    """The growth stage due before the next step (stages done = records in growth_history), or None."""
    k = len(state.growth_history)
    return k if k < len(stage_tokens) and state.tokens >= stage_tokens[k] else None


class NoLog:
    """The metrics log of ranks other than 0: they write nothing."""

    records: int | None = None

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


class Runner(RunnerGrowth):
    """The state of one `train()` call: the step function and the bookkeeping around it."""

    def __init__(self, cfg, state, loader, val_batches, growth_at, out_dir, tokenizer, echo, stop, ctx) -> None:
        self.cfg = cfg
        self.stop = stop
        self.state = state
        self.loader = loader
        self.ctx = ctx
        self.split = batch_split(cfg.data.batch_size, cfg.train.grad_accum, ctx.world_size)
        self.sync = distributed.StepSync(ctx)
        self.stop_signal: StopSignals | None = None
        # Under torchrun each rank evaluates its slice of the fixed validation windows.
        self.val_batches = shard_val_batches(val_batches, ctx.rank, ctx.world_size) if ctx.enabled else val_batches
        self.growth_at = growth_at
        self.out_dir = out_dir
        self.tokenizer = tokenizer
        self.echo = echo
        self.records: list[dict[str, Any]] = []
        self.device = state.device
        self.peak = peak_flops(self.device)
        if self.peak is not None:
            self.peak *= ctx.world_size  # MFU against every rank's device (tokens/s counts all ranks)
        self.tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.train.grad_accum
        self.log: MetricsLog | None = None
        self.ckpt_pending = False  # a checkpoint was due during a non-finite streak: write it after
        self.pending_growth = []
        self.stall_start = 0.0
        self._setup_model()

    # --- model-dependent setup (redone after growth) -------------------------------------------------
    def _setup_model(self, old: torch.nn.Module | None = None) -> None:
        """Set the step up for the live model; `old`: the model it replaces (after growth)."""
        mcfg = self.state.model.cfg
        self.flops_tok = flops_per_token(mcfg, self.cfg.data.seq_len, include_attention=True)
        self.flops_tok_6n = flops_per_token(mcfg, self.cfg.data.seq_len, include_attention=False)
        self.params = [p for p in self.state.model.parameters() if p.requires_grad]
        self.fused = bool(self.state.optimizer.defaults.get("fused"))
        if self.cfg.train.compile:  # per block and head: a depth growth compiles nothing (fastgrow.regional)
            if old is not None:
                uncompile_regions(old)
            compile_regions(self.state.model)
        self.forward = distributed.forward_module(self.state.model, self.ctx)  # DDP's wrapper, or the model
        self.state.model.train()

    # --- one optimizer step ----------------------------------------------------------------------------
    def step(self, consec_bad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg, state = self.cfg, self.state
        set_lr(state.optimizer, state.schedule.lr_at(state.step))
        loss_sum = torch.zeros((), device=self.device)
        # This rank's micro-batches of the global batch (one process: grad_accum batches of batch_size).
        batches = self.loader.next_step(self.split, self.ctx.rank)
        accum = len(batches)
        for i, (x, y) in enumerate(batches):
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            with distributed.grad_sync(self.forward, self.ctx, sync=i == accum - 1):
                with autocast(cfg, self.device):
                    loss = self.forward(x, y)
                (loss / accum).backward()
            loss_sum += loss.detach().float()
        # The global mean loss on every rank (an all-reduce, which also carries the stop signals).
        received = self.stop_signal.signum if self.stop_signal is not None else None
        loss_mean = self.sync.reduce(loss_sum / accum, received)
        clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        # Returns the pre-clip global norm (what we log); non-finite norms are handled below.
        gnorm = distributed.clip_grad_norm(self.params, clip, foreach=self.device.type == "cuda")
        bad = ~(torch.isfinite(gnorm) & torch.isfinite(loss_mean))
        if self.fused:
            # Device-side skip: fused AdamW leaves exp_avg/exp_avg_sq/step untouched when found_inf is 1.
            state.optimizer.found_inf = bad.float()
            state.optimizer.step()
            del state.optimizer.found_inf
        elif not bool(bad):  # CPU: a sync is free
            state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        consec_bad = (consec_bad + 1) * bad  # consecutive non-finite steps, reset by a good one
        state.step += 1
        state.tokens += self.tokens_per_step
        return loss_mean, gnorm.detach().float(), bad, consec_bad

    # --- the loop ---------------------------------------------------------------------------------------
    def run(self) -> TrainResult:
        tcfg = self.cfg.train
        log = self.log = MetricsLog(self.out_dir / "metrics.jsonl") if self.ctx.is_main else NoLog()
        interrupted = False
        start_step = self.state.step
        latest = latest_checkpoint(self.out_dir)
        # The checkpoint this state came from (a resume): no need to write it again if no step is taken.
        last_ckpt: Path | None = latest if latest is not None and latest.name == ckpt_name(start_step) else None
        consec_bad = torch.full((), float(self.state.bad_steps), device=self.device)
        max_run = consec_bad.clone()
        window = LogWindow(self.device)
        last_norm = torch.zeros((), device=self.device)
        self.report = Reporter(
            self.cfg, self.out_dir, initial_step=self.state.step, console=self.echo, enabled=self.ctx.is_main
        )
        try:
            stop_by: int | None = None  # the signal that stopped the run (under torchrun: any rank's)
            with StopSignals(self.echo) as stop_signal:
                self.stop_signal = stop_signal
                while self.state.step < self.stop:
                    due = due_stage(self.state, self.growth_at)
                    if due is not None:
                        try:
                            while due is not None:  # stages whose token counts fall within one step
                                self.grow_stage(log, due)
                                due = due_stage(self.state, self.growth_at)
                        except GrowthPaused:  # stopped inside G_learn's training: checkpointed below
                            self.growth_step_done(log, stepped=False)  # an earlier stage of this step
                            consec_bad.fill_(float(self.state.bad_steps))
                            stop_by = stop_signal.signum
                            interrupted = stop_by is not None
                            break
                        window.reset()
                    loss, gnorm, bad, consec_bad = self.step(consec_bad)
                    self.growth_step_done(log)  # the records of a growth before this step, with its stall
                    window.add(loss, bad, self.tokens_per_step)
                    # Longest run of bad steps in this window, so a run that ends between log steps still
                    # aborts (on CUDA the check waits for the next log step; no per-step sync).
                    max_run = torch.maximum(max_run, consec_bad)
                    last_norm = gnorm
                    self.report.step()
                    if self.state.step % tcfg.log_every == 0 or self.state.step == self.stop:
                        rec = self._train_record(*window.summary())
                        rec["grad_norm"] = float(last_norm)
                        self._emit(log, rec)
                        n_bad_run = int(max_run.item())
                        self.state.bad_steps = int(consec_bad.item())
                        max_run = consec_bad.clone()
                        if n_bad_run >= tcfg.max_bad_steps:
                            raise TrainingAborted(
                                f"{n_bad_run} consecutive non-finite steps (loss or grad norm) up to step "
                                f"{self.state.step}; aborting (train.max_bad_steps={tcfg.max_bad_steps}). "
                                + self._last_good(last_ckpt)
                            )
                        window.reset()
                    elif not self.fused and bool(consec_bad >= tcfg.max_bad_steps):
                        raise TrainingAborted(
                            f"{int(consec_bad)} consecutive non-finite steps up to step {self.state.step}; aborting "
                            f"(train.max_bad_steps={tcfg.max_bad_steps}). " + self._last_good(last_ckpt)
                        )
                    t_pause = time.perf_counter()
                    if tcfg.eval_every and self.state.step % tcfg.eval_every == 0:
                        self._eval(log)
                    if (tcfg.ckpt_every and self.state.step % tcfg.ckpt_every == 0) or self.ckpt_pending:
                        last_ckpt = self._save(consec_bad) or last_ckpt
                    window.paused += time.perf_counter() - t_pause
                    stop_by = self.sync.should_stop(stop_signal.signum)  # under torchrun: any rank's, agreed
                    if stop_by is not None:
                        interrupted = True
                        break
                finished = self.state.step >= tcfg.max_steps
                stepped = self.state.step > start_step
                if (
                    finished
                    and stepped
                    and not interrupted
                    and (not tcfg.eval_every or self.state.step % tcfg.eval_every)
                ):
                    self._eval(log)
                if last_ckpt is None or last_ckpt.name != ckpt_name(self.state.step):
                    last_ckpt = self._save(consec_bad) or last_ckpt
        finally:
            self.report.close()
            log.close()
        if interrupted and self.echo:
            saved = last_ckpt is not None and last_ckpt.name == ckpt_name(self.state.step)
            what = f"saved {last_ckpt}" if saved else f"not saved (non-finite steps); {self._last_good(last_ckpt)}"
            print(f"{signal.Signals(stop_by).name}: {what}; resume with --resume", file=sys.stderr)
        return TrainResult(
            state=self.state,
            records=self.records,
            checkpoint=last_ckpt,
            interrupted=interrupted,
            stop_signal=stop_by,
        )

    # --- pieces -----------------------------------------------------------------------------------------
    def _train_record(self, loss: float, n_bad: int, tps: float) -> dict[str, Any]:
        """The train record of a logging window (LogWindow.summary())."""
        state = self.state
        return {
            "kind": "train",
            "step": state.step,
            "tokens": state.tokens,
            "flops": self._flops_so_far(),
            "loss": loss,
            "lr": state.schedule.lr_at(state.step - 1),
            "tokens_per_s": tps,
            "mfu": mfu(self.flops_tok, tps, self.peak),
            "mfu_6n": mfu(self.flops_tok_6n, tps, self.peak),
            "skipped_steps": n_bad,
            "layers": state.model.cfg.n_layers,
        }

    def _flops_so_far(self) -> float:
        """Training FLOPs spent so far, counting each phase (before/after growth) at its own size."""
        return flops_so_far(self.state.growth_history, self.state.tokens, self.flops_tok)

    def _emit(self, log: MetricsLog, rec: dict[str, Any]) -> None:
        self.records.append(rec)
        log.write(rec)
        self.report.record(rec)

    def _val_loss(self, state: TrainState) -> float:
        """Mean loss on the fixed validation batches (under torchrun: each rank its slice, all-reduced)."""
        if self.ctx.enabled:
            amp = lambda: autocast(self.cfg, self.device)  # noqa: E731
            return distributed.sharded_mean_loss(state.model, self.val_batches, self.ctx, amp)
        return evaluate(state.model, self.val_batches, self.cfg)

    def _eval(self, log: MetricsLog) -> None:
        val = self._val_loss(self.state)
        self._emit(
            log,
            {
                "kind": "val",
                "step": self.state.step,
                "tokens": self.state.tokens,
                "flops": self._flops_so_far(),
                "val_loss": val,
            },
        )

    def _save(self, consec_bad: torch.Tensor) -> Path | None:
        """Write a checkpoint, unless the run is in a non-finite streak (its weights may have blown up):
        then None, and the checkpoint is written at the first good step after the streak."""
        bad_steps = int(consec_bad.item())  # a checkpoint is a sync point anyway
        self.ckpt_pending = bad_steps > 0
        if self.ckpt_pending:
            return None
        self.state.cursor = self.loader.state_dict()
        self.state.bad_steps = bad_steps
        keep = self.cfg.train.keep_ckpts
        records = self.log.records if self.log is not None else None
        if self.ctx.enabled:
            from fastgrow.checkpoint_dcp import save_run_checkpoint

            return save_run_checkpoint(
                self.state, self.out_dir, keep, tokenizer=self.tokenizer, ctx=self.ctx, metrics_records=records
            )
        return save_checkpoint(self.state, self.out_dir, keep=keep, tokenizer=self.tokenizer, metrics_records=records)

    def _last_good(self, last_ckpt: Path | None) -> str:
        good = last_ckpt or latest_checkpoint(self.out_dir)
        return f"The last good checkpoint is {good}" if good else "No checkpoint was written"
