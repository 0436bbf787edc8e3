"""Growth planner: when to grow (Du et al. 2024, Eq. 10), by how much, and the FLOPs of each phase.

Eq. 10 of "Stacking Your Transformers" (arXiv 2405.15319) fits the best growth timing d (tokens the small
model trains before it is stacked) as a function of the target's parameter count N and its training
compute C = 6 * N * D (D = target training tokens), with raw counts and base-10 logs:

    log10(d) = 0.88 * log10(N) + 163.27 / log10(C) - 5.74

Conventions used here (say them, because papers differ):
  * N is the *total* parameter count of the target (the paper's model names, 410M ... 7B, count the
    embeddings), and C = 6 * N * D, exactly as in Eq. 10.
  * The token budget D is the whole run: the small model trains d tokens, the grown model the remaining
    D - d. So flops_small = 6 * N_small * d, flops_large = 6 * N * (D - d), and the from-scratch run of
    the target costs flops_scratch = 6 * N * D. (6 * N per token, attention FLOPs not counted, the same
    convention as C in Eq. 10.)
  * The growth factor g is counted on non-embedding parameters, as the paper does: the base model has
    the target's widths and target_layers / g layers, so its non-embedding parameters are ~N_ne / g
    (exactly, up to the final norm). Its embedding and head are the target's.
  * The fit was made on runs with C ~ 1e19 .. 1e22 FLOPs. Far outside that range (tiny CPU models) it
    extrapolates to nonsense (d > D); `in_fit_range` says so and d is clamped to half the token budget
    (`clamp_growth_tokens`, the same clamp as the trainer's `at_tokens = "auto"`).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

from fastgrow.config import MODEL_PRESETS, ModelConfig, RunConfig, parse_count, preset_key

# Range of training compute the paper's fit was made on (its Fig. 6 runs), used only for a warning flag.
FIT_RANGE_FLOPS = (1e19, 1e23)
# The paper's targets, matched by parameter count when no preset or layer count is given.
PAPER_TARGETS = ("410M", "1.1B", "3B", "7B")
# Growth never later than this fraction of the run's tokens (Eq. 10 extrapolated past its fit can ask
# for more than the run has): shared by `fastgrow plan` and `at_tokens = "auto"`.
MAX_GROWTH_FRACTION = 0.5


def growth_tokens(params: int | float, flops: int | float) -> float:
    """Eq. 10: tokens d the small model should train before growth, for target params N and compute C."""
    n = float(params)
    c = float(flops)
    if not (n > 1 and math.isfinite(n)):
        raise ValueError(f"target parameter count N must be > 1, got {params!r}")
    if not (c > 10 and math.isfinite(c)):
        raise ValueError(f"training compute C must be > 10 FLOPs (log10(C) > 1), got {flops!r}")
    return 10.0 ** (0.88 * math.log10(n) + 163.27 / math.log10(c) - 5.74)


def base_config(target: ModelConfig, factor: int) -> ModelConfig:
    """The base model a depthwise factor-g stack grows into `target`: same widths, layers / g."""
    if factor < 1:
        raise ValueError(f"growth factor must be >= 1, got {factor}")
    if target.n_layers % factor:
        raise ValueError(
            f"target layers ({target.n_layers}) are not divisible by the growth factor ({factor}); "
            "pick a factor that divides the depth or plan a partial stack explicitly"
        )
    return dataclasses.replace(target, n_layers=target.n_layers // factor)


@dataclass(frozen=True)
class GrowthPlan:
    """The planner's answer. Token and FLOP counts are floats/ints in raw units (see the module doc)."""

    params: int  # N, target parameters
    tokens: int  # D, total token budget of the run
    factor: int  # g
    flops: float  # C = 6 N D
    growth_tokens: int  # d (Eq. 10), rounded to an integer
    growth_tokens_raw: float  # d before rounding/clamping
    in_fit_range: bool
    preset: str | None
    base_layers: int | None
    target_layers: int | None
    params_small: int  # base model parameters (N / g when no architecture is known)
    params_small_exact: bool
    params_non_embedding: int | None
    params_small_non_embedding: int | None
    flops_small: float  # 6 * N_small * d
    flops_large: float  # 6 * N * (D - d)
    flops_grown_total: float  # flops_small + flops_large
    flops_scratch: float  # 6 * N * D
    base_model: dict[str, Any] | None
    layout: str = ""  # where the target's architecture came from (a preset given, matched, or unknown)

    @property
    def growth_fraction(self) -> float:
        return self.growth_tokens / self.tokens if self.tokens else float("nan")

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["growth_fraction"] = self.growth_fraction
        d["convention"] = (
            "C = 6*N*D with N total target params; d from Eq. 10; small phase 6*N_small*d, large phase "
            "6*N*(D-d); g counted on non-embedding params (base = target layers / g, same widths)"
        )
        return d


# A parameter count matches a paper target's layout only this close (a 13B target is not a 7B layout).
PRESET_MATCH_RATIO = 1.25


def _match_preset(params: int) -> str | None:
    """The paper target whose parameter count is within PRESET_MATCH_RATIO of `params` (closest in log
    space), or None."""
    best, best_dist = None, math.log(PRESET_MATCH_RATIO)
    for name in PAPER_TARGETS:
        dist = abs(math.log(MODEL_PRESETS[name].num_params() / params))
        if dist <= best_dist:
            best, best_dist = name, dist
    return best


def plan_growth(
    params: int | str | None,
    tokens: int | str,
    factor: int = 4,
    preset: str | None = None,
    layers: int | None = None,
) -> GrowthPlan:
    """Plan a stacking run for a target of `params` parameters trained on `tokens` tokens.

    params/tokens accept ints or '410M', '1.1B', '300B', '2e12'. `preset` names the target architecture
    (then params may be None: the preset's exact count is used); `layers` gives just the target depth.
    With neither, the paper target within 1.25x of `params` is used for the depth (recorded in `preset`
    and said in `layout`), and if none is that close the base architecture is unknown: base_layers is
    None and params_small is estimated as N / g.
    """
    if not isinstance(factor, int) or isinstance(factor, bool) or factor < 1:
        raise ValueError(f"growth factor must be an integer >= 1, got {factor!r}")
    d_tokens = parse_count(tokens)
    if d_tokens <= 0:
        raise ValueError(f"token budget D must be > 0, got {tokens!r}")
    target: ModelConfig | None = None
    if preset is not None:
        preset = preset_key(preset)  # a ConfigError (a ValueError) naming the presets
        target = MODEL_PRESETS[preset]
    n = parse_count(params) if params is not None else (target.num_params() if target else None)
    if n is None:
        raise ValueError("give the target parameter count (params) or a preset")
    if n <= 1:
        raise ValueError(f"target parameter count N must be > 1, got {params!r}")
    layout = f"preset {preset}" if target is not None else "unknown: base parameters estimated as N / g"
    if target is None and layers is None:
        match = _match_preset(n)
        if match is not None:
            preset, target = match, MODEL_PRESETS[match]
            layout = (
                f"preset {match}'s ({target.n_layers} layers, dim {target.dim}, {target.num_params():,} params), "
                f"matched by parameter count (within {PRESET_MATCH_RATIO}x); give --preset or --layers to choose"
            )
        else:
            layout = (
                f"unknown: no preset within {PRESET_MATCH_RATIO}x of {n:,} params, base parameters estimated as "
                "N / g; give --preset or --layers"
            )
    if layers is not None:
        if not isinstance(layers, int) or layers < 1:
            raise ValueError(f"target layers must be a positive integer, got {layers!r}")
        target = dataclasses.replace(target, n_layers=layers) if target is not None else None
    target_layers = target.n_layers if target is not None else layers
    base_layers = None
    if target_layers is not None:
        if target_layers % factor:
            raise ValueError(f"target layers ({target_layers}) are not divisible by the growth factor ({factor})")
        base_layers = target_layers // factor

    c = 6.0 * n * d_tokens
    d_raw = growth_tokens(n, c)
    d = clamp_growth_tokens(round(d_raw), d_tokens)

    base_model = None
    ne = ne_small = None
    if target is not None:
        base = base_config(target, factor)
        base_model = base.architecture()
        ne = target.num_params(include_embeddings=False)
        ne_small = base.num_params(include_embeddings=False)
        # The preset's parameter count may differ from the N given; scale the base by the same ratio
        # only when N came from the preset itself (exact), else estimate from N's non-embedding part.
        if params is None or n == target.num_params():
            n_small, exact = base.num_params(), True
        else:
            emb = target.num_params() - ne
            n_small, exact = int(round(emb + (n - emb) / factor)), False
    else:
        n_small, exact = int(round(n / factor)), False

    flops_small = 6.0 * n_small * d
    flops_large = 6.0 * n * (d_tokens - d)
    return GrowthPlan(
        params=n,
        tokens=d_tokens,
        factor=factor,
        flops=c,
        growth_tokens=d,
        growth_tokens_raw=d_raw,
        in_fit_range=FIT_RANGE_FLOPS[0] <= c <= FIT_RANGE_FLOPS[1] and d_raw <= MAX_GROWTH_FRACTION * d_tokens,
        preset=preset,
        base_layers=base_layers,
        target_layers=target_layers,
        params_small=n_small,
        params_small_exact=exact,
        params_non_embedding=ne,
        params_small_non_embedding=ne_small,
        flops_small=flops_small,
        flops_large=flops_large,
        flops_grown_total=flops_small + flops_large,
        flops_scratch=6.0 * n * d_tokens,
        base_model=base_model,
        layout=layout if layers is None else f"{layers} layers" + (f", {preset}'s widths" if preset else ""),
    )


def clamp_growth_tokens(d: float, budget_tokens: int, max_fraction: float = MAX_GROWTH_FRACTION) -> int:
    """Eq. 10's d, clamped to max_fraction of the run's token budget (at least 1 token). Beyond the
    paper's compute range Eq. 10 asks for more tokens than the run has; the planner and the trainer's
    `at_tokens = "auto"` both clamp here, so they agree."""
    if not 0 < max_fraction <= 1:
        raise ValueError(f"max_fraction must be in (0, 1], got {max_fraction}")
    return max(1, int(min(d, max_fraction * budget_tokens)))


def auto_growth_tokens(run: RunConfig, target: ModelConfig, max_fraction: float = MAX_GROWTH_FRACTION) -> int:
    """`growth.at_tokens = "auto"`: Eq. 10 for the run's target, clamped (see clamp_growth_tokens).

    The run's token budget is train.max_steps * batch_size * seq_len * grad_accum; N is the target's
    total parameter count; target is the grown architecture (fastgrow.stages computes it from the run's
    growth stage, so this module needs nothing from the growth code).
    """
    budget = run.train.max_steps * run.tokens_per_step
    n = target.num_params()
    return clamp_growth_tokens(growth_tokens(n, 6.0 * n * budget), budget, max_fraction)
