"""Sharded checkpoints (manifest layout "dcp"): every rank writes its own shards, in parallel, with
torch.distributed.checkpoint (DCP); any world size, one process included, reads them back.

    step-00000100/
      dcp/.metadata            DCP's index: every tensor's global shape and which file holds which rows
      dcp/__<rank>_0.distcp    rank's shards of the weights ("model.<name>") and of the AdamW state
                               ("optim.state.<name>.exp_avg", ...; absent before the first step)
      state.json               as in the single layout (step, tokens, cursor, schedule, growth history,
                               run config, live architecture, RNG) plus world_size, parallel and
                               optimizer_state (whether "optim" is saved)
      tokenizer.json
      manifest.json            written LAST by rank 0: every file, size and sha256, and "layout": "dcp"

Protocol (the single layout's, with ranks): rank 0 creates `step-N.tmp-<random>` and sends its name to
every rank; every rank writes, fsyncs and hashes its own DCP file (in parallel: no rank reads another's
shards); rank 0 gathers the hashes, writes state.json, hashes DCP's .metadata, writes the manifest last,
renames the directory to `step-N` and fsyncs. The gather is the barrier before the rename, and the
agreement after it is the barrier no rank passes before the checkpoint is complete. A rank that fails
while writing fails the save on every rank (DCP gathers the write results); rank 0 removes the temp
directory.

Resharding is DCP's: a load asks for the tensors (and row ranges) the loading ranks hold, whatever the
world size that wrote them. Reading into one process (`load_dcp_tensors`, used by `load_checkpoint` and
so by `fastgrow export` and `fastgrow grow`) needs no process group. Bytes are copied as they are, so a
state resumed at another world size is bitwise the saved one.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import torch

from fastgrow.checkpoint import (
    CheckpointError,
    check_listing,
    checkpoint_dir,
    checkpoint_layout,
    checkpoint_model_config,
    commit_checkpoint,
    load_optimizer_tensors,
    new_checkpoint_dir,
    prune_checkpoints,
    read_manifest,
    read_state,
    restore_rng_state,
    resume_config,
    state_from_meta,
    verify_file,
    write_checkpoint_meta,
)
from fastgrow.config import RunConfig
from fastgrow.distributed import DistContext
from fastgrow.fsutil import fsync_file, sha256_file
from fastgrow.model import Transformer
from fastgrow.optim import build_optimizer
from fastgrow.sharding import shard_rows
from fastgrow.state import TrainState

DCP_DIR = "dcp"
LAYOUT = "dcp"


def _dcp():
    import torch.distributed.checkpoint as dcp

    return dcp


def _dcp_load(state_dict: dict[str, Any], ckpt: Path) -> None:
    """dcp.load from `ckpt`/dcp, in one process when there is no process group (DCP warns about that
    every time; it is the intended use here)."""
    import warnings

    import torch.distributed as dist

    no_dist = not (dist.is_available() and dist.is_initialized())
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            _dcp().load(state_dict, checkpoint_id=str(ckpt / DCP_DIR), no_dist=no_dist)
    except Exception as e:  # noqa: BLE001 - DCP wraps file errors in its own types
        raise CheckpointError(f"{ckpt / DCP_DIR}: cannot read the sharded checkpoint ({e})") from e


# --- save --------------------------------------------------------------------------------------------------


def save_sharded_checkpoint(
    state: TrainState,
    run_dir: str | Path,
    keep: int,
    *,
    tokenizer: str | Path | None,
    ctx: DistContext,
    metrics_records: int | None = None,
) -> Path:
    """Write the sharded `state` as `run_dir/step-<step>` from every rank (collective; see module doc)."""
    from torch.distributed.checkpoint import FileSystemWriter
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    final = checkpoint_dir(run_dir, state.step, keep)
    run = final.parent

    def begin() -> str | None:
        if not ctx.is_main:
            return None
        run.mkdir(parents=True, exist_ok=True)
        return str(new_checkpoint_dir(final))

    tmp = Path(ctx.broadcast(ctx.agree(begin)))
    try:
        with_optim = bool(state.optimizer.state)
        sd: dict[str, Any] = {"model": get_model_state_dict(state.model)}
        if with_optim:
            sd["optim"] = get_optimizer_state_dict(state.model, state.optimizer)
        _dcp().save(sd, storage_writer=FileSystemWriter(str(tmp / DCP_DIR), sync_files=True))
        mine = ctx.agree(lambda: _hash_own_files(tmp, ctx.rank))
        hashed = {k: v for part in ctx.all_gather(mine) for k, v in part.items()}

        def commit() -> None:
            if ctx.is_main:
                extra = {"world_size": ctx.world_size, "parallel": ctx.parallel, "optimizer_state": with_optim}
                write_checkpoint_meta(tmp, state, tokenizer, extra, metrics_records=metrics_records)
                commit_checkpoint(tmp, final, state.step, LAYOUT, hashed)

        ctx.agree(commit)
    except BaseException:
        if ctx.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    if ctx.is_main:
        prune_checkpoints(run, keep)
    return final


def save_run_checkpoint(
    state: TrainState,
    run_dir: str | Path,
    keep: int,
    *,
    tokenizer: str | Path | None,
    ctx: DistContext,
    metrics_records: int | None = None,
) -> Path:
    """A torchrun run's checkpoint (collective): sharded (FSDP) or, for replicated DDP state, the
    one-process layout written by rank 0 while the others wait."""
    if ctx.sharded:
        return save_sharded_checkpoint(
            state, run_dir, keep, tokenizer=tokenizer, ctx=ctx, metrics_records=metrics_records
        )
    from fastgrow.checkpoint import save_checkpoint

    def write() -> Path | None:
        if not ctx.is_main:
            return None
        return save_checkpoint(state, run_dir, keep, tokenizer=tokenizer, metrics_records=metrics_records)

    path = ctx.agree(write)
    return Path(ctx.broadcast(str(path) if path is not None else None))


def _hash_own_files(tmp: Path, rank: int) -> dict[str, dict[str, Any]]:
    """fsync + size + sha256 of the DCP data files this rank wrote (`__<rank>_<i>.distcp`)."""
    out = {}
    for f in sorted((tmp / DCP_DIR).iterdir()):
        if f.is_file() and f.name.startswith(f"__{rank}_"):
            fsync_file(f)
            out[f"{DCP_DIR}/{f.name}"] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    return out


# --- verify ------------------------------------------------------------------------------------------------


def verify_sharded(ckpt: Path, ctx: DistContext) -> dict[str, Any]:
    """verify_checkpoint, with the hashing spread over the ranks (rank r checks files r, r + W, ...)."""
    manifest = read_manifest(ckpt)

    def mine() -> None:
        check_listing(ckpt, manifest)
        for i, (name, info) in enumerate(sorted(manifest.get("files", {}).items())):
            if i % ctx.world_size == ctx.rank:
                verify_file(ckpt, name, info)

    ctx.agree(mine)
    return manifest


# --- load --------------------------------------------------------------------------------------------------


def load_dcp_tensors(state: TrainState, ckpt: Path, meta: dict[str, Any]) -> None:
    """Fill state.model and state.optimizer (plain or sharded, any world size) from a "dcp" checkpoint."""
    from torch.distributed.checkpoint.state_dict import (
        get_model_state_dict,
        get_optimizer_state_dict,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    with_optim = bool(meta.get("optimizer_state", True))
    sd: dict[str, Any] = {"model": get_model_state_dict(state.model)}
    if with_optim:
        # An optimizer without state gets zero moments first (a zero-lr step), then the saved values.
        sd["optim"] = get_optimizer_state_dict(state.model, state.optimizer)
    _dcp_load(sd, ckpt)
    set_model_state_dict(state.model, sd["model"])
    if with_optim:
        set_optimizer_state_dict(state.model, state.optimizer, sd["optim"])


def _load_single_into_sharded(state: TrainState, ckpt: Path) -> None:
    """A one-process checkpoint into a sharded model: each rank copies its rows of every tensor."""
    from safetensors.torch import load_file
    from torch.distributed.tensor import DTensor

    weights = load_file(str(ckpt / "model.safetensors"))
    params = dict(state.model.named_parameters())
    missing = sorted(set(params) - set(weights))
    unexpected = sorted(set(weights) - set(params))
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: weights do not match the model (missing {missing}, unexpected {unexpected})")
    with torch.no_grad():
        for name, p in params.items():
            p.to_local().copy_(shard_rows(weights[name], p))
    opt_path = ckpt / "optimizer.safetensors"
    if not opt_path.is_file():
        return
    tensors = {}
    for key, full in load_file(str(opt_path)).items():
        kind, name = key.split("/", 1)
        p = params[name]
        if kind == "step":
            tensors[key] = full
        else:
            local = shard_rows(full, p).to(p.device)
            tensors[key] = DTensor.from_local(
                local, p.device_mesh, p.placements, run_check=False, shape=p.shape, stride=p.stride()
            )
    load_optimizer_tensors(state, tensors)


def _sharded_model(model_cfg, ctx: DistContext) -> Transformer:
    """An FSDP2-sharded model whose local shards are allocated but not initialised (a load fills them):
    built on the meta device, so no rank ever holds the full model."""
    from fastgrow.sharding import init_buffers, sharded_empty

    model = sharded_empty(model_cfg, ctx.mesh, ctx.device)
    init_buffers(model)
    return model


def load_parallel_state(ckpt: Path, config: RunConfig, ctx: DistContext, verify: bool = True) -> TrainState:
    """Resume a torchrun rank from a checkpoint of any layout and any world size (collective).
    verify=False: the caller has verified `ckpt` already (the trainer's resume selection on rank 0)."""
    from fastgrow.checkpoint import load_checkpoint

    layout = checkpoint_layout(verify_sharded(ckpt, ctx) if verify else ctx.agree(lambda: read_manifest(ckpt)))
    if not ctx.sharded and layout != LAYOUT:  # DDP from a one-process checkpoint: every rank loads it whole
        return ctx.agree(lambda: load_checkpoint(ckpt, ctx.device, config=config, verify=False))

    def build() -> tuple[TrainState, dict[str, Any]]:
        meta = read_state(ckpt)
        run_cfg = resume_config(meta, config, ckpt)
        model_cfg = checkpoint_model_config(meta, run_cfg)
        model = _sharded_model(model_cfg, ctx) if ctx.sharded else Transformer(model_cfg).to(ctx.device)
        return state_from_meta(meta, run_cfg, model, build_optimizer(model, run_cfg.train)), meta

    state, meta = ctx.agree(build)
    if layout == LAYOUT:
        load_dcp_tensors(state, ckpt, meta)  # collective: a rank's read error fails it on every rank
    else:
        ctx.agree(lambda: _load_single_into_sharded(state, ckpt))
    restore_rng_state(meta)
    return state


def read_model_weights(ckpt: Path) -> dict[str, torch.Tensor]:
    """The full weights of a "dcp" checkpoint in this process (CPU), by parameter name (for export)."""
    meta = read_state(ckpt)
    cfg = RunConfig.from_dict(meta["config"])
    with torch.device("meta"):
        model = Transformer(checkpoint_model_config(meta, cfg))
    sd = {n: torch.empty(p.shape, dtype=p.dtype) for n, p in model.state_dict().items()}
    _dcp_load({"model": sd}, ckpt)
    return sd
