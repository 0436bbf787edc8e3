"""A growth plan: what one growth event does, checked against a model before anything is allocated.

`GrowPlan` is the operator and its settings (the fields of a `[growth]` stage under the plan's own
names); `resolve_plan(plan, model_config)` validates it against the live architecture and computes the
target config and the source of every grown layer (`ResolvedPlan`); `plan_from_config` turns a run's
growth stage into a plan; `grown_schedule` is the LR schedule a plan's policy gives the grown phase.
The operators and policies themselves are described in fastgrow.grow, which applies a plan.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from fastgrow.config import (
    DEFAULT_FACTOR,
    OPTIMIZER_POLICIES,
    SCHEDULE_POLICIES,
    WIDTH_OPS,
    GrowthConfig,
    ModelConfig,
)
from fastgrow.grow_depth import DEPTH_SOURCES, depth_sources
from fastgrow.grow_width import WidthMap, check_direct
from fastgrow.growth_config import unused_field
from fastgrow.optim import LRSchedule

# "none": no depth change (width growth only); the rest are fastgrow.grow_depth's operators.
DEPTH_OPS = ("none", *DEPTH_SOURCES)


@dataclass(frozen=True)
class GrowPlan:
    """One growth event. Zero/empty/None fields mean "unchanged" / "not used"; a field the operator,
    width op or schedule policy does not read must stay unset (ValueError otherwise, as in [growth]).

    depth: one of DEPTH_OPS; factor / target_layers: the target depth (one of them); spec: the stacking
    notation for partial/sources (or a placement for zero/random); noise: a in [0, 1).
    width: direct | zero | random, applied when target_dim / target_ffn_dim / target_heads grow.
    optimizer: copy | reset; schedule: continue | rewarm | restart | jump with rewarm_steps, lr, min_lr,
    warmup_steps, horizon_steps, jump_to_step as in fastgrow.grow's doc.
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


def grown_schedule(schedule: LRSchedule, step: int, plan: GrowPlan) -> LRSchedule:
    """The LR schedule after a growth at `step` (policies in fastgrow.grow's doc), a new object;
    ValueError for an impossible one."""
    sched = LRSchedule.from_state_dict(schedule.state_dict())
    step = int(step)
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


# The depth operators that take a factor (the paper's g = 4 when none is given).
FACTOR_OPS = ("stack", "interpolate", "zero", "random")


def depth_and_factor(op: str, factor: int | None, target_layers: int, spec: str) -> tuple[str, int]:
    """The depth operator and factor of growth op `op` (the growth.op names; "none" = "width"). factor
    None: the paper's g for the operators that take one, unless target_layers or spec gives the depth.
    learn: the copy operator its maps start from (G_stack, see fastgrow.grow_learn)."""
    if op in ("width", "none"):
        return "none", 0
    depth = "stack" if op == "learn" else op
    if factor is None:
        factor = DEFAULT_FACTOR if depth in FACTOR_OPS and not (target_layers or spec) else 0
    return depth, factor


def plan_from_config(growth: GrowthConfig, model: ModelConfig) -> GrowPlan:
    """The GrowPlan a growth stage describes, for the model the run is training at that stage.

    growth.op: a depth operator (plus width targets if any are set) or width (width only). The depth
    operators that take a factor use the paper's g = 4 when neither factor nor target_layers is set.
    """
    op = growth.op
    if op != "width" and not (op in DEPTH_OPS and op != "none") and op != "learn":
        raise ValueError(f"growth.op must be one of {[*DEPTH_OPS[1:], 'width', 'learn']}, got {op!r}")
    depth, factor = depth_and_factor(op, growth.factor or None, growth.target_layers, growth.spec)
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
