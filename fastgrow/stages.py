"""A run's growth stages: when each one grows, and whether the chain is valid (checked at start).

Stage N is resolved against the model stage N-1 produced (stage 0 against the run's [model]), so a
stage that cannot apply to its input (a spec naming layer 5 of a 4-layer model, width shrinking, a
"direct" width ratio that is not an integer) fails before the first training step, with an error that
names `growth[N]`. So does a stage whose token count the run never reaches.
"""

from __future__ import annotations

import math

from fastgrow.config import ConfigError, GrowthConfig, ModelConfig, RunConfig
from fastgrow.grow import plan_from_config, resolve_plan
from fastgrow.grow_learn import DEFAULT_LEARN_STEPS, resolve_learn_plan
from fastgrow.plan import auto_growth_tokens


def stage_targets(run: RunConfig, model: ModelConfig | None = None, start: int = 0) -> list[ModelConfig]:
    """The model each stage from `start` on produces, each resolved against the previous one
    (`model`, default run.model, is the input of stage `start`). ConfigError naming growth[N]."""
    cur = run.model if model is None else model
    out = []
    for i in range(start, len(run.growth)):
        try:
            resolve = resolve_learn_plan if run.growth[i].op == "learn" else resolve_plan
            cur = resolve(plan_from_config(run.growth[i], cur), cur).dst
        except ValueError as e:
            raise ConfigError(f"growth[{i}]: {e}") from None
        out.append(cur)
    return out


def stage_tokens(run: RunConfig) -> list[int]:
    """The token count of every stage; "auto" (one-stage runs only) is Eq. 10 for the stage's target,
    clamped to half the run's tokens (fastgrow.plan.auto_growth_tokens)."""
    out = []
    for i, g in enumerate(run.growth):
        if g.at_tokens == "auto":
            out.append(auto_growth_tokens(run, stage_targets(run, run.model)[i]))
        else:
            out.append(int(g.at_tokens))
    return out


def growth_step(at_tokens: int, run: RunConfig) -> int:
    """The number of steps done when a stage at `at_tokens` grows (growth happens before a step, once
    the tokens seen reach at_tokens)."""
    return math.ceil(at_tokens / run.tokens_per_step)


def check_stages(run: RunConfig, model: ModelConfig, done: int = 0) -> list[int]:
    """Validate the stages not yet done against `model` (the live architecture) and the run's length;
    return every stage's token count. Raises ConfigError naming the first bad stage."""
    stage_targets(run, model, start=done)
    tokens = stage_tokens(run)
    steps, tps = run.train.max_steps, run.tokens_per_step
    for i in range(done, len(tokens)):
        at = growth_step(tokens[i], run)
        if at >= steps:
            raise ConfigError(
                f"growth[{i}].at_tokens = {tokens[i]:,} is never reached: growth happens before a step, and "
                f"the run's train.max_steps = {steps} steps of {tps:,} tokens reach at most {(steps - 1) * tps:,} "
                f"tokens before its last step; lower at_tokens or raise train.max_steps"
            )
        learn = learn_steps(run.growth[i])
        if learn and at + learn >= steps:
            raise ConfigError(
                f"growth[{i}].learn_steps = {learn}: G_learn trains its maps for steps {at + 1}..{at + learn} and "
                f"the grown model needs at least one step after them, but the run ends at train.max_steps = "
                f"{steps}; lower learn_steps or at_tokens, or raise train.max_steps"
            )
    return tokens


def learn_steps(g: GrowthConfig) -> int:
    """The steps a stage spends training its operator before the grown model exists (op learn), else 0."""
    return (g.learn_steps or DEFAULT_LEARN_STEPS) if g.op == "learn" else 0
