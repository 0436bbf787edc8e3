"""Where every tensor of a grown state comes from: the grown model's modules, the storage of each
parameter and Adam moment, and the batched copies that fill them (fastgrow.grow's machinery).

Cost model (410M-base -> 410M, stack x4; bench/results/grow-cpu.md): a growth is almost all memory
traffic into fresh memory, plus a per-tensor host cost (441 parameter/moment tensors and 147 steps at
24 layers) that on a GPU is paid in launches and allocator calls. So:

* Modules are not constructed one by one (nn.Module.__init__ costs ~20 us a module, ~5 ms for 24
  blocks on the meta device): one template block of the target config is built on the meta device and
  every other block is a structural clone of it (`skeletons`: its plain attributes, fresh hook
  containers, its tensors to be replaced). Nothing is initialised and no RoPE table is recomputed:
  every parameter is written exactly once, the tables are the old model's.
* Storage: one allocation per parameter shape for the parameters (and one per shape for the moments,
  zeros in one fill for new blocks) whose rows are the tensors (`FusedAlloc`), instead of one
  allocation per tensor: ~441 allocations become ~10. A consuming growth (`take=True`) lets one copy
  of each source layer, and the embeddings, final norm and head, take over the old tensors (new
  Parameter objects on the same storage, so no autograd hook of the old model follows them): those
  bytes are neither allocated nor copied, and the old + new peak is the new state's size.
* Copies: every copy of the growth (parameters, moments, steps) is one `torch._foreach_copy_`.
* Adam steps: torch increments every parameter's step tensor in place (`step_t += 1` in the
  single-tensor AdamW, `_foreach_add_(steps, 1)` in the fused one), so one tensor shared by several
  parameters would advance once per parameter and step: not allowed. The new step tensors are the rows
  of one tensor (one allocation), written by the same `_foreach_copy_`; a taken-over layer keeps its
  old step tensors.
* Python's cyclic garbage collector is paused during grow() (`gc_paused`).
No function here reads a tensor's value on the host (no .item(), .cpu(), .tolist()).
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
from collections.abc import Iterator

import torch
from torch import nn

from fastgrow.config import ModelConfig
from fastgrow.grow_depth import NEW_BLOCK
from fastgrow.model import Block, Transformer


@contextlib.contextmanager
def no_module_init() -> Iterator[None]:
    """Skip nn.Linear / nn.Embedding's own init while modules are built (as Hugging Face's
    `no_init_weights` does): grow() writes every tensor anyway. Restored on exit; grow() is not meant
    to run in parallel threads."""
    saved = [(cls, cls.reset_parameters) for cls in (torch.nn.Linear, torch.nn.Embedding)]
    try:
        for cls, _ in saved:
            cls.reset_parameters = lambda self: None
        yield
    finally:
        for cls, fn in saved:
            cls.reset_parameters = fn


@contextlib.contextmanager
def gc_paused() -> Iterator[None]:
    """Python's cyclic garbage collector off for the block: a growth creates a few thousand small
    containers (module dicts, tensors), enough to trigger several collections that each scan the whole
    young heap of a process that holds a model (measured: grown_modules 24 layers 7.9 -> 3.4 ms of CPU
    time in a process holding many models). Reference counting still frees everything at once."""
    was = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was:
            gc.enable()


class _Uninitialised(Transformer):
    """A Transformer whose constructor skips reset_parameters: grow() writes every tensor anyway."""

    def reset_parameters(self) -> None:
        pass


def _clone_plan(module: nn.Module) -> tuple:
    """What `_clone` needs of a template module, computed once: its class, its __dict__ with the hook
    containers left out (recreated empty for every clone: the keys and their types), and its children's
    plans."""
    d = module.__dict__
    fresh = tuple((k, type(v)) for k, v in d.items() if isinstance(v, dict) and k not in _TENSOR_DICTS)
    children = tuple((name, _clone_plan(child)) for name, child in d["_modules"].items())
    return type(module), d, fresh, children


_TENSOR_DICTS = ("_parameters", "_buffers", "_modules")


def _clone(plan: tuple) -> nn.Module:
    cls, d0, fresh, children = plan
    d = d0.copy()  # plain attributes (config, sizes, eps, training) shared as they are
    for key, kind in fresh:
        d[key] = kind()
    d["_parameters"] = d0["_parameters"].copy()  # the template's placeholders, to be replaced
    d["_buffers"] = d0["_buffers"].copy()
    d["_non_persistent_buffers_set"] = d0["_non_persistent_buffers_set"].copy()
    d["_modules"] = {name: _clone(p) for name, p in children} if children else {}
    new = object.__new__(cls)
    object.__setattr__(new, "__dict__", d)
    return new


def skeletons(template: nn.Module, n: int) -> list[nn.Module]:
    """`n` modules of `template`'s class with its plain attributes (shared, e.g. the config), fresh hook
    containers, its parameter and buffer names (holding the template's tensors until the caller
    replaces them) and its children cloned the same way: ~3 us a module against ~20 us for a
    constructor call. `template` must be freshly constructed (nothing compiled or hooked on it):
    attributes are copied as they are."""
    plan = _clone_plan(template)
    return [_clone(plan) for _ in range(n)]


def grown_modules(old: Transformer, dst_cfg: ModelConfig, buffers: dict[str, torch.Tensor]) -> Transformer:
    """The grown model's modules (config `dst_cfg`) holding meta placeholders for every parameter, and
    `buffers` (the RoPE tables, not copied) as its buffers. Built from one meta template per kind (see
    the module doc); the caller replaces every parameter (`set_parameter`)."""
    with torch.device("meta"), no_module_init():
        model = _Uninitialised(
            dataclasses.replace(dst_cfg, n_layers=0), rope=(buffers["rope_cos"], buffers["rope_sin"])
        )
        template = Block(dst_cfg)
    model.__class__ = Transformer
    model.cfg = dst_cfg
    n = dst_cfg.n_layers
    model.layers = nn.ModuleList(([template, *skeletons(template, n - 1)]) if n else [])
    if not old.training:  # modules are built in training mode
        model.eval()
    return model


def parameter_slots(model: nn.Module) -> list[tuple[str, nn.Module, str]]:
    """(full name, owning module, attribute) of every parameter slot in named_parameters() order, the
    slots of cloned modules that still share a placeholder included. A plain recursion: ~4x cheaper
    than named_parameters()' nested generators over the ~220 modules of a 24-layer model."""
    out: list[tuple[str, nn.Module, str]] = []

    def visit(prefix: str, mod: nn.Module) -> None:
        for attr, p in mod._parameters.items():
            if p is not None:
                out.append((prefix + attr, mod, attr))
        for name, child in mod._modules.items():
            if child is not None:
                visit(f"{prefix}{name}.", child)

    visit("", model)
    return out


class FusedAlloc:
    """Collects tensor requests, then allocates one buffer per (shape, dtype, zero) and hands out its
    rows as the tensors (`unbind`: every view made in one call; ~0.3 us a tensor against ~1.5 us for
    an empty() or a slice of its own). Rows of one shape are contiguous, so every tensor is aligned as
    its shape's size allows. For the growth of a 24-layer model: ~5 buffers for the parameters, ~5 for
    the moments, instead of ~441 allocations."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.requests: list[tuple[torch.Size, torch.dtype, bool]] = []

    def request(self, shape: torch.Size, dtype: torch.dtype, zero: bool = False) -> int:
        self.requests.append((shape, dtype, zero))
        return len(self.requests) - 1

    def allocate(self) -> list[torch.Tensor]:
        """The requested tensors, in request order (uninitialised, or zero where asked)."""
        groups: dict[tuple[torch.Size, torch.dtype, bool], list[int]] = {}
        for i, key in enumerate(self.requests):
            groups.setdefault(key, []).append(i)
        out: list[torch.Tensor] = [None] * len(self.requests)  # type: ignore[list-item]
        for (shape, dtype, zero), idx in groups.items():
            make = torch.zeros if zero else torch.empty
            for i, t in zip(idx, make((len(idx), *shape), dtype=dtype, device=self.device).unbind(0)):
                out[i] = t
        self.requests = []
        return out


class Copier:
    """Collects same-shape device copies and runs them as one `torch._foreach_copy_` (few launches)."""

    def __init__(self) -> None:
        self.dst: list[torch.Tensor] = []
        self.src: list[torch.Tensor] = []

    def add(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.dst.append(dst)
        self.src.append(src)

    def flush(self) -> None:
        if self.dst:
            torch._foreach_copy_(self.dst, self.src)
        self.dst, self.src = [], []


def step_copies(sources: list[torch.Tensor], copier: Copier) -> list[torch.Tensor]:
    """Independent copies of the step tensors `sources` (see the module doc for why they cannot be one
    shared tensor): the rows of one tensor when they share a device and dtype (one allocation, the
    copies queued on `copier`), else clones."""
    if not sources:
        return []
    first = sources[0]
    if not all(s.device == first.device and s.dtype == first.dtype and s.dim() == 0 for s in sources):
        return [s.clone() for s in sources]
    rows = torch.empty(len(sources), dtype=first.dtype, device=first.device).unbind(0)
    for row, src in zip(rows, sources):
        copier.add(row, src)
    return list(rows)


def source_name(name: str, sources: list[int]) -> str | None:
    """Name of the old parameter a new one comes from (None for a new block)."""
    if not name.startswith("layers."):
        return name
    _, idx, rest = name.split(".", 2)
    s = sources[int(idx)]
    return None if s == NEW_BLOCK else f"layers.{s}.{rest}"


def owners(sources: list[int], take: bool) -> set[int]:
    """The grown layers that take over their source layer's tensors: the first copy of each source
    (none unless `take`). Every other copy gets its own storage: two grown layers must never share one."""
    if not take:
        return set()
    first: dict[int, int] = {}
    for i, s in enumerate(sources):
        if s != NEW_BLOCK:
            first.setdefault(s, i)
    return set(first.values())


def init_new_block_param(p: torch.Tensor, name: str, op: str, std: float, gen: torch.Generator | None) -> None:
    if name.endswith("norm.weight"):
        p.fill_(1.0)
    elif op == "zero" and (name.endswith("attn.wo.weight") or name.endswith("mlp.w2.weight")):
        p.zero_()
    else:
        p.normal_(0.0, std, generator=gen)
