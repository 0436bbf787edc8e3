"""A training job: AdamW, LR schedule, clipping, accumulation, eval, checkpoints, growth, metrics.

`train(config)` runs a whole job and returns a `TrainResult`: it takes the run directory's lock, checks
the data, builds or resumes the state and hands it to the loop (fastgrow.runner; growth inside it:
fastgrow.runner_growth; `train.compile`: fastgrow.regional).

Under torchrun (several processes, `fastgrow.distributed`) every rank runs this loop on its slice of each
global batch; only rank 0 writes metrics, the progress bar and the console, and checkpoints are written
by all ranks together (`fastgrow.checkpoint_dcp`).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from fastgrow import distributed
from fastgrow.checkpoint import clean_leftovers, load_checkpoint, step_dirs
from fastgrow.config import ConfigError, RunConfig
from fastgrow.errors import option_error
from fastgrow.loader import BatchLoader, TokenData, batch_split
from fastgrow.report import check_reporting
from fastgrow.resume import checkpoint_to_resume, rewind_metrics
from fastgrow.runlock import RunLock
from fastgrow.runner import Runner
from fastgrow.stages import check_stages
from fastgrow.state import TrainState, build_state

# Re-exported: what callers import from here (the CLI, the study, the tests).
from fastgrow.train_base import TrainingAborted, TrainResult

__all__ = ["TrainResult", "TrainingAborted", "prepare_state", "train"]


def _checkpoint_to_resume(out: Path, resume: bool, resume_from: str | None, echo: bool) -> Path | None:
    """The checkpoint a resume starts from (verified; never a silent fall back), or None for a fresh run
    (then the run directory must hold no step folder). The metrics log is cut back to the checkpoint."""
    metrics = out / "metrics.jsonl"
    if resume or resume_from is not None:
        ckpt = checkpoint_to_resume(out, resume_from, echo=echo)
        rewind_metrics(metrics, ckpt)  # the steps after the checkpoint are logged again
        return ckpt
    existing = step_dirs(out)
    if existing:
        raise option_error(
            ConfigError,
            lambda o: (
                f"{out} already holds checkpoints (newest {existing[-1].name}); pass {o} to continue that run or "
                "choose another train.out_dir"
            ),
            "resume=True",
            "--resume",
        )
    if metrics.is_file():  # a run that died before its first checkpoint: keep its log, start a new one
        metrics.replace(metrics.with_name("metrics.jsonl.old"))
    return None


def prepare_state(
    cfg: RunConfig,
    resume: bool,
    device: torch.device,
    ctx: distributed.DistContext | None = None,
    resume_from: str | None = None,
    echo: bool = True,
) -> TrainState:
    out = Path(cfg.train.out_dir)
    if ctx is None or not ctx.enabled:
        ckpt = _checkpoint_to_resume(out, resume, resume_from, echo)
        return build_state(cfg, device) if ckpt is None else load_checkpoint(ckpt, device, config=cfg, verify=False)
    # torchrun: rank 0 reads the run directory, every rank starts from what it found.
    from fastgrow.checkpoint_dcp import load_parallel_state

    def find() -> Path | None:
        return _checkpoint_to_resume(out, resume, resume_from, echo) if ctx.is_main else None

    ckpt = ctx.broadcast(ctx.agree(find))
    if ckpt is None:
        return ctx.agree(lambda: distributed.build_parallel_state(cfg, ctx))
    return load_parallel_state(ckpt, cfg, ctx, verify=False)  # find() verified it


def train(
    cfg: RunConfig,
    *,
    resume: bool = False,
    resume_from: str | None = None,
    device: torch.device | str | None = None,
    echo: bool = True,
    until_step: int | None = None,
) -> TrainResult:
    """Run (or resume) the job described by `cfg`; return the final state and the logged records.

    resume_from: resume from this checkpoint of train.out_dir (`step-N` or N) instead of the newest.
    until_step: stop (with a checkpoint) once this many steps are done, before train.max_steps; the
    schedule still follows max_steps, so a later `resume=True` call continues the same trajectory.
    The run holds the lock of train.out_dir throughout (a second run on it is refused at once). Under
    torchrun every rank calls this (see fastgrow.distributed); rank 0 holds the lock.
    """
    check_reporting(cfg)  # a missing tensorboard/wandb package fails now, not after the model is built
    with distributed.session(cfg, device) as ctx:
        data = ctx.agree(lambda: _open_run(cfg, ctx, echo and ctx.is_main))
        state = prepare_state(cfg, resume, ctx.device, ctx, resume_from, echo and ctx.is_main)
        runner = ctx.agree(lambda: _runner(cfg, ctx, state, data, echo and ctx.is_main, until_step))
        return ctx.guarded(runner.run)


def _open_run(cfg: RunConfig, ctx: distributed.DistContext, echo: bool) -> TokenData:
    """The lock and the checks before any state is built (each rank; agreed on by all). The lock comes
    first: a second run on the directory is refused before it reads anything."""
    if ctx.is_main:
        ctx.held.enter_context(RunLock(cfg.train.out_dir))
        clean_leftovers(cfg.train.out_dir)  # of writes/deletes killed in an earlier run
    batch_split(cfg.data.batch_size, cfg.train.grad_accum, ctx.world_size)  # a clear error if it does not divide
    data = TokenData.open(cfg.data.data_dir, share=(ctx.rank, ctx.world_size))  # ranks split the hashing
    if data.vocab_size > cfg.model.vocab_size:
        raise ConfigError(
            f"the data's tokenizer has {data.vocab_size} tokens but model.vocab_size is {cfg.model.vocab_size}; "
            f"set --model.vocab_size={data.vocab_size} or more"
        )
    split = data.document_split
    if echo and split is not None and split["val_fraction"] != cfg.data.val_fraction:
        print(
            f"fastgrow: note: data.val_fraction={cfg.data.val_fraction} does not apply: {data.data_dir} has its "
            f"own validation split ({split['val_documents']} documents, {split['val_tokens']:,} tokens)",
            file=sys.stderr,
        )
    return data


def _runner(cfg: RunConfig, ctx: distributed.DistContext, state: TrainState, data: TokenData, echo, until_step):
    # Every stage not yet done, checked against the live model now, not at its event.
    growth_at = check_stages(cfg, state.model.cfg, done=len(state.growth_history))
    if ctx.enabled:
        for i in range(len(state.growth_history), len(cfg.growth)):
            if cfg.growth[i].op == "learn":
                # Its learning phase reads whole batches on every rank and stops on a local signal: not yet
                # made collective, so refused rather than run redundantly or hang on a one-rank signal.
                raise ConfigError(
                    f'growth[{i}].op = "learn" does not run under torchrun yet; grow offline '
                    "with `fastgrow grow --op learn --data DIR` and resume the grown checkpoint"
                )
    tcfg = cfg.train
    out_dir = Path(tcfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    loader = BatchLoader.for_run(data, cfg, "train")
    if state.cursor:
        loader.load_state_dict(state.cursor)
    val_batches = BatchLoader.for_run(data, cfg, "val").val_batches(tcfg.eval_batches)
    stop = tcfg.max_steps if until_step is None else min(until_step, tcfg.max_steps)
    return Runner(cfg, state, loader, val_batches, growth_at, out_dir, data.tokenizer_path, echo, stop, ctx)
