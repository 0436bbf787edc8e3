"""grow(state, plan) -> state: grow a live TrainState in place on its device, optimizer included.

The whole training state is mapped at once: a new Transformer (the target ModelConfig) is allocated on
the state's device (uninitialised: module init is skipped, so nothing is initialised twice or
crosses the host), and every parameter and Adam moment is filled with device-to-device copies (batched
with `torch._foreach_copy_` where shapes match) or in-place fills; the Adam `step` tensors are cloned on
the device they live on. Nothing calls `.item()`, `.cpu()` or `.tolist()`, nothing synchronises, nothing
goes through disk. A new AdamW is built with `fastgrow.optim.build_optimizer`, so the new parameters
land in the right weight-decay groups.

Operators (Du et al. 2024, "Stacking Your Transformers"; docs/architecture.md section 4):

depth (see fastgrow.grow_depth for the spec notation)
    stack        G_stack: the whole model repeated g times (or up to target_layers: layer i <- i mod L)
    interpolate  each layer repeated in place (layer i <- floor(i * L / T))
    partial      the paper's 1-based notation, e.g. `1-234*7-56`
    sources      an explicit 1-based source list, e.g. `1,2,3,1,2,3`
    zero         new blocks are exact identities: attn.wo and mlp.w2 are zero, so both residual branches
                 add 0; their other weights are drawn from the init distribution (so wo/w2 get non-zero
                 gradients at once) and norm gains are 1. Placement: the original layers keep positions
                 0..L-1 (the first block still reads the embeddings, the last new block feeds the final
                 norm) and the new blocks are appended on top; a spec with 0s places them elsewhere,
                 e.g. `1020` = layer 1, new, layer 2, new.
    random       new blocks freshly initialised from `Transformer.init_std(name)` of the target model
                 (whose wo/w2 std depends on the target depth); same placement as zero.
    none         no depth change (width growth only)
    A 0-layer model (embeddings, final norm and head) grows with zero or random (every layer new); a
    1-layer model with any operator (stack copies its one layer everywhere).
noise a: every weight matrix of a copied block becomes (1-a) W + a eps, eps ~ N(0, init_std(name)) of
    the target model; norm gains, embeddings and the head get no noise (paper: a = 0.2 helps slightly).
width (see fastgrow.grow_width): over dim (more heads, head dim kept) and ffn_dim
    direct       function preserving: units duplicated, the weights reading them split unevenly
                 between the copies so the copies diverge in training (dim: integer ratios; ffn: any)
    zero         function preserving: new units' outputs zero, everything they read random (any ratio)
    random       old block kept, new entries random (the function changes; any ratio)
learned (growth.op = "learn", fastgrow.grow_learn): G_learn / LiGO maps start at stack + width direct, are
    trained on the training stream, then written through grow(weights=) below.

Moments: a copied layer carries its exp_avg / exp_avg_sq / step; width `direct` scales them by the
gradient share g of each unit's copy, m*g and v*g^2 (grow_width: Staged Training's m/2, v/4 for an even
split); new blocks and new width entries start at zero moments with the common step. Random draws use
a torch.Generator on the device seeded from (run seed, step, stage), so a growth is reproducible and
leaves the global RNG alone.

Policies: optimizer copy | reset (a fresh AdamW, step 0). Schedule (fastgrow.optim.LRSchedule):
    continue  the run's schedule goes on unchanged
    rewarm    the same schedule, times a linear ramp over rewarm_steps from the growth step
    restart   the grown phase gets its own schedule from the growth step (prts's recipe: a fresh warmup
              and cosine): peak `lr`, `min_lr`, `warmup_steps`, decay over `horizon_steps` (each
              defaulting to the current schedule's; min_lr keeps its ratio to a new peak; the horizon
              to the end of the run), then min_lr
    jump      the schedule moves to step `jump_to_step` of the target's schedule, which ends with the
              run (Staged Training: the step of a from-scratch target run at the same loss), with an
              optional linear re-warm over rewarm_steps and an optional new peak `lr` / `min_lr`

Adding an operator: a depth operator joins `fastgrow.grow_depth.DEPTH_SOURCES` (which layer each new
layer comes from) and `fastgrow.growth_config.OP_FIELDS` (which config fields it reads); an operator
that computes the grown weights itself (e.g. learned maps) passes `weights=` to grow(), which still
allocates the target, builds the optimizer, carries or resets the moments, sets the schedule and writes
the record.

Sharded states (FSDP2 under torchrun; parameters and moments are DTensors sharded on dim 0): grow()
allocates the grown model sharded over the same mesh (built on the meta device, never whole on a rank)
and writes it with the same operators. A tensor copied unchanged from a layer of the same shape (depth
growth) is copied shard to shard: every rank holds the same rows of every layer, so no data moves. A
tensor whose values come from the random stream (new blocks, noise) is drawn at full size and each rank
keeps its rows; a width map gathers its source tensor on the device (one all-gather per tensor) and
fills a full-size temporary whose local rows are kept. So a sharded growth gives bitwise the tensors one
process gives, with at most one tensor-sized temporary at a time (see fastgrow.sharding).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from fastgrow import sharding
from fastgrow.config import (
    DEFAULT_FACTOR,
    OPTIMIZER_POLICIES,
    SCHEDULE_POLICIES,
    WIDTH_OPS,
    GrowthConfig,
    ModelConfig,
)
from fastgrow.grow_depth import DEPTH_SOURCES, NEW_BLOCK, connection_rate, depth_sources, parse_spec, stack_sources
from fastgrow.grow_width import WidthMap, check_direct
from fastgrow.growth_config import unused_field
from fastgrow.model import Transformer, flops_per_token
from fastgrow.optim import LRSchedule, build_optimizer
from fastgrow.state import TrainState

__all__ = [
    "DEPTH_OPS",
    "GrowPlan",
    "ResolvedPlan",
    "apply_growth",
    "connection_rate",
    "grow",
    "parse_spec",
    "plan_from_config",
    "resolve_plan",
    "stack_sources",
]

# "none": no depth change (width growth only); the rest are fastgrow.grow_depth's operators.
DEPTH_OPS = ("none", *DEPTH_SOURCES)
BLOCK_PARAMS = (
    "attn_norm.weight",
    "attn.wqkv.weight",
    "attn.wo.weight",
    "mlp_norm.weight",
    "mlp.w13.weight",
    "mlp.w2.weight",
)
ADAM_KEYS = {"step", "exp_avg", "exp_avg_sq"}


@dataclass(frozen=True)
class GrowPlan:
    """One growth event. Zero/empty/None fields mean "unchanged" / "not used"; a field the operator,
    width op or schedule policy does not read must stay unset (ValueError otherwise, as in [growth]).

    depth: one of DEPTH_OPS; factor / target_layers: the target depth (one of them); spec: the stacking
    notation for partial/sources (or a placement for zero/random); noise: a in [0, 1).
    width: direct | zero | random, applied when target_dim / target_ffn_dim / target_heads grow.
    optimizer: copy | reset; schedule: continue | rewarm | restart | jump with rewarm_steps, lr, min_lr,
    warmup_steps, horizon_steps, jump_to_step as in the module doc.
    seed: the random operators' seed (None: the run's train.seed); step and stage are mixed in by grow().
    """

    depth: str = "stack"
    factor: int = 0
    target_layers: int = 0
    spec: str = ""
    noise: float = 0.0
    width: str = "direct"
    target_dim: int = 0
    target_ffn_dim: int = 0
    target_heads: int = 0
    optimizer: str = "copy"
    schedule: str = "continue"
    rewarm_steps: int = 0
    lr: float | None = None
    min_lr: float | None = None
    warmup_steps: int | None = None
    horizon_steps: int | None = None
    jump_to_step: int | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.depth not in DEPTH_OPS:
            raise ValueError(f"unknown depth op {self.depth!r} (one of {DEPTH_OPS})")
        if self.width not in WIDTH_OPS:
            raise ValueError(f"unknown width op {self.width!r} (one of {WIDTH_OPS})")
        for name in ("factor", "target_layers", "target_dim", "target_ffn_dim", "target_heads", "rewarm_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"grow plan {name} must be a non-negative integer, got {v!r}")
        if not 0.0 <= self.noise < 1.0:
            raise ValueError(f"grow plan noise must be in [0, 1), got {self.noise!r}")
        if self.optimizer not in OPTIMIZER_POLICIES:
            raise ValueError(f"grow plan optimizer must be one of {OPTIMIZER_POLICIES}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULE_POLICIES:
            raise ValueError(f"grow plan schedule must be one of {SCHEDULE_POLICIES}, got {self.schedule!r}")
        # The same strict-settings table as [growth] (fastgrow.growth_config), in the plan's names.
        plan_fields = [f for f in dataclasses.fields(self) if f.name != "seed"]  # seed: always read
        values = {_CONFIG_NAME.get(f.name, f.name): getattr(self, f.name) for f in plan_fields}
        defaults = {_CONFIG_NAME.get(f.name, f.name): f.default for f in plan_fields}
        widens = bool(self.target_dim or self.target_ffn_dim or self.target_heads)
        bad = unused_field("width" if self.depth == "none" else self.depth, self.schedule, widens, values, defaults)
        if bad is not None:
            name = _PLAN_NAME.get(bad[0], bad[0])
            raise ValueError(f"grow plan {name} = {getattr(self, name)!r} is not used: {bad[1]}")
        if self.factor and self.target_layers:
            raise ValueError(f"grow plan factor ({self.factor}) and target_layers ({self.target_layers}): give one")
        if self.schedule == "rewarm" and self.rewarm_steps < 1:
            raise ValueError("grow plan schedule 'rewarm' needs rewarm_steps >= 1")
        if self.schedule == "jump" and (self.jump_to_step is None or self.jump_to_step < 0):
            raise ValueError("grow plan schedule 'jump' needs jump_to_step >= 0")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"grow plan lr must be > 0, got {self.lr!r}")
        if self.min_lr is not None and not self.min_lr >= 0:
            raise ValueError(f"grow plan min_lr must be >= 0, got {self.min_lr!r}")
        if self.warmup_steps is not None and self.warmup_steps < 0:
            raise ValueError(f"grow plan warmup_steps must be >= 0, got {self.warmup_steps!r}")
        if self.horizon_steps is not None and self.horizon_steps < 1:
            raise ValueError(f"grow plan horizon_steps must be >= 1, got {self.horizon_steps!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# GrowPlan field -> GrowthConfig field, where the names differ.
_CONFIG_NAME = {"depth": "op", "width": "width_op"}
_PLAN_NAME = {v: k for k, v in _CONFIG_NAME.items()}


@dataclass(frozen=True)
class ResolvedPlan:
    """A plan checked against a model: the target config and the 0-based source of every new layer."""

    plan: GrowPlan
    src: ModelConfig
    dst: ModelConfig
    sources: list[int] = field(default_factory=list)  # -1: new block
    width: WidthMap | None = None


def _target_widths(plan: GrowPlan, cfg: ModelConfig) -> tuple[int, int, int, int]:
    hd = cfg.head_dim
    dim, heads = plan.target_dim, plan.target_heads
    if heads and not dim:
        dim = heads * hd
    dim = dim or cfg.dim
    if heads and dim % heads:
        raise ValueError(f"target width {dim} is not divisible by target_heads {heads}")
    if dim % hd:
        raise ValueError(
            f"target width {dim} is not divisible by the head dim {hd} (the head dim is kept so RoPE is unchanged)"
        )
    heads = heads or dim // hd
    if dim // heads != hd:
        raise ValueError(
            f"target_dim/target_heads = {dim}/{heads} = {dim / heads:g} but the head dim must stay {hd} "
            "(growing width means growing heads)"
        )
    if dim < cfg.dim or heads < cfg.n_heads:
        raise ValueError(f"cannot shrink the width: dim {cfg.dim} -> {dim}, heads {cfg.n_heads} -> {heads}")
    # Grow kv heads with the q heads so every old q head keeps its kv head (same group size).
    group = cfg.n_heads // cfg.n_kv_heads
    if heads % group:
        raise ValueError(f"target_heads {heads} must be a multiple of the GQA group size {group}")
    ffn = plan.target_ffn_dim or cfg.ffn_dim
    if ffn < cfg.ffn_dim:
        raise ValueError(f"cannot shrink ffn_dim: {cfg.ffn_dim} -> {ffn}")
    return dim, heads, heads // group, ffn


def resolve_plan(plan: GrowPlan, cfg: ModelConfig) -> ResolvedPlan:
    """Validate `plan` against the model and compute the target; raises ValueError, changes nothing."""
    if not isinstance(plan, GrowPlan):
        raise ValueError(f"expected a GrowPlan, got {type(plan).__name__}")
    L = cfg.n_layers
    if plan.depth == "none":
        sources = list(range(L))
    else:
        sources = depth_sources(plan.depth, L, plan.target_layers, plan.factor, plan.spec)
    dim, heads, kv, ffn = _target_widths(plan, cfg)
    dst = dataclasses.replace(cfg, n_layers=len(sources), dim=dim, n_heads=heads, n_kv_heads=kv, ffn_dim=ffn)
    if plan.width == "zero" and dim != cfg.dim:
        # The residual stream becomes [x, 0]: with the gains * sqrt(dim/dim') (grow_width) an eps scaled
        # by dim/dim' keeps RMSNorm's output on the old channels exact, eps included.
        dst = dataclasses.replace(dst, norm_eps=cfg.norm_eps * cfg.dim / dim)
    width = WidthMap.between(plan.width, cfg, dst)
    if plan.width == "direct":
        check_direct(cfg, dst)
    if sources == list(range(L)) and width.identity:
        raise ValueError(f"the plan does not grow the model (still {L} layers, dim {cfg.dim}, ffn {cfg.ffn_dim})")
    return ResolvedPlan(plan=plan, src=cfg, dst=dst, sources=sources, width=width)


class _Uninitialised(Transformer):
    """A Transformer whose constructor skips reset_parameters: grow() writes every tensor anyway."""

    def reset_parameters(self) -> None:
        pass


@contextlib.contextmanager
def _no_module_init():
    """Skip nn.Linear / nn.Embedding's own init while the grown model is built (as Hugging Face's
    `no_init_weights` does): it would be a wasted pass over every weight (and kernel launches), since
    grow() writes every tensor. Restored on exit; grow() is not meant to run in parallel threads."""
    saved = [(cls, cls.reset_parameters) for cls in (torch.nn.Linear, torch.nn.Embedding)]
    try:
        for cls, _ in saved:
            cls.reset_parameters = lambda self: None
        yield
    finally:
        for cls, fn in saved:
            cls.reset_parameters = fn


class _Copier:
    """Collects same-shape device copies and runs them as one `torch._foreach_copy_` (few launches)."""

    def __init__(self) -> None:
        self.dst: list[torch.Tensor] = []
        self.src: list[torch.Tensor] = []

    def add(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        self.dst.append(dst)
        self.src.append(src)

    def flush(self) -> None:
        if not self.dst:
            return
        foreach = getattr(torch, "_foreach_copy_", None)
        if foreach is not None:
            foreach(self.dst, self.src)
        else:  # pragma: no cover - old torch
            for d, s in zip(self.dst, self.src):
                d.copy_(s)
        self.dst, self.src = [], []


def _source_name(name: str, sources: list[int]) -> str | None:
    """Name of the old parameter a new one comes from (None for a new block)."""
    if not name.startswith("layers."):
        return name
    _, idx, rest = name.split(".", 2)
    s = sources[int(idx)]
    return None if s == NEW_BLOCK else f"layers.{s}.{rest}"


def _seed(state: TrainState, plan: GrowPlan) -> int:
    base = plan.seed if plan.seed is not None else state.config.train.seed
    stage = len(state.growth_history)  # two stages at one step draw differently; stage 0 as before
    return (int(base) * 1_000_003 + int(state.step) + 1 + stage * 7_919) % (2**63 - 1)


def _init_new_block_param(p: torch.Tensor, name: str, op: str, std: float, gen: torch.Generator | None) -> None:
    if name.endswith("norm.weight"):
        p.fill_(1.0)
    elif op == "zero" and (name.endswith("attn.wo.weight") or name.endswith("mlp.w2.weight")):
        p.zero_()
    else:
        p.normal_(0.0, std, generator=gen)


def _check_optimizer(state: TrainState) -> None:
    for p, st in state.optimizer.state.items():
        extra = set(st) - ADAM_KEYS
        if extra:
            raise ValueError(f"grow() can carry AdamW state {sorted(ADAM_KEYS)} only, found {sorted(extra)}")
        if "exp_avg" in st and st["exp_avg"].shape != p.shape:
            raise ValueError("optimizer state does not match the model's parameters")
    names = {id(p) for p in state.model.parameters()}
    if any(id(p) not in names for g in state.optimizer.param_groups for p in g["params"]):
        raise ValueError("the optimizer holds parameters that are not the model's")


# A function that writes every grown parameter: weights(new_params, old_params, resolved, generator).
WeightsFn = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor], ResolvedPlan, "torch.Generator | None"], None]


@torch.no_grad()
def grow(state: TrainState, plan: GrowPlan, *, weights: WeightsFn | None = None) -> TrainState:
    """Return a new TrainState with the grown model, optimizer and schedule (see the module doc).

    The plan is resolved against the live architecture `state.model.cfg`; `state.config` (the run's
    config as launched) is carried unchanged. The input state is not modified. Validation (plan,
    sizes, optimizer state) happens before anything is allocated.

    weights: an operator that computes the grown weights itself writes every new parameter through
    it (called with a device generator seeded as below); with optimizer "copy" the moments are still
    carried by the plan's mapping (sources and width op).
    """
    r = resolve_plan(plan, state.model.cfg)
    if hasattr(state.model, "reshard"):  # FSDP2: a forward without backward leaves the root gathered
        sharding.reshard(state.model)
    _check_optimizer(state)
    schedule = _grown_schedule(state, plan)
    old_model = state.model
    if weights is not None and sharding.model_is_sharded(old_model):
        # It would need every full tensor of the old and the new model on every rank.
        raise ValueError(
            "this growth operator computes the grown weights itself and does not run on a sharded (FSDP) "
            'state; train it with train.parallel = "ddp" under torchrun, or in one process'
        )
    dev = state.device
    dtype = old_model.tok_embeddings.weight.dtype

    # Allocated once, uninitialised, directly on the device (a meta build + to_empty costs ~5x more
    # host time: meta ops are Python decompositions); every tensor is written below.
    if sharding.model_is_sharded(old_model):
        new_model = sharding.sharded_like(r.dst, old_model)
    else:
        with torch.device(dev), _no_module_init():
            new_model = _Uninitialised(r.dst)
        new_model.__class__ = Transformer  # a plain Transformer from here on
    if dtype != new_model.tok_embeddings.weight.dtype:
        new_model = new_model.to(dtype=dtype)
    # Buffers (the RoPE tables) depend on head dim / max_seq_len / theta only, all kept by growth:
    # copy them on the device rather than recompute (bitwise the tables the old model used).
    old_buffers = dict(old_model.named_buffers())
    for name, buf in new_model.named_buffers():
        src = old_buffers.get(name)
        if src is None or src.shape != buf.shape:
            raise RuntimeError(f"grow(): no matching buffer {name!r} in the old model to copy")
        buf.copy_(src)
    if not old_model.training:  # modules are built in training mode
        new_model.eval()

    needs_rng = (
        weights is not None
        or plan.noise > 0
        or NEW_BLOCK in r.sources
        or (plan.width in ("zero", "random") and not r.width.identity)
    )
    gen = None
    if needs_rng:
        gen = torch.Generator(device=dev)
        gen.manual_seed(_seed(state, plan))

    old_params = dict(old_model.named_parameters())
    new_params = dict(new_model.named_parameters())
    src_of = {name: _source_name(name, r.sources) for name in new_params}
    copier = _Copier()
    width = r.width
    if weights is not None:
        weights(new_params, old_params, r, gen)
    else:
        for name, p in new_params.items():
            src_name = src_of[name]
            if src_name is None:
                with sharding.written_whole(p) as t:
                    _init_new_block_param(t, name, plan.depth, new_model.init_std(name), gen)
            elif width.identity:
                copier.add(sharding.local(p), sharding.local(old_params[src_name]))
            else:
                src = sharding.full_tensor(old_params[src_name])  # sharded: an all-gather of this tensor
                with sharding.written_whole(p) as t:
                    width.fill(t, src, name, "param", new_model.init_std(name), gen)
        copier.flush()
    if plan.noise > 0:
        a = float(plan.noise)
        for name, p in new_params.items():
            if name.startswith("layers.") and p.dim() >= 2 and src_of[name] is not None:
                eps = sharding.empty_whole(p).normal_(0.0, new_model.init_std(name), generator=gen)
                sharding.local(p).mul_(1.0 - a).add_(sharding.local_rows(eps, p), alpha=a)

    optimizer = build_optimizer(new_model, state.config.train)
    old_lr = {g.get("group"): g["lr"] for g in state.optimizer.param_groups}
    for g in optimizer.param_groups:
        if g.get("group") in old_lr:
            g["lr"] = old_lr[g["group"]]
    if plan.optimizer == "copy":
        _carry_moments(state, old_params, new_params, src_of, width, optimizer, copier)

    record = {
        "op": plan.depth,
        "width_op": plan.width if not width.identity else None,
        "spec": plan.to_dict(),
        "stage": len(state.growth_history),
        "sources": list(r.sources),
        "connection_rate": connection_rate(r.sources) if len(r.sources) > 1 else None,
        # FLOPs per token of the model before growth, so FLOPs-so-far counts each phase at its own size
        # (also for checkpoints grown offline).
        "flops_per_token_before": flops_per_token(r.src, state.config.data.seq_len),
        "params_before": r.src.num_params(),
        "params_after": r.dst.num_params(),
        "model_before": r.src.architecture(),
        "model_after": r.dst.architecture(),
        "optimizer": plan.optimizer,
        "schedule": plan.schedule,
        "rewarm_steps": plan.rewarm_steps,
        "noise": plan.noise,
        "seed": _seed(state, plan) if needs_rng else None,
        "step": int(state.step),
        "tokens": int(state.tokens),
    }
    return dataclasses.replace(
        state,
        # state.config stays the run's config as launched (its [model] is the base, its growth the
        # stages): a resume compares against it. The live architecture is model.cfg (what checkpoints
        # store as model_config).
        config=state.config,
        model=new_model,
        optimizer=optimizer,
        schedule=schedule,
        cursor=dict(state.cursor),
        growth_history=[*state.growth_history, record],
    )


def _grown_schedule(state: TrainState, plan: GrowPlan) -> LRSchedule:
    """The LR schedule after growth (policies in the module doc); ValueError for an impossible one."""
    sched = LRSchedule.from_state_dict(state.schedule.state_dict())
    step = int(state.step)
    if plan.schedule == "rewarm":
        sched.rewarm_start, sched.rewarm_steps = step, plan.rewarm_steps
        return sched
    if plan.schedule not in ("restart", "jump"):
        return sched
    peak = plan.lr if plan.lr is not None else sched.peak_lr
    if plan.min_lr is not None:
        min_lr = plan.min_lr
    else:  # keep the ratio min_lr / peak of the current schedule
        min_lr = sched.min_lr * peak / sched.peak_lr if sched.peak_lr > 0 else sched.min_lr
    if min_lr > peak:
        raise ValueError(f"grow plan min_lr ({min_lr:g}) exceeds the grown phase's peak lr ({peak:g})")
    sched.peak_lr, sched.min_lr = peak, min_lr
    if plan.schedule == "restart":
        sched.offset = step
        if plan.warmup_steps is not None:
            sched.warmup_steps = plan.warmup_steps
        sched.horizon = plan.horizon_steps or 0
        sched.rewarm_start, sched.rewarm_steps = -1, 0
    else:  # jump: position jump_to_step at this step; the target's schedule ends with the run
        sched.offset = step - int(plan.jump_to_step)
        sched.horizon = 0
        sched.rewarm_start, sched.rewarm_steps = (step, plan.rewarm_steps) if plan.rewarm_steps else (-1, 0)
    return sched


def _carry_moments(
    state: TrainState,
    old_params: dict[str, torch.Tensor],
    new_params: dict[str, torch.Tensor],
    src_of: dict[str, str | None],
    width: WidthMap,
    optimizer: torch.optim.AdamW,
    copier: _Copier,
) -> None:
    old_state = state.optimizer.state
    ref_step = next((st["step"] for st in old_state.values() if "step" in st), None)
    if ref_step is None:  # the old optimizer never stepped: nothing to carry
        return
    for name, p in new_params.items():
        src_name = src_of[name]
        st_old = old_state.get(old_params[src_name]) if src_name is not None else None
        if src_name is not None and not st_old:
            continue  # the old parameter has no state yet (it would be lazily initialised)
        if st_old is None:
            optimizer.state[p] = {
                "step": ref_step.clone(),
                "exp_avg": torch.zeros_like(p, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(p, memory_format=torch.preserve_format),
            }
            continue
        m = torch.empty_like(p, memory_format=torch.preserve_format)
        v = torch.empty_like(p, memory_format=torch.preserve_format)
        if width.identity:
            copier.add(sharding.local(m), sharding.local(st_old["exp_avg"]))
            copier.add(sharding.local(v), sharding.local(st_old["exp_avg_sq"]))
        else:
            for dst, key in ((m, "exp_avg"), (v, "exp_avg_sq")):
                with sharding.written_whole(dst) as t:
                    width.fill(t, sharding.full_tensor(st_old[key]), name, key)
        optimizer.state[p] = {"step": st_old["step"].clone(), "exp_avg": m, "exp_avg_sq": v}
    copier.flush()


# --- config glue ------------------------------------------------------------------------------------


def plan_from_config(growth: GrowthConfig, model: ModelConfig) -> GrowPlan:
    """The GrowPlan a growth stage describes, for the model the run is training at that stage.

    growth.op: a depth operator (plus width targets if any are set) or width (width only). The depth
    operators that take a factor use the paper's g = 4 when neither factor nor target_layers is set.
    """
    op = growth.op
    if op == "width":
        depth, factor = "none", 0
    elif (op in DEPTH_OPS and op != "none") or op == "learn":
        # learn: the plan is the copy operator its maps start from (G_stack), see fastgrow.grow_learn.
        depth, factor = ("stack" if op == "learn" else op), growth.factor
        if depth in ("stack", "interpolate", "zero", "random") and not (factor or growth.target_layers or growth.spec):
            factor = DEFAULT_FACTOR
    else:
        raise ValueError(f"growth.op must be one of {[*DEPTH_OPS[1:], 'width', 'learn']}, got {op!r}")
    return GrowPlan(
        depth=depth,
        factor=factor,
        target_layers=growth.target_layers,
        spec=growth.spec,
        noise=growth.noise,
        width=growth.width_op or "direct",
        target_dim=growth.target_dim,
        target_ffn_dim=growth.target_ffn_dim,
        target_heads=growth.target_heads,
        optimizer=growth.optimizer,
        schedule=growth.schedule,
        rewarm_steps=growth.rewarm_steps,
        lr=growth.lr,
        min_lr=growth.min_lr,
        warmup_steps=growth.warmup_steps,
        horizon_steps=growth.horizon_steps,
        jump_to_step=growth.jump_to_step,
    )


def apply_growth(state: TrainState, growth_cfg: GrowthConfig) -> TrainState:
    """plan_from_config + grow on the live state (what the trainer's growth event does for the
    built-in operators; see fastgrow.grow_event)."""
    return grow(state, plan_from_config(growth_cfg, state.model.cfg))
