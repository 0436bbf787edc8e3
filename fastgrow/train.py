"""The training loop: AdamW, LR schedule, clipping, accumulation, eval, checkpoints, growth, metrics.

`train(config)` runs a whole job and returns a `TrainResult`. The loop never syncs with the host except
at log/eval/checkpoint steps, and on CPU (where a sync costs nothing) to decide whether to skip a
non-finite step. On CUDA the skip happens on the device: torch's fused AdamW takes a `found_inf` flag and
leaves moments and step untouched when it is set, and a device-side counter of consecutive bad steps is
read at the next log step.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastgrow.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from fastgrow.config import ConfigError, RunConfig
from fastgrow.errors import option_error
from fastgrow.grow_event import GrowthContext, GrowthPaused, flops_so_far, run_growth_event
from fastgrow.loader import BatchLoader, TokenData
from fastgrow.metrics import MetricsLog, mfu, peak_flops
from fastgrow.model import flops_per_token
from fastgrow.optim import set_lr
from fastgrow.report import Reporter, check_reporting
from fastgrow.stages import check_stages
from fastgrow.state import TrainState, build_state, resolve_device


class TrainingAborted(RuntimeError):
    """Too many consecutive non-finite steps."""


@dataclass
class TrainResult:
    state: TrainState
    records: list[dict[str, Any]] = field(default_factory=list)
    checkpoint: Path | None = None
    interrupted: bool = False

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


class _SigtermFlag:
    """Sets a flag on SIGTERM so the loop can save a checkpoint and exit between steps."""

    def __init__(self) -> None:
        self.hit = False
        self._old = None

    def __enter__(self) -> _SigtermFlag:
        try:
            self._old = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: leave the default handler
            self._old = None
        return self

    def _handle(self, signum, frame) -> None:
        self.hit = True

    def __exit__(self, *exc: object) -> None:
        if self._old is not None:
            signal.signal(signal.SIGTERM, self._old)


def _autocast(cfg: RunConfig, device: torch.device):
    dtype = cfg.train.dtype
    if dtype == "auto":
        dtype = "bf16" if device.type == "cuda" else "fp32"
    if dtype == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def _ckpt_name(step: int) -> str:
    return f"step-{step:08d}"


def _due_stage(state: TrainState, stage_tokens: list[int]) -> int | None:
    """The growth stage due before the next step (stages done = records in growth_history), or None."""
    k = len(state.growth_history)
    return k if k < len(stage_tokens) and state.tokens >= stage_tokens[k] else None


def prepare_state(cfg: RunConfig, resume: bool, device: torch.device) -> TrainState:
    out = Path(cfg.train.out_dir)
    ckpt = latest_checkpoint(out)
    if resume:
        if ckpt is None:
            raise option_error(
                FileNotFoundError,
                lambda o: f"{o}: no complete checkpoint in {out} to resume from",
                "resume=True",
                "--resume",
            )
        return load_checkpoint(ckpt, device, config=cfg)
    if ckpt is not None:
        raise option_error(
            ConfigError,
            lambda o: (
                f"{out} already holds checkpoints (newest {ckpt.name}); pass {o} to continue that run or "
                "choose another train.out_dir"
            ),
            "resume=True",
            "--resume",
        )
    return build_state(cfg, device)


def evaluate(state: TrainState, batches: list[tuple[torch.Tensor, torch.Tensor]], cfg: RunConfig) -> float:
    model = state.model
    device = state.device
    was_training = model.training
    model.eval()
    total = torch.zeros((), device=device)
    with torch.no_grad(), _autocast(cfg, device):
        for x, y in batches:
            total += model(x.to(device, non_blocking=True), y.to(device, non_blocking=True)).float()
    model.train(was_training)
    return (total / len(batches)).item()


def train(
    cfg: RunConfig,
    *,
    resume: bool = False,
    device: torch.device | str | None = None,
    echo: bool = True,
    until_step: int | None = None,
) -> TrainResult:
    """Run (or resume) the job described by `cfg`; return the final state and the logged records.

    until_step: stop (with a checkpoint) once this many steps are done, before train.max_steps; the
    schedule still follows max_steps, so a later `resume=True` call continues the same trajectory.
    """
    check_reporting(cfg)  # a missing tensorboard/wandb package fails now, not after the model is built
    dev = resolve_device(cfg.train.device) if device is None else torch.device(device)
    data = TokenData.open(cfg.data.data_dir)
    if data.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"the data's tokenizer has {data.vocab_size} tokens but model.vocab_size is {cfg.model.vocab_size}; "
            f"set --model.vocab_size={data.vocab_size} or more"
        )
    state = prepare_state(cfg, resume, dev)
    # Every stage not yet done, checked against the live model now, not at its event.
    growth_at = check_stages(cfg, state.model.cfg, done=len(state.growth_history))
    tcfg = cfg.train
    out_dir = Path(tcfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loader = BatchLoader(
        data,
        split="train",
        batch_size=cfg.data.batch_size,
        seq_len=cfg.data.seq_len,
        val_fraction=cfg.data.val_fraction,
        seed=tcfg.seed,
    )
    if state.cursor:
        loader.load_state_dict(state.cursor)
    val_loader = BatchLoader(
        data,
        split="val",
        batch_size=cfg.data.batch_size,
        seq_len=cfg.data.seq_len,
        val_fraction=cfg.data.val_fraction,
        seed=tcfg.seed,
    )
    val_batches = val_loader.val_batches(tcfg.eval_batches)
    stop = tcfg.max_steps if until_step is None else min(until_step, tcfg.max_steps)
    runner = _Runner(cfg, state, loader, val_batches, growth_at, out_dir, data.tokenizer_path, echo, stop)
    return runner.run()


class _Runner:
    """The state of one `train()` call: the step function and the bookkeeping around it."""

    def __init__(self, cfg, state, loader, val_batches, growth_at, out_dir, tokenizer, echo, stop) -> None:
        self.cfg = cfg
        self.stop = stop
        self.state = state
        self.loader = loader
        self.val_batches = val_batches
        self.growth_at = growth_at
        self.out_dir = out_dir
        self.tokenizer = tokenizer
        self.echo = echo
        self.records: list[dict[str, Any]] = []
        self.device = state.device
        self.peak = peak_flops(self.device)
        self.tokens_per_step = cfg.data.batch_size * cfg.data.seq_len * cfg.train.grad_accum
        self._setup_model()

    # --- model-dependent setup (redone after growth) -------------------------------------------------
    def _setup_model(self) -> None:
        mcfg = self.state.model.cfg
        self.flops_tok = flops_per_token(mcfg, self.cfg.data.seq_len, include_attention=True)
        self.flops_tok_6n = flops_per_token(mcfg, self.cfg.data.seq_len, include_attention=False)
        self.params = [p for p in self.state.model.parameters() if p.requires_grad]
        self.fused = bool(self.state.optimizer.defaults.get("fused"))
        model = self.state.model
        self.forward = torch.compile(model) if self.cfg.train.compile else model
        self.state.model.train()

    # --- one optimizer step ----------------------------------------------------------------------------
    def step(self, consec_bad: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        cfg, state = self.cfg, self.state
        accum = cfg.train.grad_accum
        set_lr(state.optimizer, state.schedule.lr_at(state.step))
        loss_sum = torch.zeros((), device=self.device)
        for _ in range(accum):
            x, y = self.loader.next_batch()
            x = x.to(self.device, non_blocking=True)
            y = y.to(self.device, non_blocking=True)
            with _autocast(cfg, self.device):
                loss = self.forward(x, y)
            (loss / accum).backward()
            loss_sum += loss.detach().float()
        loss_mean = loss_sum / accum
        clip = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
        # Returns the pre-clip global norm (what we log); non-finite norms are handled below.
        gnorm = torch.nn.utils.clip_grad_norm_(self.params, clip, foreach=self.device.type == "cuda")
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
        log = MetricsLog(self.out_dir / "metrics.jsonl")
        interrupted = False
        start_step = self.state.step
        latest = latest_checkpoint(self.out_dir)
        # The checkpoint this state came from (a resume): no need to write it again if no step is taken.
        last_ckpt: Path | None = latest if latest is not None and latest.name == _ckpt_name(start_step) else None
        consec_bad = torch.full((), float(self.state.bad_steps), device=self.device)
        max_run = consec_bad.clone()
        window_loss = torch.zeros((), device=self.device)
        window_bad = torch.zeros((), device=self.device)
        window_steps = 0
        window_tokens = 0
        window_start = time.perf_counter()
        paused = 0.0  # seconds of eval/checkpointing inside the current window, kept out of tokens/s
        last_norm = torch.zeros((), device=self.device)
        self.report = Reporter(self.cfg, self.out_dir, initial_step=self.state.step, console=self.echo)
        try:
            with _SigtermFlag() as sigterm:
                self.sigterm = sigterm
                while self.state.step < self.stop:
                    due = _due_stage(self.state, self.growth_at)
                    if due is not None:
                        try:
                            while due is not None:  # stages whose token counts fall within one step
                                self._grow(log, due)
                                due = _due_stage(self.state, self.growth_at)
                        except GrowthPaused:  # stopped inside G_learn's training: checkpointed below
                            consec_bad.fill_(float(self.state.bad_steps))
                            interrupted = sigterm.hit
                            break
                        window_loss.zero_()
                        window_bad.zero_()
                        window_steps, window_tokens, window_start, paused = 0, 0, time.perf_counter(), 0.0
                    loss, gnorm, bad, consec_bad = self.step(consec_bad)
                    window_loss += torch.where(bad, torch.zeros_like(loss), loss)
                    window_bad += bad.float()
                    # Longest run of bad steps in this window, so a run that ends between log steps still
                    # aborts (on CUDA the check waits for the next log step; no per-step sync).
                    max_run = torch.maximum(max_run, consec_bad)
                    last_norm = gnorm
                    window_steps += 1
                    window_tokens += self.tokens_per_step
                    self.report.step()
                    if self.state.step % tcfg.log_every == 0 or self.state.step == self.stop:
                        if self.device.type == "cuda":
                            torch.cuda.synchronize()
                        elapsed = time.perf_counter() - window_start - paused
                        rec = self._train_record(window_loss, window_bad, window_steps, window_tokens, elapsed)
                        rec["grad_norm"] = float(last_norm)
                        self._emit(log, rec)
                        n_bad_run = int(max_run.item())
                        self.state.bad_steps = int(consec_bad.item())
                        max_run = consec_bad.clone()
                        if n_bad_run >= tcfg.max_bad_steps:
                            raise TrainingAborted(
                                f"{n_bad_run} consecutive non-finite steps (loss or grad norm) up to step "
                                f"{self.state.step}; aborting (train.max_bad_steps={tcfg.max_bad_steps}). The last "
                                f"checkpoint is {last_ckpt or latest_checkpoint(self.out_dir)}"
                            )
                        window_loss.zero_()
                        window_bad.zero_()
                        window_steps, window_tokens, window_start, paused = 0, 0, time.perf_counter(), 0.0
                    elif not self.fused and bool(consec_bad >= tcfg.max_bad_steps):
                        raise TrainingAborted(
                            f"{int(consec_bad)} consecutive non-finite steps up to step {self.state.step}; aborting "
                            f"(train.max_bad_steps={tcfg.max_bad_steps})"
                        )
                    t_pause = time.perf_counter()
                    if tcfg.eval_every and self.state.step % tcfg.eval_every == 0:
                        self._eval(log)
                    if tcfg.ckpt_every and self.state.step % tcfg.ckpt_every == 0:
                        last_ckpt = self._save(consec_bad)
                    paused += time.perf_counter() - t_pause
                    if sigterm.hit:
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
                if last_ckpt is None or last_ckpt.name != _ckpt_name(self.state.step):
                    last_ckpt = self._save(consec_bad)
        finally:
            self.report.close()
            log.close()
        if interrupted and self.echo:
            print(f"SIGTERM: saved {last_ckpt}; resume with --resume", file=sys.stderr)
        return TrainResult(state=self.state, records=self.records, checkpoint=last_ckpt, interrupted=interrupted)

    # --- pieces -----------------------------------------------------------------------------------------
    def _train_record(self, window_loss, window_bad, steps, tokens, elapsed) -> dict[str, Any]:
        state = self.state
        n_bad = int(window_bad.item())
        good = steps - n_bad
        loss = float(window_loss.item()) / good if good else float("nan")
        tps = tokens / elapsed if elapsed > 0 else float("nan")
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

    def _eval(self, log: MetricsLog) -> None:
        val = evaluate(self.state, self.val_batches, self.cfg)
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

    def _save(self, consec_bad: torch.Tensor) -> Path:
        self.state.cursor = self.loader.state_dict()
        self.state.bad_steps = int(consec_bad.item())  # a checkpoint is a sync point anyway
        return save_checkpoint(self.state, self.out_dir, keep=self.cfg.train.keep_ckpts, tokenizer=self.tokenizer)

    def _grow(self, log: MetricsLog, stage: int) -> None:
        before = self.state
        # Throughput before growth: the last few logged windows (the very first one includes warm-up).
        recent = [r["tokens_per_s"] for r in self.records if r["kind"] == "train"][1:][-5:]
        tps_before = sum(recent) / len(recent) if recent else None
        params_before = before.model.num_params()
        layers_before = before.model.cfg.n_layers
        flops_tok_before = self.flops_tok
        ctx = GrowthContext(
            cfg=self.cfg,
            stage=stage,
            loader=self.loader,
            evaluate=lambda st: evaluate(st, self.val_batches, self.cfg),
            device=self.device,
            autocast=lambda: _autocast(self.cfg, self.device),
            save=lambda: self._save(torch.full((), float(self.state.bad_steps))),
            should_stop=lambda step: step >= self.stop or self.sigterm.hit,
            emit=lambda r: self._emit(log, r),
            progress=self.report.step,
        )
        self.state, event = run_growth_event(before, ctx)
        self._setup_model()
        rec = {
            "kind": "growth",
            "step": self.state.step,
            "tokens": self.state.tokens,
            "flops": self._flops_so_far(),
            "op": self.cfg.growth[stage].op,
            "stage": stage,
            "layers_before": layers_before,
            "layers_after": self.state.model.cfg.n_layers,
            "params_before": params_before,
            "params_after": self.state.model.num_params(),
            "grow_seconds": event["grow_seconds"],
            "val_loss_before": event["val_loss_before"],
            "val_loss_after": event["val_loss_after"],
            "tokens_per_s_before": tps_before,
            "mfu_before": mfu(flops_tok_before, tps_before, self.peak) if tps_before else None,
        }
        rec.update({k: v for k, v in event.items() if k not in rec})  # an operator's own keys (G_learn's)
        self._emit(log, rec)
