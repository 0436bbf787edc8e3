"""grow(state, plan) -> state: grow a live TrainState in place on its device, optimizer included.

The whole training state is mapped at once, on the state's device: the grown model's modules are built
without initialising anything, every parameter and Adam moment is written exactly once by
device-to-device copies (all of them one `torch._foreach_copy_`) or by the operator's fills and draws,
and the Adam `step` tensors are copied on the device they live on. Nothing calls `.item()`, `.cpu()`
or `.tolist()`, nothing synchronises, nothing goes through disk. A new AdamW is built with
`fastgrow.optim.build_optimizer`, so the new parameters land in the right weight-decay groups.
(fastgrow.grow_tensors: how the storage is allocated and filled, and what each choice saves.)

The input state: `grow(state, plan)` leaves it untouched and independent of the result (every tensor
of the result is new storage). `grow(state, plan, consume=True)` hands the input's tensors over to the
result instead: one copy of each source layer (the first), the embeddings, the final norm, the head, the
RoPE tables and the Adam moments and steps that go with them are taken over, not copied, which saves
their copies and makes the peak memory of a growth the grown state's size instead of old + new (6 ->
24 layers: 18 layers are copied instead of 24, plus embeddings and head). The input must then not be
used again (its model and optimizer share storage with the result); if grow() raises, it is unchanged.
The trainer and `fastgrow grow` consume (they drop the old state); callers that keep the input use the
default. Take-over applies where a tensor keeps its shape and storage layout: depth growth in one
process; width growth, sharded (FSDP2) states and `weights=` operators copy everything.

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

import dataclasses
from collections.abc import Callable

import torch

from fastgrow import sharding
from fastgrow.config import GrowthConfig
from fastgrow.grow_depth import NEW_BLOCK, connection_rate, parse_spec, stack_sources
from fastgrow.grow_plan import DEPTH_OPS, GrowPlan, ResolvedPlan, grown_schedule, plan_from_config, resolve_plan
from fastgrow.grow_tensors import (
    Copier,
    FusedAlloc,
    gc_paused,
    grown_modules,
    init_new_block_param,
    owners,
    parameter_slots,
    source_name,
    step_copies,
)
from fastgrow.model import Transformer, flops_per_token
from fastgrow.optim import build_optimizer
from fastgrow.state import TrainState

__all__ = [
    "DEPTH_OPS",
    "GrowPlan",
    "ResolvedPlan",
    "WeightsFn",
    "apply_growth",
    "connection_rate",
    "grow",
    "parse_spec",
    "plan_from_config",
    "resolve_plan",
    "stack_sources",
]

ADAM_KEYS = {"step", "exp_avg", "exp_avg_sq"}

# A function that writes every grown parameter: weights(new_params, old_params, resolved, generator).
WeightsFn = Callable[[dict[str, torch.Tensor], dict[str, torch.Tensor], ResolvedPlan, "torch.Generator | None"], None]


def _seed(state: TrainState, plan: GrowPlan) -> int:
    base = plan.seed if plan.seed is not None else state.config.train.seed
    stage = len(state.growth_history)  # two stages at one step draw differently; stage 0 as before
    return (int(base) * 1_000_003 + int(state.step) + 1 + stage * 7_919) % (2**63 - 1)


def _check_optimizer(state: TrainState, params: dict[str, torch.Tensor]) -> None:
    for p, st in state.optimizer.state.items():
        extra = set(st) - ADAM_KEYS
        if extra:
            raise ValueError(f"grow() can carry AdamW state {sorted(ADAM_KEYS)} only, found {sorted(extra)}")
        if "exp_avg" in st and st["exp_avg"].shape != p.shape:
            raise ValueError("optimizer state does not match the model's parameters")
    names = {id(p) for p in params.values()}
    if any(id(p) not in names for g in state.optimizer.param_groups for p in g["params"]):
        raise ValueError("the optimizer holds parameters that are not the model's")


@torch.no_grad()
@gc_paused()
def grow(state: TrainState, plan: GrowPlan, *, weights: WeightsFn | None = None, consume: bool = False) -> TrainState:
    """Return a new TrainState with the grown model, optimizer and schedule (see the module doc).

    The plan is resolved against the live architecture `state.model.cfg`; `state.config` (the run's
    config as launched) is carried unchanged. Validation (plan, sizes, optimizer state) happens before
    anything is allocated.

    consume: False (default): the input state is not modified and shares no storage with the result.
    True: the result takes over the input's tensors where it can (module doc); the input must not be
    used afterwards. If grow() raises, the input is unchanged either way.
    weights: an operator that computes the grown weights itself writes every new parameter through
    it (called with a device generator seeded as below); with optimizer "copy" the moments are still
    carried by the plan's mapping (sources and width op).
    """
    r = resolve_plan(plan, state.model.cfg)
    old_model = state.model
    sharded = hasattr(old_model, "reshard") and sharding.model_is_sharded(old_model)  # an FSDP2 module
    if sharded:  # a forward without backward leaves the root gathered
        sharding.reshard(old_model)
    old_params = dict(old_model.named_parameters())
    _check_optimizer(state, old_params)
    schedule = grown_schedule(state.schedule, state.step, plan)
    if weights is not None and sharded:
        # It would need every full tensor of the old and the new model on every rank.
        raise ValueError(
            "this growth operator computes the grown weights itself and does not run on a sharded (FSDP) "
            'state; train it with train.parallel = "ddp" under torchrun, or in one process'
        )
    needs_rng = (
        weights is not None
        or plan.noise > 0
        or NEW_BLOCK in r.sources
        or (plan.width in ("zero", "random") and not r.width.identity)
    )
    gen = None
    if needs_rng:
        gen = torch.Generator(device=state.device)
        gen.manual_seed(_seed(state, plan))
    take = consume and not sharded and r.width.identity and weights is None
    owned = owners(r.sources, take)
    copier = Copier()
    if sharded:
        new_model, new_params = _sharded_params(old_model, old_params, r, gen, copier)
    else:
        new_model, new_params = _params(old_model, old_params, r, gen, copier, owned, take, weights is None)
    src_of = {name: source_name(name, r.sources) for name in new_params}
    if weights is not None:
        weights(new_params, old_params, r, gen)

    optimizer = build_optimizer(new_model, state.config.train, list(new_params.items()))
    old_lr = {g.get("group"): g["lr"] for g in state.optimizer.param_groups}
    for g in optimizer.param_groups:
        if g.get("group") in old_lr:
            g["lr"] = old_lr[g["group"]]
    if plan.optimizer == "copy":
        _carry_moments(state, old_params, new_params, src_of, r, optimizer, copier, owned, take, sharded)
    copier.flush()
    # Last, so nothing can fail after a taken-over tensor is changed in place (same draws as before).
    if plan.noise > 0:
        a = float(plan.noise)
        for name, p in new_params.items():
            if name.startswith("layers.") and p.dim() >= 2 and src_of[name] is not None:
                eps = sharding.empty_whole(p).normal_(0.0, new_model.init_std(name), generator=gen)
                sharding.local(p).mul_(1.0 - a).add_(sharding.local_rows(eps, p), alpha=a)
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
        growth_history=[*state.growth_history, _record(state, plan, r, _seed(state, plan) if needs_rng else None)],
    )


def _sources(name: str, sources: list[int], owned: set[int], take: bool) -> tuple[str | None, bool]:
    """(the old parameter a grown one comes from, None for a new block; whether it takes over that
    tensor: those of the layers in `owned`, and the top-level ones when taking over at all)."""
    if not name.startswith("layers."):
        return name, take
    _, i, rest = name.split(".", 2)
    s = sources[int(i)]
    return (None if s == NEW_BLOCK else f"layers.{s}.{rest}"), int(i) in owned


def _params(
    old: Transformer,
    old_p: dict[str, torch.Tensor],
    r: ResolvedPlan,
    gen: torch.Generator | None,
    copier: Copier,
    owned: set[int],
    take: bool,
    write: bool,
) -> tuple[Transformer, dict[str, torch.nn.Parameter]]:
    """The grown model of one process, every parameter written (write=False: allocated only, for a
    `weights=` operator): taken over, copied (queued on `copier`), filled by the width map, or new."""
    # RoPE: head dim, max_seq_len and theta are kept by growth, so the old tables are the new ones.
    model = grown_modules(old, r.dst, {n: (b if take else b.clone()) for n, b in old.named_buffers()})
    dtype = old.tok_embeddings.weight.dtype
    alloc = FusedAlloc(old.tok_embeddings.weight.device)
    slots = []
    for name, mod, attr in parameter_slots(model):
        s, taken = _sources(name, r.sources, owned, take)
        if taken:  # the old storage, under a new Parameter object
            slots.append((name, mod, attr, s, old_p[s].detach()))
        else:
            slots.append(
                (name, mod, attr, s, alloc.request(mod._parameters[attr].shape, dtype if s is None else old_p[s].dtype))
            )
    fresh = alloc.allocate()
    out: dict[str, torch.nn.Parameter] = {}
    for name, mod, attr, s, t in slots:
        if isinstance(t, int):
            t = fresh[t]
            if not write:
                pass
            elif s is None:
                init_new_block_param(t, name, r.plan.depth, model.init_std(name), gen)
            elif r.width.identity:
                copier.add(t, old_p[s])
            else:
                r.width.fill(t, old_p[s], name, "param", model.init_std(name), gen)
        p = torch.nn.Parameter(t, requires_grad=True if s is None else old_p[s].requires_grad)
        mod._parameters[attr] = out[name] = p
    return model, out


def _sharded_params(
    old: Transformer, old_p: dict[str, torch.Tensor], r: ResolvedPlan, gen: torch.Generator | None, copier: Copier
) -> tuple[Transformer, dict[str, torch.nn.Parameter]]:
    """The grown model of an FSDP2-sharded state, every parameter written (module doc, Sharded states)."""
    model = sharding.sharded_like(r.dst, old)
    dtype = old.tok_embeddings.weight.dtype
    if dtype != model.tok_embeddings.weight.dtype:
        model = model.to(dtype=dtype)
    old_buffers = dict(old.named_buffers())
    for name, buf in model.named_buffers():
        src = old_buffers.get(name)
        if src is None or src.shape != buf.shape:
            raise RuntimeError(f"grow(): no matching buffer {name!r} in the old model to copy")
        buf.copy_(src)
    if not old.training:  # modules are built in training mode
        model.eval()
    new_p = dict(model.named_parameters())
    for name, p in new_p.items():
        s = source_name(name, r.sources)
        if s is None:
            with sharding.written_whole(p) as t:
                init_new_block_param(t, name, r.plan.depth, model.init_std(name), gen)
        elif r.width.identity:  # every rank holds the same rows of every layer: shard to shard
            copier.add(sharding.local(p), sharding.local(old_p[s]))
        else:
            src = sharding.full_tensor(old_p[s])  # an all-gather of this tensor
            with sharding.written_whole(p) as t:
                r.width.fill(t, src, name, "param", model.init_std(name), gen)
    return model, new_p


def _carry_moments(
    state: TrainState,
    old_params: dict[str, torch.Tensor],
    new_params: dict[str, torch.nn.Parameter],
    src_of: dict[str, str | None],
    r: ResolvedPlan,
    optimizer: torch.optim.AdamW,
    copier: Copier,
    owned: set[int],
    take: bool,
    sharded: bool,
) -> None:
    """Adam state of the grown parameters: a copied layer carries its source's moments and step (taken
    over by the owning copy), new entries start at zero moments with the common step."""
    old_state = state.optimizer.state
    ref_step = next((st["step"] for st in old_state.values() if "step" in st), None)
    if ref_step is None:  # the old optimizer never stepped: nothing to carry
        return
    alloc = FusedAlloc(next(iter(new_params.values())).device)
    pending = []
    for name, p in new_params.items():
        s = src_of[name]
        st = old_state.get(old_params[s]) if s is not None else None
        if s is not None and not st:
            continue  # the old parameter has no state yet (it would be lazily initialised)
        if st is not None and _sources(name, r.sources, owned, take)[1]:
            optimizer.state[p] = {"step": st["step"], "exp_avg": st["exp_avg"], "exp_avg_sq": st["exp_avg_sq"]}
        elif sharded:  # DTensors like their parameter
            make = torch.zeros_like if st is None else torch.empty_like
            pending.append((name, p, st, make(p), make(p)))
        else:
            pending.append(
                (name, p, st, alloc.request(p.shape, p.dtype, st is None), alloc.request(p.shape, p.dtype, st is None))
            )
    fresh = alloc.allocate()
    step_src = []
    for name, p, st, m, v in pending:
        if isinstance(m, int):
            m, v = fresh[m], fresh[v]
        if st is None:  # new entries: zero moments (allocated as zeros), the common step
            step_src.append(ref_step)
        elif r.width.identity:
            for dst, src in ((m, st["exp_avg"]), (v, st["exp_avg_sq"])):
                if sharded:  # shard to shard
                    dst, src = sharding.local(dst), sharding.local(src)
                copier.add(dst, src)
            step_src.append(st["step"])
        else:
            for dst, kind in ((m, "exp_avg"), (v, "exp_avg_sq")):
                with sharding.written_whole(dst) as t:
                    r.width.fill(t, sharding.full_tensor(st[kind]), name, kind)
            step_src.append(st["step"])
        optimizer.state[p] = {"step": None, "exp_avg": m, "exp_avg_sq": v}
    for (_, p, *_), step in zip(pending, step_copies(step_src, copier)):
        optimizer.state[p]["step"] = step


def _record(state: TrainState, plan: GrowPlan, r: ResolvedPlan, seed: int | None) -> dict:
    """The growth_history entry of this growth."""
    return {
        "op": plan.depth,
        "width_op": plan.width if not r.width.identity else None,
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
        "seed": seed,
        "step": int(state.step),
        "tokens": int(state.tokens),
    }


# --- config glue ------------------------------------------------------------------------------------


def apply_growth(state: TrainState, growth_cfg: GrowthConfig, *, consume: bool = False) -> TrainState:
    """plan_from_config + grow on the live state (what the trainer's growth event does for the
    built-in operators, with consume=True; see fastgrow.grow_event)."""
    return grow(state, plan_from_config(growth_cfg, state.model.cfg), consume=consume)
