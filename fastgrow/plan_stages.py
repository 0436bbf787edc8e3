"""Staged Training's planner (Shen et al. 2022): when each stage of a multi-stage run should grow.

A Kaplan-form scaling law gives the loss of a model of N non-embedding parameters after D training
tokens (C = 6 N D training FLOPs):

    L(N, D) = (n_c / N)^alpha_n + (d_c / D)^alpha_d

Along its own training curve a model at loss L has trained D_N(L) = d_c (L - A_N)^(-1/alpha_d) tokens
(A_N = (n_c / N)^alpha_n, its loss floor) and lowers its loss per FLOP at the rate

    e(N, L) = -dL/dC = alpha_d (L - A_N)^(1 + 1/alpha_d) / (6 N d_c)

Small models are the more efficient early, the larger ones later. Staged Training grows from N1 to N2
when the small model's efficiency falls to the large model's at the same loss (the growth preserves
the loss, so the large model goes on from there): e(N1, L*) = e(N2, L*), which has a closed form,

    L* = (A_1 - r A_2) / (1 - r),   r = (N1 / N2)^(1 / (1 + 1/alpha_d)).

Stage k's model trains from its equivalent start D_{N_k}(L*_{k-1}) (the tokens a from-scratch run of
that model needs to reach the loss it inherits) to D_{N_k}(L*_k); the real tokens of the stage are the
difference, and the run's `at_tokens` of each growth are their running sum. After growth the schedule
jumps (`schedule = "jump"`) to the step a from-scratch run of the grown model would be at, at that loss:
jump_to_step = D_{N_{k+1}}(L*_k) / tokens_per_step, with a linear re-warm.

Default constants: Kaplan et al. 2020 (Table 5) n_c = 8.8e13, alpha_n = 0.076 and the learning-curve
exponent alpha_d = alpha_S = 0.76, with S_c = 2.1e3 steps converted to tokens at the critical batch
size at L = 3 (B_crit = 2.1e8 / 3^(1/0.21) = 1.1M tokens, and the factor 2 of S_min = S / 2 at
B = B_crit): d_c = 2 * 2.1e3 * 1.12e6 = 4.7e9 tokens. They were fitted on GPT-2-style models with
another tokenizer and data; treat the plan as the shape of a schedule, refit the constants for yours.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from fastgrow.config import ModelConfig

GROW_KINDS = ("depth", "width", "alternate")


@dataclass(frozen=True)
class ScalingLaw:
    """L(N, D) = (n_c / N)^alpha_n + (d_c / D)^alpha_d (N non-embedding parameters, D tokens)."""

    n_c: float = 8.8e13
    alpha_n: float = 0.076
    d_c: float = 4.7e9
    alpha_d: float = 0.76

    def __post_init__(self) -> None:
        for name in ("n_c", "alpha_n", "d_c", "alpha_d"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and v > 0 and math.isfinite(v)):
                raise ValueError(f"scaling law constant {name} must be a positive number, got {v!r}")

    def floor(self, n: float) -> float:
        """The loss a model of n non-embedding parameters tends to with unlimited data."""
        return (self.n_c / n) ** self.alpha_n

    def loss(self, n: float, d: float) -> float:
        return self.floor(n) + (self.d_c / d) ** self.alpha_d

    def tokens_to(self, n: float, loss: float) -> float:
        """Tokens a from-scratch run of n parameters needs to reach `loss` (inf at or below its floor)."""
        gap = loss - self.floor(n)
        return math.inf if gap <= 0 else self.d_c * gap ** (-1.0 / self.alpha_d)

    def efficiency(self, n: float, loss: float) -> float:
        """-dL/dC at `loss` along the training curve of n parameters (C = 6 n D)."""
        gap = loss - self.floor(n)
        return 0.0 if gap <= 0 else self.alpha_d * gap ** (1.0 + 1.0 / self.alpha_d) / (6.0 * n * self.d_c)

    def crossover(self, n1: float, n2: float) -> float:
        """The loss at which n1's efficiency falls to n2's (n1 < n2): Staged Training's growth point."""
        if not 0 < n1 < n2:
            raise ValueError(f"crossover needs 0 < n1 < n2, got {n1}, {n2}")
        r = (n1 / n2) ** (1.0 / (1.0 + 1.0 / self.alpha_d))
        return (self.floor(n1) - r * self.floor(n2)) / (1.0 - r)


@dataclass(frozen=True)
class Stage:
    """One phase of the plan: `model` trains `tokens` real tokens from tokens_start; then (unless it is
    the last) the run grows with `growth` at loss `loss_end`."""

    model: ModelConfig
    params: int  # non-embedding
    tokens_start: int
    tokens: int
    loss_start: float | None
    loss_end: float
    growth: dict[str, Any] | None  # the [[growth]] table that ends this phase


@dataclass(frozen=True)
class StagedPlan:
    law: ScalingLaw
    tokens_per_step: int
    budget_tokens: int
    stages: tuple[Stage, ...]
    dropped: int  # growths the token budget ends before
    flops: float  # 6 N D over the phases (non-embedding N)
    scratch_tokens: float  # tokens a from-scratch target needs to reach the plan's final loss
    scratch_flops: float

    @property
    def growths(self) -> list[dict[str, Any]]:
        return [s.growth for s in self.stages if s.growth is not None]

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["stages"] = [{**dataclasses.asdict(s), "model": s.model.architecture()} for s in self.stages]
        d["savings"] = 1.0 - self.flops / self.scratch_flops if self.scratch_flops > 0 else None
        return d


def stage_models(target: ModelConfig, stages: int, grow: str = "depth") -> list[tuple[ModelConfig, dict[str, Any]]]:
    """The base and the model after each of `stages` x2 growths into `target`, each with the growth table
    that makes it: depth (stack x2), width (dim, heads and ffn x2, width op direct), or alternate
    (depth, then width, then depth, ...). Returns [(base, {}), (model_1, growth_1), ...]."""
    if grow not in GROW_KINDS:
        raise ValueError(f"grow must be one of {GROW_KINDS}, got {grow!r}")
    if not isinstance(stages, int) or stages < 1:
        raise ValueError(f"stages must be a positive integer, got {stages!r}")
    kinds = [
        ("depth" if grow == "depth" else "width" if grow == "width" else ("depth", "width")[i % 2])
        for i in range(stages)
    ]
    n_depth, n_width = kinds.count("depth"), kinds.count("width")
    if target.n_layers % 2**n_depth:
        raise ValueError(f"{target.n_layers} target layers cannot be halved {n_depth} times; pick fewer stages")
    w = 2**n_width
    if target.n_kv_heads % w or target.ffn_dim % w:
        raise ValueError(
            f"the target's width (kv heads {target.n_kv_heads}, ffn {target.ffn_dim}) cannot be halved {n_width} "
            "times; pick fewer stages or grow depth"
        )
    base = dataclasses.replace(
        target,
        n_layers=target.n_layers // 2**n_depth,
        dim=target.dim // w,
        n_heads=target.n_heads // w,
        n_kv_heads=target.n_kv_heads // w,
        ffn_dim=target.ffn_dim // w,
    )
    out = [(base, {})]
    cur = base
    for kind in kinds:
        if kind == "depth":
            cur = dataclasses.replace(cur, n_layers=cur.n_layers * 2)
            growth = {"op": "stack", "factor": 2}
        else:
            cur = dataclasses.replace(
                cur, dim=cur.dim * 2, n_heads=cur.n_heads * 2, n_kv_heads=cur.n_kv_heads * 2, ffn_dim=cur.ffn_dim * 2
            )
            growth = {"op": "width", "target_dim": cur.dim, "target_ffn_dim": cur.ffn_dim, "width_op": "direct"}
        out.append((cur, growth))
    return out


def plan_stages(
    target: ModelConfig,
    tokens: int,
    *,
    stages: int = 2,
    grow: str = "depth",
    tokens_per_step: int = 512 * 1024,
    rewarm_steps: int = 200,
    law: ScalingLaw | None = None,
) -> StagedPlan:
    """Staged Training's schedule for a run of `tokens` tokens that ends as `target` (module doc)."""
    law = law or ScalingLaw()
    if tokens <= 0 or tokens_per_step <= 0:
        raise ValueError(f"tokens and tokens_per_step must be > 0, got {tokens}, {tokens_per_step}")
    if rewarm_steps < 0:
        raise ValueError(f"rewarm_steps must be >= 0, got {rewarm_steps}")
    models = stage_models(target, stages, grow)
    params = [m.num_params(include_embeddings=False) for m, _ in models]
    out: list[Stage] = []
    real = 0.0  # real tokens so far
    eff = 0.0  # the current model's equivalent tokens
    loss_in: float | None = None
    dropped = 0
    flops = 0.0
    for k, (model, _) in enumerate(models):
        n = params[k]
        last = k == len(models) - 1
        if not last:
            l_star = law.crossover(n, params[k + 1])
            d_end = law.tokens_to(n, l_star)
            stage_tokens = d_end - eff
        if last or real + stage_tokens >= tokens or stage_tokens <= 0:
            # The budget ends in this phase (or the law never favours the next size): the rest is here.
            stage_tokens = tokens - real
            dropped = len(models) - 1 - k
            loss_end = law.loss(n, eff + stage_tokens)
            out.append(Stage(model, n, int(round(real)), int(round(stage_tokens)), loss_in, loss_end, None))
            flops += 6.0 * n * stage_tokens
            real = tokens
            break
        next_n = params[k + 1]
        at = int(math.ceil((real + stage_tokens) / tokens_per_step)) * tokens_per_step  # whole steps
        stage_tokens = at - real
        loss_end = law.loss(n, eff + stage_tokens)
        jump = int(round(law.tokens_to(next_n, loss_end) / tokens_per_step))
        growth = {"at_tokens": at, **models[k + 1][1], "schedule": "jump", "jump_to_step": jump}
        if rewarm_steps:
            growth["rewarm_steps"] = rewarm_steps
        out.append(Stage(model, n, int(round(real)), int(round(stage_tokens)), loss_in, loss_end, growth))
        flops += 6.0 * n * stage_tokens
        real = at
        eff = law.tokens_to(next_n, loss_end)
        loss_in = loss_end
    final = out[-1]
    scratch_tokens = law.tokens_to(params[-1], final.loss_end) if final.model == target else math.nan
    return StagedPlan(
        law=law,
        tokens_per_step=tokens_per_step,
        budget_tokens=int(tokens),
        stages=tuple(out),
        dropped=dropped,
        flops=flops,
        scratch_tokens=scratch_tokens,
        scratch_flops=6.0 * params[-1] * scratch_tokens,
    )


def growth_toml(plan: StagedPlan) -> str:
    """The plan as TOML to paste into a run config: the base `[model]` and one `[[growth]]` per growth."""
    base = plan.stages[0].model
    lines = ["[model]  # the base the run starts from"]
    for k, v in base.architecture().items():
        lines.append(f"{k} = {v!r}" if not isinstance(v, float) else f"{k} = {v:g}")
    for i, s in enumerate(plan.stages):
        if s.growth is None:
            continue
        nxt = plan.stages[i + 1].model if i + 1 < len(plan.stages) else None
        lines += [
            "",
            "[[growth]]  # "
            + f"{s.model.n_layers} layers x dim {s.model.dim} -> "
            + (f"{nxt.n_layers} x {nxt.dim}" if nxt else "the next size")
            + f" at predicted loss {s.loss_end:.3f}",
        ]
        for k, v in s.growth.items():
            lines.append(f'{k} = "{v}"' if isinstance(v, str) else f"{k} = {v}")
    return "\n".join(lines) + "\n"
