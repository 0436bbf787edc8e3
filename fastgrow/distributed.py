"""Several processes on one node, launched by torchrun: process group, FSDP2 / DDP, and rank agreement.

    torchrun --standalone --nproc_per_node=8 --no-python fastgrow train --config run.toml

Everything here is PyTorch's own engine: `torch.distributed` (NCCL on CUDA, gloo on CPU), FSDP2
(`fully_shard` on every block, then on the root) or DDP (`train.parallel`), DTensor and DCP. A process
not started by torchrun gets a single-process context and none of this runs.

What this module decides:

- **Device and backend**: rank r uses cuda:LOCAL_RANK with NCCL, or the CPU with gloo. Every collective
  runs under `train.dist_timeout` seconds, so a rank that stops answering ends the run instead of
  hanging it.
- **Batch split** (`fastgrow.loader.batch_split`): the global batch of data.batch_size x train.grad_accum
  sequences is cut into equal contiguous rank slices (see the loader). Gradients are averaged over
  ranks by FSDP's reduce-scatter / DDP's all-reduce, so the update is the one-process update up to the
  order of the floating-point sums.
- **Agreement**: `step_sync` all-reduces each step's mean loss together with a stop flag (SIGTERM on any
  rank), so every rank logs the global loss, skips the same non-finite steps and stops at the same step.
  `agree` runs a setup phase on every rank and raises the first failing rank's message on all of them.
  A rank that fails later leaves its message in the process group's key-value store before it exits;
  the others, whose next collective then fails, raise `RankFailed` with that message.
- **Sharded tensors**: see fastgrow.sharding (FSDP2's rows per rank, whole tensors for growth).
"""

from __future__ import annotations

import contextlib
import datetime
import os
import signal
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch

from fastgrow.config import ConfigError, RunConfig
from fastgrow.launch_env import launched_by_torchrun
from fastgrow.sharding import is_dtensor, reshard, shard_model

_ERROR_KEY = "fastgrow/error"
T = TypeVar("T")


class RankFailed(RuntimeError):
    """Another rank failed; the message names it and carries its error."""


@dataclass
class DistContext:
    """Where this process stands: rank, world size, device, and how the model is parallelised.

    parallel is None for a single process (no process group), else "fsdp" or "ddp".
    """

    device: torch.device
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    parallel: str | None = None
    mesh: Any = None  # the 1-D DeviceMesh FSDP2 shards over
    _timeout: float = 0.0  # train.dist_timeout, for messages
    held: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)  # e.g. the run lock

    @property
    def enabled(self) -> bool:
        return self.parallel is not None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.parallel == "fsdp"

    # --- agreement ---------------------------------------------------------------------------------
    def agree(self, fn: Callable[[], T]) -> T:
        """Run `fn` on every rank; if it fails on any rank, every rank raises (the failing rank its own
        error, the others RankFailed naming the first failing rank and its message)."""
        try:
            result, err = fn(), None
        except Exception as e:  # noqa: BLE001 - every failure is reported to the peers, then re-raised
            result, err = None, e
        if not self.enabled:
            if err is not None:
                raise err
            return result
        import torch.distributed as dist

        msgs: list[str | None] = [None] * self.world_size
        dist.all_gather_object(msgs, None if err is None else _describe(err))
        if err is not None:
            raise err
        for r, msg in enumerate(msgs):
            if msg is not None:
                raise RankFailed(f"rank {r} failed: {msg}")
        return result

    def guarded(self, fn: Callable[[], T]) -> T:
        """Run the training loop: a failure here is left in the store for the other ranks; a failed
        collective caused by another rank's failure becomes RankFailed with that rank's message."""
        if not self.enabled:
            return fn()
        try:
            return fn()
        except RankFailed:
            raise
        except Exception as e:  # noqa: BLE001
            peer = _peer_error(self.rank)
            if peer is not None:
                raise RankFailed(peer) from e
            _publish_error(f"rank {self.rank} failed: {_describe(e)}")
            if _in_collective(e):
                first = (str(e).strip().splitlines() or [type(e).__name__])[0]
                raise RankFailed(
                    f"rank {self.rank}: a collective failed: another rank stopped, was killed or did not answer "
                    f"within train.dist_timeout = {self._timeout:g} s ({first})"
                ) from e
            raise

    def barrier(self) -> None:
        if self.enabled:
            import torch.distributed as dist

            dist.barrier()

    def broadcast(self, obj: T) -> T:
        """Rank 0's `obj` on every rank."""
        if not self.enabled:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj: Any) -> list[Any]:
        if not self.enabled:
            return [obj]
        import torch.distributed as dist

        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out


def _in_collective(e: BaseException) -> bool:
    """Whether `e` was raised inside torch.distributed (a collective, FSDP's hooks, DCP): with no
    message from another rank, the likely cause is a rank that died or hangs."""
    import traceback

    if type(e).__module__.startswith("torch.distributed"):
        return True
    # A collective inside an autograd hook (FSDP's reduce-scatter) surfaces from backward() without
    # torch.distributed frames; the backends name themselves in their messages.
    if any(k in str(e) for k in ("gloo", "NCCL", "ProcessGroup", "Connection closed by peer")):
        return True
    return any(f"torch{os.sep}distributed{os.sep}" in fr.filename for fr in traceback.extract_tb(e.__traceback__))


def _describe(e: BaseException) -> str:
    text = str(e) or type(e).__name__
    return text if isinstance(e, (ValueError, OSError)) else f"{type(e).__name__}: {text}"


def _store():
    import torch.distributed as dist

    # The process group's own key-value store (torchrun's agent store, or rank 0's TCPStore): a place to
    # leave an error message that outlives the rank that wrote it.
    return dist.distributed_c10d._get_default_store()


def _publish_error(msg: str) -> None:
    with contextlib.suppress(Exception):  # best effort: the store may be gone with rank 0
        _store().set(_ERROR_KEY, msg)


def _peer_error(rank: int) -> str | None:
    with contextlib.suppress(Exception):
        store = _store()
        if store.check([_ERROR_KEY]):
            msg = store.get(_ERROR_KEY).decode()
            if not msg.startswith(f"rank {rank} "):
                return msg
    return None


# --- session ---------------------------------------------------------------------------------------------


def _resolve(cfg: RunConfig, device: torch.device | str | None, local_rank: int, world: int) -> torch.device:
    from fastgrow.state import resolve_device

    dev = resolve_device(cfg.train.device) if device is None else torch.device(device)
    if dev.type != "cuda":
        return dev
    if dev.index not in (None, local_rank) and world > 1:
        raise ConfigError(
            f"train.device={cfg.train.device!r} under torchrun: each rank uses cuda:LOCAL_RANK; "
            "set train.device to cuda or auto"
        )
    if local_rank >= torch.cuda.device_count():
        raise ConfigError(
            f"rank with LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA devices are visible"
        )
    return torch.device("cuda", local_rank)


_EXIT_HOOK: list[bool] = []


def _collect_at_exit() -> None:
    """Free process-group objects while the interpreter is still whole. The state a run returns keeps
    its DeviceMesh (and so a gloo/NCCL group object) alive after destroy_process_group; left to
    interpreter finalization, its C++ threads abort the process ("terminate called without an active
    exception") about one exit in four with torch 2.13 and gloo. A gc pass at exit, after the caller
    has dropped the state, destroys it in time (0 aborts in 20 tries)."""
    if not _EXIT_HOOK:
        import atexit
        import gc

        atexit.register(gc.collect)
        _EXIT_HOOK.append(True)


@contextlib.contextmanager
def session(cfg: RunConfig, device: torch.device | str | None = None) -> Iterator[DistContext]:
    """The context of one `train()` call: a process group under torchrun (created here unless one
    exists, and then destroyed on exit), a single-process context otherwise."""
    if not launched_by_torchrun():
        from fastgrow.state import resolve_device

        ctx = DistContext(device=resolve_device(cfg.train.device) if device is None else torch.device(device))
        with ctx.held:
            yield ctx
        return
    import torch.distributed as dist

    parallel = cfg.train.parallel  # fsdp or ddp (TrainConfig checks it)
    if tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) < (2, 6):
        # fully_shard, DTensor's public API and get_total_norm/clip_grads_with_norm_ arrived in 2.6.
        raise ConfigError(f"training under torchrun needs torch >= 2.6, this is torch {torch.__version__}")
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ["RANK"]))
    dev = _resolve(cfg, device, local_rank, int(os.environ["WORLD_SIZE"]))
    owns = not dist.is_initialized()
    if owns:
        _collect_at_exit()
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=cfg.train.dist_timeout),
            device_id=dev if dev.type == "cuda" else None,
        )
    ctx = DistContext(
        device=dev,
        rank=dist.get_rank(),
        world_size=dist.get_world_size(),
        local_rank=local_rank,
        parallel=parallel,
        _timeout=cfg.train.dist_timeout,
    )
    try:
        if ctx.sharded:
            from torch.distributed.device_mesh import init_device_mesh

            ctx.mesh = init_device_mesh(dev.type, (ctx.world_size,))
        with ctx.held:
            yield ctx
    finally:
        if owns and dist.is_initialized():
            dist.destroy_process_group()


# --- model wrapping (FSDP2 itself: fastgrow.sharding) ---------------------------------------------------


def forward_module(model: torch.nn.Module, ctx: DistContext) -> torch.nn.Module:
    """What the step calls: DDP's wrapper (it all-reduces gradients in backward), else the model."""
    if ctx.parallel != "ddp":
        return model
    from torch.nn.parallel import DistributedDataParallel

    ids = [ctx.device.index] if ctx.device.type == "cuda" else None
    return DistributedDataParallel(model, device_ids=ids)


@contextlib.contextmanager
def grad_sync(module: torch.nn.Module, ctx: DistContext, sync: bool) -> Iterator[None]:
    """Reduce gradients only on the last micro-batch of a step (DDP no_sync; FSDP2 keeps reducing every
    micro-batch, which keeps gradients sharded between them: memory over a little bandwidth)."""
    if ctx.parallel == "ddp" and not sync:
        with module.no_sync():
            yield
    else:
        yield


def build_parallel_state(cfg: RunConfig, ctx: DistContext):
    """A fresh TrainState for a torchrun rank, with exactly the initial weights one process would draw.

    FSDP: the model is initialised in host memory from train.seed (as `build_state` does), then
    `fully_shard` moves each rank's rows to its device and frees the rest: host memory holds the full
    fp32 model once per rank during start-up (4 bytes per parameter), the device only its shards. DDP:
    the model is built on the device, as one process builds it.
    """
    import dataclasses

    from fastgrow.optim import build_optimizer
    from fastgrow.state import build_state

    if not ctx.sharded:
        return build_state(cfg, ctx.device)
    state = build_state(cfg, "cpu")
    shard_model(state.model, ctx.mesh)
    return dataclasses.replace(state, optimizer=build_optimizer(state.model, cfg.train))


# --- the step ---------------------------------------------------------------------------------------------


def clip_grad_norm(params: list[torch.Tensor], max_norm: float, foreach: bool) -> torch.Tensor:
    """torch's clip_grad_norm_ (same arithmetic) for plain or sharded parameters: the norm of sharded
    gradients is reduced over ranks (every rank gets the same global norm, a plain tensor)."""
    grads = [p.grad for p in params if p.grad is not None]
    total = torch.nn.utils.get_total_norm(grads, 2.0, False, foreach)
    if is_dtensor(total):
        total = total.full_tensor()
    torch.nn.utils.clip_grads_with_norm_(params, max_norm, total, foreach)
    return total


class StepSync:
    """One all-reduce per step of [local mean loss, SIGTERM flag, SIGINT flag]: every rank gets the global
    mean loss (so all decide alike to skip a non-finite step) and learns whether any rank was asked to stop,
    and by which signal (so rank 0 can say so and exit with it).

    On CUDA the flags are read one step late through a pinned buffer and an event, so the host never
    waits for the step it has just queued; on the CPU (gloo is synchronous) they are read at once.
    """

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx
        self.cuda = ctx.device.type == "cuda"
        self._pending: tuple[torch.Tensor, Any] | None = None
        self.signum: int | None = None  # the signal that stops the run (this rank's, else another's)

    def _learn(self, flags: torch.Tensor) -> None:
        if self.signum is None and bool(flags.sum() > 0):
            self.signum = int(signal.SIGINT) if bool(flags[1] > 0) else int(signal.SIGTERM)

    def reduce(self, loss_mean: torch.Tensor, signum: int | None) -> torch.Tensor:
        """The global mean loss; `signum`: the stop signal this rank received, if any."""
        if signum is not None and self.signum is None:
            self.signum = signum
        if not self.ctx.enabled:
            return loss_mean
        import torch.distributed as dist

        # Built on the device (fills, no host tensor): a host-to-device copy of the flags would make the
        # host wait for the step it has just queued.
        buf = torch.zeros(3, device=loss_mean.device)
        buf[0].copy_(loss_mean)
        if signum == signal.SIGTERM:
            buf[1].fill_(1.0)
        elif signum == signal.SIGINT:
            buf[2].fill_(1.0)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM)  # gloo has no AVG
        if self.cuda:
            host = torch.empty(2, pin_memory=True)
            host.copy_(buf[1:], non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            if self._pending is not None:
                prev, prev_event = self._pending
                prev_event.synchronize()
                self._learn(prev)
            self._pending = (host, event)
        else:
            self._learn(buf[1:])
        return buf[0] / self.ctx.world_size

    def should_stop(self, local: int | None) -> int | None:
        """The signal to stop after this step, or None: `local` (this process's) for a single process;
        under torchrun, any rank's, the same answer on every rank."""
        return self.signum if self.ctx.enabled else local


def sharded_mean_loss(
    model: torch.nn.Module,
    batches: list[tuple[torch.Tensor, torch.Tensor, int]],
    ctx: DistContext,
    autocast: Callable[[], Any],
) -> float:
    """Validation over rank slices: the row-weighted mean of the ranks' losses (rows = 0 marks a filler
    batch that only keeps every rank's number of forward passes equal, as FSDP needs)."""
    import torch.distributed as dist

    was_training = model.training
    model.eval()
    acc = torch.zeros(2, device=ctx.device)
    with torch.no_grad(), autocast():
        for x, y, rows in batches:
            loss = model(x.to(ctx.device, non_blocking=True), y.to(ctx.device, non_blocking=True)).float()
            acc[0] += loss * rows
            acc[1] += rows
    if ctx.sharded:
        reshard(model)
    model.train(was_training)
    dist.all_reduce(acc, op=dist.ReduceOp.SUM)
    return (acc[0] / acc[1]).item()
