"""grow(state, plan) -> state: grow a live TrainState in place on its device, optimizer included.

The whole training state is mapped at once: a new Transformer (the target ModelConfig) is allocated on
the state's device (uninitialised: module init is skipped, so nothing is initialised twice or
crosses the host), and every parameter and Adam moment is filled with device-to-device copies (batched
with `torch._foreach_copy_` where shapes match) or in-place fills; the Adam `step` tensors are cloned on
the device they live on. Nothing calls `.item()`, `.cpu()` or `.tolist()`, nothing synchronises, nothing
goes through disk. A new AdamW is built with `fastgrow.optim.build_optimizer`, so the new parameters
land in the right weight-decay groups.

Operators (Du et al. 2024, "Stacking Your Transformers"; DESIGN.md section 2):

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
noise a: every weight matrix of a copied block becomes (1-a) W + a eps, eps ~ N(0, init_std(name)) of
    the target model; norm gains, embeddings and the head get no noise (paper: a = 0.2 helps slightly).
width (see fastgrow.grow_width): direct | zero | random over dim (more heads, head dim kept), ffn_dim.

Moments: a copied layer carries its exp_avg / exp_avg_sq / step; width `direct` scales them by the
gradient scale s and s^2 (grow_width); new blocks and new width entries start at zero moments with the
common step. Random draws use a torch.Generator on the device seeded from (run seed, step), so a growth
is reproducible and leaves the global RNG alone.

Policies: optimizer copy | reset (a fresh AdamW, step 0, as the paper's code); schedule continue |
rewarm (LRSchedule.rewarm_start = step, rewarm_steps) | restart (LRSchedule.offset = step: warmup and
decay start over from the growth step).

Sharded states (FSDP2 under torchrun; parameters and moments are DTensors sharded on dim 0): grow()
allocates the grown model sharded over the same mesh (built on the meta device, never whole on a rank)
and writes it with the same operators. A tensor copied unchanged from a layer of the same shape (depth
growth) is copied shard to shard: every rank holds the same rows of every layer, so no data moves. A
tensor whose values come from the random stream (new blocks, noise) is drawn at full size and each rank
keeps its rows; a width map gathers its source tensor on the device (one all-gather per tensor) and
fills a full-size temporary whose local rows are kept. So a sharded growth gives bitwise the tensors one
process gives, with at most one tensor-sized temporary at a time (see fastgrow.distributed).
"""

from __future__ import annotations

import contextlib
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastgrow import distributed
from fastgrow.config import GrowthConfig, ModelConfig, RunConfig
from fastgrow.grow_depth import NEW_BLOCK, connection_rate, depth_sources, parse_spec, stack_sources
from fastgrow.grow_width import WIDTH_OPS, WidthMap, check_direct
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
    "grow_checkpoint",
    "growth_at_tokens",
    "parse_spec",
    "plan_from_config",
    "resolve_plan",
    "stack_sources",
]

DEPTH_OPS = ("none", "stack", "interpolate", "partial", "sources", "zero", "random")
OPTIMIZER_POLICIES = ("copy", "reset")
SCHEDULE_POLICIES = ("continue", "rewarm", "restart")
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
    """One growth event. Zero/empty fields mean "unchanged" / "not used".

    depth: one of DEPTH_OPS; factor / target_layers: the target depth (target_layers wins); spec: the
    stacking notation for partial/sources (or a placement for zero/random); noise: a in [0, 1).
    width: direct | zero | random, applied when target_dim / target_ffn_dim / target_heads grow.
    seed: the random operators' seed (None: the run's train.seed); the step is mixed in by grow().
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
    seed: int | None = None

    def __post_init__(self) -> None:
        if self.depth not in DEPTH_OPS:
            raise ValueError(f"unknown depth op {self.depth!r} (one of {DEPTH_OPS})")
        if self.width not in WIDTH_OPS:
            raise ValueError(f"unknown width op {self.width!r} (one of {WIDTH_OPS})")
        for name in (
            "factor",
            "target_layers",
            "target_dim",
            "target_ffn_dim",
            "target_heads",
            "rewarm_steps",
        ):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"grow plan {name} must be a non-negative integer, got {v!r}")
        if not 0.0 <= self.noise < 1.0:
            raise ValueError(f"grow plan noise must be in [0, 1), got {self.noise!r}")
        if self.optimizer not in OPTIMIZER_POLICIES:
            raise ValueError(f"grow plan optimizer must be one of {OPTIMIZER_POLICIES}, got {self.optimizer!r}")
        if self.schedule not in SCHEDULE_POLICIES:
            raise ValueError(f"grow plan schedule must be one of {SCHEDULE_POLICIES}, got {self.schedule!r}")
        if self.schedule == "rewarm" and self.rewarm_steps < 1:
            raise ValueError("grow plan schedule 'rewarm' needs rewarm_steps >= 1")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


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
        if plan.spec or plan.factor > 1 or plan.target_layers not in (0, L):
            raise ValueError("depth op 'none' takes no spec, factor or target_layers")
        sources = list(range(L))
    else:
        sources = depth_sources(plan.depth, L, plan.target_layers, plan.factor, plan.spec)
    dim, heads, kv, ffn = _target_widths(plan, cfg)
    dst = dataclasses.replace(cfg, n_layers=len(sources), dim=dim, n_heads=heads, n_kv_heads=kv, ffn_dim=ffn)
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
    return (int(base) * 1_000_003 + int(state.step) + 1) % (2**63 - 1)


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


@torch.no_grad()
def grow(state: TrainState, plan: GrowPlan) -> TrainState:
    """Return a new TrainState with the grown model, optimizer and schedule (see the module doc).

    The plan is resolved against the live architecture `state.model.cfg`; `state.config` (the run's
    config as launched) is carried unchanged. The input state is not modified. Validation (plan,
    sizes, optimizer state) happens before anything is allocated.
    """
    r = resolve_plan(plan, state.model.cfg)
    _check_optimizer(state)
    old_model = state.model
    dev = state.device
    dtype = old_model.tok_embeddings.weight.dtype

    # Allocated once, uninitialised, directly on the device (a meta build + to_empty costs ~5x more
    # host time: meta ops are Python decompositions); every tensor is written below.
    if distributed.model_is_sharded(old_model):
        new_model = distributed.sharded_like(r.dst, old_model)
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

    needs_rng = plan.noise > 0 or NEW_BLOCK in r.sources or (plan.width == "random" and not r.width.identity)
    gen = None
    if needs_rng:
        gen = torch.Generator(device=dev)
        gen.manual_seed(_seed(state, plan))

    old_params = dict(old_model.named_parameters())
    new_params = dict(new_model.named_parameters())
    src_of = {name: _source_name(name, r.sources) for name in new_params}
    copier = _Copier()
    width = r.width
    for name, p in new_params.items():
        src_name = src_of[name]
        if src_name is None:
            with distributed.written_whole(p) as t:
                _init_new_block_param(t, name, plan.depth, new_model.init_std(name), gen)
        elif width.identity:
            copier.add(distributed.local(p), distributed.local(old_params[src_name]))
        else:
            src = distributed.full_tensor(old_params[src_name])  # sharded: an all-gather of this tensor
            with distributed.written_whole(p) as t:
                width.fill(t, src, name, "param", new_model.init_std(name), gen)
    copier.flush()
    if plan.noise > 0:
        a = float(plan.noise)
        for name, p in new_params.items():
            if name.startswith("layers.") and p.dim() >= 2 and src_of[name] is not None:
                eps = distributed.empty_whole(p).normal_(0.0, new_model.init_std(name), generator=gen)
                distributed.local(p).mul_(1.0 - a).add_(distributed.local_rows(eps, p), alpha=a)

    optimizer = build_optimizer(new_model, state.config.train)
    old_lr = {g.get("group"): g["lr"] for g in state.optimizer.param_groups}
    for g in optimizer.param_groups:
        if g.get("group") in old_lr:
            g["lr"] = old_lr[g["group"]]
    if plan.optimizer == "copy":
        _carry_moments(state, old_params, new_params, src_of, width, optimizer, copier)

    schedule = LRSchedule.from_state_dict(state.schedule.state_dict())
    if plan.schedule == "rewarm":
        schedule.rewarm_start = state.step
        schedule.rewarm_steps = plan.rewarm_steps
    elif plan.schedule == "restart":
        schedule.offset = state.step
        schedule.rewarm_start, schedule.rewarm_steps = -1, 0

    record = {
        "op": plan.depth,
        "width_op": plan.width if not width.identity else None,
        "spec": plan.to_dict(),
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
        # state.config stays the run's config as launched (its [model] is the base, its [growth] the
        # event): a resume compares against it. The live architecture is model.cfg (what checkpoints
        # store as model_config).
        config=state.config,
        model=new_model,
        optimizer=optimizer,
        schedule=schedule,
        cursor=dict(state.cursor),
        growth_history=[*state.growth_history, record],
    )


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
            copier.add(distributed.local(m), distributed.local(st_old["exp_avg"]))
            copier.add(distributed.local(v), distributed.local(st_old["exp_avg_sq"]))
        else:
            for dst, key in ((m, "exp_avg"), (v, "exp_avg_sq")):
                with distributed.written_whole(dst) as t:
                    width.fill(t, distributed.full_tensor(st_old[key]), name, key)
        optimizer.state[p] = {"step": st_old["step"].clone(), "exp_avg": m, "exp_avg_sq": v}
    copier.flush()


# --- config glue ------------------------------------------------------------------------------------


def plan_from_config(growth: GrowthConfig, model: ModelConfig) -> GrowPlan:
    """The GrowPlan a run's [growth] section describes, for the model the run is training now.

    growth.op: stack | interpolate | partial | sources | zero | random (depth, plus width targets if
    any are set) or width (width only, growth.width_op). target_layers = 0 means layers * factor.
    """
    op = growth.op
    if op == "width":
        depth, factor, target = "none", 0, 0
    elif op in DEPTH_OPS and op != "none":
        depth, factor, target = op, growth.factor, growth.target_layers
    else:
        raise ValueError(f"growth.op must be one of {[*DEPTH_OPS[1:], 'width']}, got {op!r}")
    if depth in ("partial", "sources"):
        factor = 0  # the spec alone sets the depth
    return GrowPlan(
        depth=depth,
        factor=factor,
        target_layers=target,
        spec=growth.spec,
        noise=growth.noise,
        width=growth.width_op,
        target_dim=growth.target_dim,
        target_ffn_dim=growth.target_ffn_dim,
        target_heads=growth.target_heads,
        optimizer=growth.optimizer,
        schedule=growth.schedule,
        rewarm_steps=growth.rewarm_steps,
    )


def apply_growth(state: TrainState, growth_cfg: GrowthConfig) -> TrainState:
    """What the trainer calls at the growth event: plan_from_config + grow on the live state."""
    return grow(state, plan_from_config(growth_cfg, state.model.cfg))


def growth_at_tokens(run: RunConfig) -> int:
    """Token count at which the run grows (0: never). "auto" uses the planner's Eq. 10 for the target
    this run grows into, clamped to half the run's token budget (see fastgrow.plan)."""
    g = run.growth
    if not g.enabled:
        return 0
    if g.at_tokens != "auto":
        return int(g.at_tokens)
    from fastgrow.plan import auto_growth_tokens

    return auto_growth_tokens(run)


def grow_checkpoint(
    in_path: str | Path,
    out_path: str | Path,
    plan: GrowPlan,
    device: str | torch.device = "cpu",
    keep: int = 2,
) -> Path:
    """Grow a checkpoint on disk: load_checkpoint -> grow() (the same function a run uses) -> save.

    in_path: a step directory or a run directory (its newest complete checkpoint); out_path: the run
    directory to write `step-N` into. The output carries the input's RNG state, data cursor, step and
    schedule, so `fastgrow train --resume` on it continues exactly as a run that grew at that step
    would. The caller's global RNG state is left as it was. Returns the written step directory.
    """
    from fastgrow.checkpoint import latest_checkpoint, load_checkpoint, resolve_checkpoint, save_checkpoint

    src = resolve_checkpoint(in_path)
    out = Path(out_path)
    if out.resolve() == src.parent.resolve():
        # save_checkpoint would replace the source's own step-N directory.
        raise ValueError(f"grow_checkpoint: out_path must be another run directory than {src.parent}")
    existing = latest_checkpoint(out)
    if existing is not None:
        # Its newer/equal steps would outrank the grown checkpoint on --resume (or prune it away).
        raise ValueError(f"grow_checkpoint: {out} already holds checkpoints ({existing.name}); use a new run directory")
    cpu_rng = torch.get_rng_state()
    cuda_rng = torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None
    try:
        # restore_rng: the process RNG becomes the checkpoint's, so save_checkpoint writes it back out.
        state = load_checkpoint(src, device, restore_rng=True)
        grown = grow(state, plan)
        tok = src / "tokenizer.json"
        return save_checkpoint(grown, out, keep=max(2, keep), tokenizer=tok if tok.is_file() else None)
    finally:
        torch.set_rng_state(cpu_rng)
        if cuda_rng is not None:
            torch.cuda.set_rng_state_all(cuda_rng)
