"""FSDP2 shards and whole tensors: the tensor-level half of running under torchrun (see
fastgrow.distributed for the process group and the ranks' agreement).

FSDP2 keeps, on rank r, rows [r * c, (r + 1) * c) of every parameter and Adam moment (c = ceil(rows /
world), torch.chunk's rule; the last ranks may hold fewer or none). `shard_rows` cuts that slice out of a
full tensor; checkpoint loads and growth use it, so a sharded run holds exactly the numbers one process
would. Every helper here is the identity on plain tensors, so code written with them (grow()) runs
unchanged in one process.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from typing import Any

import torch


def shard_model(model: torch.nn.Module, mesh: Any) -> torch.nn.Module:
    """FSDP2: every block its own unit (gathered for its forward/backward, freed after), then the root
    (embeddings, final norm, head). Parameters become DTensors sharded on dim 0; a model built on the
    CPU (or any device) is moved to the mesh's device shard by shard."""
    from torch.distributed.fsdp import fully_shard

    for block in model.layers:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def init_buffers(model: torch.nn.Module) -> None:
    """Recompute the RoPE tables of a model whose storage was allocated with `to_empty`."""
    from fastgrow.model import rope_tables

    cfg = model.cfg
    cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    with torch.no_grad():
        model.rope_cos.copy_(cos)
        model.rope_sin.copy_(sin)


def reshard(model: torch.nn.Module) -> None:
    """Put every FSDP unit back to its sharded parameters. FSDP2 leaves the root unit gathered after a
    forward pass (it expects the backward); after an evaluation or before growth that would leave whole
    plain tensors registered where the optimizer holds the sharded ones."""
    from torch.distributed.fsdp import FSDPModule

    for m in model.modules():
        if isinstance(m, FSDPModule):
            m.reshard()


def is_dtensor(t: torch.Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def model_is_sharded(model: torch.nn.Module) -> bool:
    return any(is_dtensor(p) for p in model.parameters())


def shard_rows(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's rows of `full` for a DTensor `like` sharded on dim 0 over a 1-D mesh (FSDP2's layout:
    rank r holds rows [r * c, (r + 1) * c) with c = ceil(rows / world), the last ranks fewer or none)."""
    from torch.distributed.tensor import Shard

    if tuple(like.placements) != (Shard(0),):
        raise ValueError(f"expected a tensor sharded on dim 0 over one mesh dimension, got {like.placements}")
    if tuple(full.shape) != tuple(like.shape):
        raise ValueError(f"full tensor {tuple(full.shape)} does not match the sharded {tuple(like.shape)}")
    mesh = like.device_mesh
    world, rank = mesh.size(), mesh.get_local_rank()
    rows = full.shape[0]
    c = math.ceil(rows / world) if rows else 0
    start = min(rank * c, rows)
    stop = min(start + c, rows)
    local = like.to_local()
    if local.shape[0] != stop - start:
        raise RuntimeError(
            f"shard of {rows} rows on rank {rank}/{world}: expected {stop - start}, got {local.shape[0]}"
        )
    return full[start:stop]


def full_tensor(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor on every rank (an all-gather on the device for a DTensor; `t` itself otherwise)."""
    return t.full_tensor() if is_dtensor(t) else t


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of a DTensor (a view of its storage); `t` itself otherwise."""
    return t.to_local() if is_dtensor(t) else t


def empty_whole(p: torch.Tensor) -> torch.Tensor:
    """An uninitialised full-size tensor like `p` (plain, on this rank's device), sharded or not."""
    return torch.empty(p.shape, dtype=p.dtype, device=local(p).device)


def local_rows(full: torch.Tensor, p: torch.Tensor) -> torch.Tensor:
    """The part of a full-size tensor that lines up with local(p): all of it, or this rank's rows."""
    return shard_rows(full, p) if is_dtensor(p) else full


@contextlib.contextmanager
def written_whole(p: torch.Tensor) -> Iterator[torch.Tensor]:
    """Write a whole tensor into `p`: `p` itself when it is a plain tensor; for a sharded `p`, a
    full-size temporary on its device whose rows of this rank are copied into p's shard on exit.

    Growth uses it where a tensor's values depend on more than its own rows (width maps) or on a random
    stream drawn in full-tensor order (new blocks, noise), so every rank computes exactly the numbers one
    process computes. Cost: one tensor-sized temporary at a time, never the whole model.
    """
    if not is_dtensor(p):
        yield p
        return
    full = empty_whole(p)
    yield full
    p.to_local().copy_(shard_rows(full, p))


def sharded_empty(model_cfg: Any, mesh: Any, device: torch.device) -> torch.nn.Module:
    """An FSDP2 model of architecture `model_cfg` sharded over `mesh`, with allocated but uninitialised
    shards and buffers (built on the meta device: no rank materialises the full model)."""
    from fastgrow.model import Transformer

    with torch.device("meta"):
        model = Transformer(model_cfg)
    shard_model(model, mesh)
    model.to_empty(device=device)
    return model


def sharded_like(model_cfg: Any, like: torch.nn.Module) -> torch.nn.Module:
    """sharded_empty over the same mesh and device as the sharded model `like`."""
    ref = next(like.parameters())
    return sharded_empty(model_cfg, ref.device_mesh, ref.to_local().device)
