"""Growth stages of a run: `GrowthConfig` (one `[growth]` / `[[growth]]` table) and which fields each
operator and schedule policy reads (strict settings: a field set that nothing reads is an error).

`fastgrow.config` re-exports everything here; `RunConfig.growth` is a tuple of these stages.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from fastgrow.config_values import check
from fastgrow.errors import ConfigError

GROWTH_OPS = ("stack", "interpolate", "partial", "sources", "zero", "random", "width", "learn")
WIDTH_OPS = ("direct", "zero", "random")
OPTIMIZER_POLICIES = ("copy", "reset")
SCHEDULE_POLICIES = ("continue", "rewarm", "restart", "jump")
# The paper's growth factor g, used by the depth operators when neither factor nor target_layers is given.
DEFAULT_FACTOR = 4

# Strict settings: the optional fields each choice reads. A field set away from its default that no
# choice of the stage reads is refused (it would be silently ignored otherwise). A new operator joins
# by adding its entry here (and its growth code in fastgrow.grow).
ALWAYS_USED = frozenset({"at_tokens", "op", "optimizer", "schedule"})
WIDTH_TARGETS = ("target_dim", "target_ffn_dim", "target_heads")
OP_FIELDS: dict[str, frozenset[str]] = {
    "stack": frozenset({"factor", "target_layers", "noise", *WIDTH_TARGETS}),
    "interpolate": frozenset({"factor", "target_layers", "noise", *WIDTH_TARGETS}),
    "partial": frozenset({"spec", "target_layers", "noise", *WIDTH_TARGETS}),
    "sources": frozenset({"spec", "target_layers", "noise", *WIDTH_TARGETS}),
    "zero": frozenset({"factor", "target_layers", "spec", "noise", *WIDTH_TARGETS}),
    "random": frozenset({"factor", "target_layers", "spec", "noise", *WIDTH_TARGETS}),
    "width": frozenset(WIDTH_TARGETS),
    # G_learn (fastgrow.grow_learn): maps initialised to G_stack (+ width direct), trained learn_steps steps.
    "learn": frozenset({"factor", "target_layers", "learn_steps", "learn_lr", *WIDTH_TARGETS}),
}
SCHEDULE_FIELDS: dict[str, frozenset[str]] = {
    "continue": frozenset(),
    "rewarm": frozenset({"rewarm_steps"}),
    "restart": frozenset({"lr", "min_lr", "warmup_steps", "horizon_steps"}),
    "jump": frozenset({"jump_to_step", "rewarm_steps", "lr", "min_lr"}),
}


@dataclass(frozen=True)
class GrowthConfig:
    """One growth stage of a run (see fastgrow/grow.py for the operators, README "Growing a model").

    A field left at its default is unset; setting a field the stage's op / width_op / schedule does not
    read is an error (see OP_FIELDS, SCHEDULE_FIELDS), so nothing is silently ignored.

    at_tokens: the training-token count at which the stage grows (> 0), or "auto" (Eq. 10 of Du et al.
        2024, one-stage runs only).
    op: the depth operator, or "width" for width growth alone. factor / target_layers: the target depth
        of stack, interpolate, zero, random (neither: factor 4); spec: the layer list of partial /
        sources (required) or the placement of new blocks for zero / random.
    target_dim / target_ffn_dim / target_heads: width targets (any op); width_op: direct | zero |
        random (default direct), only with a width target.
    learn_steps / learn_lr: op learn only, the operator's training steps (default 100) and its Adam LR
        (default 1e-2, scaled per map by 1 / fan_in; see fastgrow.grow_learn).
    optimizer: copy (carry Adam moments; for learn, mapped through the learned maps) | reset (a fresh AdamW).
    schedule: continue | rewarm (linear re-warm over rewarm_steps) | restart (the grown phase gets its
        own warmup and decay from the growth step: lr, min_lr, warmup_steps, horizon_steps, each
        defaulting to the run's) | jump (the schedule moves to step jump_to_step of the target's
        schedule, optional linear re-warm over rewarm_steps, optional new lr / min_lr).
    """

    at_tokens: int | str = 0
    op: str = "stack"
    factor: int = 0
    target_layers: int = 0
    spec: str = ""  # partial stacking spec, e.g. "12-3456*5-56", or a comma list of 1-based sources
    noise: float = 0.0
    target_dim: int = 0
    target_ffn_dim: int = 0
    target_heads: int = 0
    width_op: str = ""  # direct (the default once a width target is set) | zero | random
    optimizer: str = "copy"
    schedule: str = "continue"
    rewarm_steps: int = 0
    lr: float | None = None
    min_lr: float | None = None
    warmup_steps: int | None = None
    horizon_steps: int | None = None
    jump_to_step: int | None = None
    learn_steps: int | None = None
    learn_lr: float | None = None

    def __post_init__(self) -> None:
        check(self.at_tokens != 0, 'growth.at_tokens is required: the token count at which the stage grows, or "auto"')
        check(
            (isinstance(self.at_tokens, int) and not isinstance(self.at_tokens, bool) and self.at_tokens > 0)
            or self.at_tokens == "auto",
            f'growth.at_tokens must be a token count > 0 or "auto", got {self.at_tokens!r}',
        )
        check(self.op in GROWTH_OPS, f"growth.op must be one of {GROWTH_OPS}, got {self.op!r}")
        for name in ("factor", "target_layers", "rewarm_steps", *WIDTH_TARGETS):
            v = getattr(self, name)
            check(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0,
                f"growth.{name} must be a non-negative integer, got {v!r}",
            )
        check(0 <= self.noise < 1, f"growth.noise must be in [0, 1), got {self.noise}")
        check(self.width_op in ("", *WIDTH_OPS), f"growth.width_op must be one of {WIDTH_OPS}, got {self.width_op!r}")
        check(
            self.optimizer in OPTIMIZER_POLICIES,
            f"growth.optimizer must be one of {OPTIMIZER_POLICIES}, got {self.optimizer!r}",
        )
        check(
            self.schedule in SCHEDULE_POLICIES,
            f"growth.schedule must be one of {SCHEDULE_POLICIES}, got {self.schedule!r}",
        )
        self._check_unused()
        check(
            not (self.factor and self.target_layers),
            f"growth.factor ({self.factor}) and growth.target_layers ({self.target_layers}): give one, not both",
        )
        check(
            self.op not in ("partial", "sources") or bool(self.spec),
            f"growth.spec: op {self.op!r} needs a spec (e.g. '1-234*7-56' or '1,2,3,1,2,3')",
        )
        check(
            self.op != "width" or self.widens,
            "growth.op = 'width' needs a width target (growth.target_dim, target_ffn_dim or target_heads)",
        )
        check(
            self.schedule != "rewarm" or self.rewarm_steps >= 1,
            'growth.rewarm_steps: schedule = "rewarm" needs rewarm_steps >= 1',
        )
        check(
            self.schedule != "jump" or self.jump_to_step is not None,
            'growth.jump_to_step: schedule = "jump" needs the step of the target\'s schedule to jump to',
        )
        for name in ("warmup_steps", "jump_to_step"):
            v = getattr(self, name)
            check(
                v is None or (isinstance(v, int) and not isinstance(v, bool) and v >= 0),
                f"growth.{name} must be a non-negative integer, got {v!r}",
            )
        h = self.horizon_steps
        check(
            h is None or (isinstance(h, int) and not isinstance(h, bool) and h >= 1),
            f"growth.horizon_steps must be a positive integer, got {h!r}",
        )
        check(
            h is None or self.warmup_steps is None or self.warmup_steps <= h,
            f"growth.warmup_steps ({self.warmup_steps}) must not exceed growth.horizon_steps ({h})",
        )
        check(self.lr is None or self.lr > 0, f"growth.lr must be > 0, got {self.lr}")
        n = self.learn_steps
        check(
            n is None or (isinstance(n, int) and not isinstance(n, bool) and n >= 1),
            f"growth.learn_steps must be an integer >= 1 (the operator's training steps), got {n!r}",
        )
        check(self.learn_lr is None or self.learn_lr > 0, f"growth.learn_lr must be > 0, got {self.learn_lr}")
        check(
            self.op != "learn" or self.width_op in ("", "direct"),
            f"growth.width_op = {self.width_op!r}: op 'learn' starts its width maps from width 'direct'",
        )
        check(self.min_lr is None or self.min_lr >= 0, f"growth.min_lr must be >= 0, got {self.min_lr}")
        check(
            self.lr is None or self.min_lr is None or self.min_lr <= self.lr,
            f"growth.min_lr ({self.min_lr}) must not exceed growth.lr ({self.lr})",
        )

    @property
    def widens(self) -> bool:
        """Whether the stage sets a width target."""
        return any(getattr(self, name) for name in WIDTH_TARGETS)

    def _check_unused(self) -> None:
        values = {f.name: getattr(self, f.name) for f in fields(self)}
        defaults = {f.name: f.default for f in fields(self)}
        bad = unused_field(self.op, self.schedule, self.widens, values, defaults)
        if bad is not None:
            name, why = bad
            raise ConfigError(f"growth.{name} = {values[name]!r} is not used: {why}")


SCHEDULE_FIELDS_ANY = frozenset().union(*SCHEDULE_FIELDS.values())


def used_fields(op: str, schedule: str, widens: bool) -> frozenset[str]:
    """The GrowthConfig fields a stage of this op and schedule policy reads."""
    used = ALWAYS_USED | OP_FIELDS.get(op, frozenset()) | SCHEDULE_FIELDS.get(schedule, frozenset())
    return used | {"width_op"} if widens else used


def unused_field(
    op: str, schedule: str, widens: bool, values: dict[str, Any], defaults: dict[str, Any]
) -> tuple[str, str] | None:
    """(field, why) of the first field set away from its default that neither the op, the schedule
    policy nor the width targets read; None when every set field is read. Field names are GrowthConfig's."""
    used = used_fields(op, schedule, widens)
    for name, value in values.items():
        if name in used or name not in defaults or value == defaults[name]:
            continue
        if name == "width_op":
            return name, "it needs a width target (target_dim, target_ffn_dim or target_heads)"
        if name in SCHEDULE_FIELDS_ANY:
            readers = sorted(k for k, v in SCHEDULE_FIELDS.items() if name in v)
            return name, f"schedule {schedule!r} does not read it (only schedule {' / '.join(readers)} does)"
        readers = sorted(k for k, v in OP_FIELDS.items() if name in v)
        return name, f"op {op!r} does not read it (only op {' / '.join(readers) or 'none'} does)"
    return None


def growth_from_legacy(d: dict[str, Any]) -> list[dict[str, Any]]:
    """A single [growth] table of an older fastgrow (every field present, at_tokens = 0 meaning no
    growth, fields an operator did not read silently ignored) as a list of stage dicts: keys the
    stage's op / schedule do not read are dropped, so old checkpoints keep loading."""
    if d.get("at_tokens", 0) == 0:
        return []
    op = d.get("op", "stack")
    schedule = d.get("schedule", "continue")
    if op not in OP_FIELDS or schedule not in SCHEDULE_FIELDS:
        return [dict(d)]  # let GrowthConfig name the bad value
    used = used_fields(op, schedule, any(d.get(k) for k in WIDTH_TARGETS))
    names = {f.name for f in fields(GrowthConfig)}
    out = {k: v for k, v in d.items() if k in used or k not in names}
    if op in ("partial", "sources"):
        out.pop("factor", None)
    elif out.get("factor") and out.get("target_layers"):
        out.pop("factor")  # the old code let target_layers win
    return [out]
