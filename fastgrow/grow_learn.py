"""G_learn: grow by a learned linear operator (LiGO), trained for a few steps on the training loss.

Du et al. 2024 ("Stacking Your Transformers") evaluate four atomic growth operators; G_learn is LiGO
(Wang et al., ICLR 2023): the large model's weights are a learned linear function of the small model's
(`fastgrow.grow_learn_maps`: per-axis width maps and per-kind depth coefficients), initialised so that
learn step 0 is exactly a copy operator (G_stack with width `direct` by default), trained for
`steps` steps on the training loss with the small model frozen, then materialised into an ordinary
grown TrainState whose training continues.

    phase = LearnPhase(state, GrowPlan("stack", factor=4), steps=100, lr=1e-3)
    for _ in range(phase.steps):
        phase.train_step([next(batches)])          # the micro-batches of one step
    grown = phase.materialise()                    # a TrainState, as grow() returns

Training. Each step expands the maps into the large weights (one graph from the maps), detaches them as
leaves, runs the large architecture on them with `torch.func.functional_call` over a parameterless
skeleton (a Transformer on the meta device: no second model is allocated, ever), back-propagates the
micro-batches into the leaves' gradients and then those through the expansion once (so gradient
accumulation does not repeat the expansion), clips the maps' gradient norm at train.grad_clip and takes
an Adam step. Non-finite steps are skipped as the trainer skips them. Adam for the maps: the run's betas
and eps, no weight decay, a constant LR of lr / fan_in for each map (fan_in = L for the [T, L] depth
coefficients, the old size for a [new, old] width map): Adam moves every entry by about its LR per step
and a map sums fan_in entries into each output, so a sign-coherent update moves its outputs by about
`lr` per step whatever the model's size.

Memory while learning: the small model (and its Adam state, kept for the moment mapping and for
checkpoints), the maps and their Adam state, and per step one large model's weights, weight gradients and
activations (the expansion's outputs live only inside the step). No large Adam state and no second large
model exist until `materialise`.

Adam after G_learn (growth.optimizer): "copy" maps the small model's moments through the learned maps
(`grow_learn_maps.map_moments`: with untrained maps it is G_stack's copy and width direct's scaling),
"reset" starts a fresh AdamW (step 0), as the paper's code does. The LR schedule policy is grow()'s.

FLOPs: a learn step costs tokens * flops_per_token(large model) (its forward and backward, the trainer's
convention) plus the expansion's forward and backward (`expansion_flops`); `learn_flops_per_step`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import torch
from torch import nn
from torch.func import functional_call

from fastgrow.config import ModelConfig
from fastgrow.grow import GrowPlan, ResolvedPlan, grow, resolve_plan
from fastgrow.grow_learn_maps import (
    GrowthMaps,
    SideMap,
    direct_width_maps,
    exact_matmuls,
    expansion_flops,
    map_moments,
)
from fastgrow.grow_width import axis_sizes
from fastgrow.model import Transformer, flops_per_token
from fastgrow.state import TrainState

__all__ = [
    "DEFAULT_LEARN_LR",
    "DEFAULT_LEARN_STEPS",
    "LEARN_DEPTH_OPS",
    "LearnPhase",
    "learn_flops_per_step",
    "learn_grow",
    "resolve_learn_plan",
]

# The paper's reference code (prts, `ligo.py`) and LiGO train the operator for about 100 steps.
DEFAULT_LEARN_STEPS = 100
DEFAULT_LEARN_LR = 1e-2
# Copy operators a learned operator can start from (one-hot depth coefficients; no new blocks).
LEARN_DEPTH_OPS = ("stack", "interpolate", "partial", "sources", "none")

Batch = tuple[torch.Tensor, torch.Tensor]


def resolve_learn_plan(plan: GrowPlan, cfg: ModelConfig) -> ResolvedPlan:
    """Check that `plan` can initialise a learned operator and resolve it (ValueError otherwise)."""
    if plan.depth not in LEARN_DEPTH_OPS:
        raise ValueError(
            f"G_learn starts from a copy operator ({', '.join(LEARN_DEPTH_OPS)}), not depth op {plan.depth!r}"
        )
    if plan.width != "direct":
        raise ValueError(f"G_learn's width maps start from width 'direct', not {plan.width!r}")
    if plan.noise:
        raise ValueError("G_learn takes no noise (its maps are learned from the copy operator exactly)")
    try:
        return resolve_plan(plan, cfg)
    except ValueError as e:
        try:  # does the plan fail only because width direct needs integer multiples?
            r = resolve_plan(dataclasses.replace(plan, width="zero"), cfg)
        except ValueError:
            raise e from None
        old, new = axis_sizes(r.src), axis_sizes(r.dst)
        bad = ", ".join(f"{a} {old[a]} -> {new[a]}" for a in ("resid", "q", "kv") if new[a] % old[a])
        raise ValueError(
            f"G_learn's width maps start from width direct, which needs the hidden width (and the heads) to "
            f"grow by an integer multiple, not {bad} (choose target_dim / target_heads as multiples)"
        ) from None


def learn_flops_per_step(src: ModelConfig, dst: ModelConfig, seq_len: int, tokens_per_step: int) -> float:
    """Training FLOPs of one learn step: the large model's forward + backward on the step's tokens (the
    trainer's flops_per_token convention) plus the expansion's forward and backward."""
    fwd, bwd = expansion_flops(src, dst)
    return tokens_per_step * flops_per_token(dst, seq_len, include_attention=True) + fwd + bwd


def check_learn_settings(steps: int, lr: float) -> None:
    """learn_steps and learn_lr as G_learn needs them (ValueError naming the setting otherwise)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"learn_steps must be an integer >= 1, got {steps!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"learn_lr must be a positive number, got {lr!r}")


class LearnPhase:
    """The operator's training over a frozen small TrainState (see the module doc).

    state: the small model's TrainState (the phase reads it, never writes it); plan: the copy operator
    the maps start from (its optimizer/schedule policies apply at `materialise`); width_maps: initial
    per-axis maps (default `direct_width_maps`, i.e. width direct). `done` counts the learn steps taken.
    """

    def __init__(
        self,
        state: TrainState,
        plan: GrowPlan,
        *,
        steps: int = DEFAULT_LEARN_STEPS,
        lr: float = DEFAULT_LEARN_LR,
        width_maps: Mapping[tuple[str, str], SideMap] | None = None,
    ) -> None:
        check_learn_settings(steps, lr)
        self.resolved = resolve_learn_plan(plan, state.model.cfg)
        r = self.resolved
        self.state = state
        self.steps = int(steps)
        self.lr = float(lr)
        self.done = 0
        # Bookkeeping of the run that owns the phase (stage, start, val loss at step 0, ...), saved with it.
        self.info: dict[str, Any] = {}
        dev = state.device
        init = width_maps if width_maps is not None else direct_width_maps(r.src, r.dst)
        self.maps = GrowthMaps(r.src, r.dst, r.sources, init).to(dev)
        self.optimizer = self._build_optimizer()
        # The large architecture without storage: functional_call supplies every tensor.
        with torch.device("meta"):
            self.skeleton = Transformer(r.dst)
        self.skeleton.train()
        self.buffers = {n: b for n, b in state.model.named_buffers()}

    @property
    def plan(self) -> GrowPlan:
        return self.resolved.plan

    @property
    def finished(self) -> bool:
        return self.done >= self.steps

    def _build_optimizer(self) -> torch.optim.Adam:
        tcfg = self.state.config.train
        # Every map is [out, fan_in]: depth coefficients [T, L], width maps [new, old].
        groups = [{"params": [p], "lr": self.lr / p.shape[1], "name": n} for n, p in self.maps.named_parameters()]
        kwargs: dict[str, Any] = {"fused": True} if self.state.device.type == "cuda" else {"foreach": False}
        return torch.optim.Adam(groups, betas=(tcfg.beta1, tcfg.beta2), eps=tcfg.eps, weight_decay=0.0, **kwargs)

    def _small(self) -> dict[str, torch.Tensor]:
        return {n: p.detach() for n, p in self.state.model.named_parameters()}

    def expand(self) -> dict[str, torch.Tensor]:
        """The large model's weights from the current maps (differentiable in the maps)."""
        return self.maps.expand(self._small())

    def _loss(self, params: dict[str, torch.Tensor], x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        return functional_call(self.skeleton, params, (x, y))

    def train_step(
        self,
        batches: Sequence[Batch],
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One learn step on `batches` (the micro-batches of one optimizer step, (x, y) on the device).

        Returns device tensors (mean loss, pre-clip gradient norm of the maps, bad step flag); a bad
        (non-finite) step leaves the maps and their Adam state untouched. Counts into `done`.
        """
        if not batches:
            raise ValueError("a learn step needs at least one batch")
        if self.finished:
            raise RuntimeError(f"the operator has already taken its {self.steps} learn steps")
        dev = self.state.device
        large = self.expand()
        leaves = {n: t.detach().requires_grad_(True) for n, t in large.items()}
        params = {**leaves, **self.buffers}
        loss_sum = torch.zeros((), device=dev)
        for x, y in batches:
            with autocast():
                loss = self._loss(params, x, y)
            (loss / len(batches)).backward()
            loss_sum += loss.detach().float()
        names = [n for n, t in leaves.items() if t.grad is not None]
        torch.autograd.backward([large[n] for n in names], [leaves[n].grad for n in names])
        del large, leaves, params
        loss_mean = loss_sum / len(batches)
        maps_params = list(self.maps.parameters())
        clip = self.state.config.train.grad_clip
        gnorm = torch.nn.utils.clip_grad_norm_(
            maps_params, clip if clip > 0 else float("inf"), foreach=dev.type == "cuda"
        )
        bad = ~(torch.isfinite(gnorm) & torch.isfinite(loss_mean))
        if dev.type == "cuda":
            self.optimizer.found_inf = bad.float()  # fused Adam skips the step on the device
            self.optimizer.step()
            del self.optimizer.found_inf
        elif not bool(bad):
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.done += 1
        return loss_mean, gnorm.detach().float(), bad

    def as_model(self) -> nn.Module:
        """The current expansion as a module with a Transformer's forward(tokens, targets=None), for
        evaluation: its weights are computed once here (no gradients), no large Transformer is built."""
        return _Expanded(self)

    @torch.no_grad()
    def evaluate(
        self,
        batches: Iterable[Batch],
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
    ) -> float:
        """Mean loss of the current expansion on `batches`."""
        model = self.as_model()
        losses = []
        for x, y in batches:
            with autocast():
                losses.append(model(x, y).float())
        if not losses:
            raise ValueError("evaluate needs at least one batch")
        return torch.stack(losses).mean().item()

    @torch.no_grad()
    def materialise(self) -> TrainState:
        """The grown TrainState: grow() with the copy plan (schedule, LR and parameter groups as every
        operator), its weights replaced by the learned expansion and, for optimizer "copy", its Adam
        moments by the small model's mapped through the learned maps. Its growth record says op "learn"."""
        plan = self.plan

        def write(new_params, old_params, resolved, generator) -> None:
            with exact_matmuls():
                large = self.expand()
            for name, p in new_params.items():
                p.copy_(large[name])

        grown = grow(self.state, dataclasses.replace(plan, optimizer="reset"), weights=write)
        grown.learn = None
        if plan.optimizer == "copy":
            self._carry_mapped_moments(grown)
        record = grown.growth_history[-1]
        record.update(
            op="learn",
            init_op=plan.depth,
            optimizer=plan.optimizer,
            learn_steps=self.done,
            learn_lr=self.lr,
        )
        return grown

    def _carry_mapped_moments(self, grown: TrainState) -> None:
        old = self.state
        names = {id(p): n for n, p in old.model.named_parameters()}
        by_name = {names[id(p)]: st for p, st in old.optimizer.state.items() if st}
        if not by_name:
            return  # the small model's optimizer never stepped: a fresh AdamW is what it would have
        ref_step = next(iter(by_name.values()))["step"]
        moments = {}
        for kind in ("exp_avg", "exp_avg_sq"):
            small = {
                n: by_name[n][kind] if n in by_name else torch.zeros_like(p) for n, p in old.model.named_parameters()
            }
            moments[kind] = map_moments(self.maps, small, kind)
        for name, p in grown.model.named_parameters():
            grown.optimizer.state[p] = {
                "step": ref_step.clone(),
                "exp_avg": moments["exp_avg"][name].to(p.dtype).clone(memory_format=torch.contiguous_format),
                "exp_avg_sq": moments["exp_avg_sq"][name].to(p.dtype).clone(memory_format=torch.contiguous_format),
            }

    # --- checkpoints ------------------------------------------------------------------------------------

    def state_tensors(self) -> dict[str, torch.Tensor]:
        """Maps and their Adam state as named tensors (for a checkpoint); see `restore`."""
        out = {f"maps/{n}": t.detach().contiguous() for n, t in self.maps.state_dict().items()}
        names = {id(p): n for n, p in self.maps.named_parameters()}
        for p, st in self.optimizer.state.items():
            for key, t in st.items():
                out[f"adam/{key}/{names[id(p)]}"] = t.detach().reshape(t.shape or (1,)).contiguous()
        return out

    def state_meta(self) -> dict[str, Any]:
        """JSON-serialisable settings and progress (for a checkpoint); see `restore`."""
        return {"plan": self.plan.to_dict(), "steps": self.steps, "lr": self.lr, "done": self.done, "info": self.info}

    @classmethod
    def restore(cls, state: TrainState, meta: Mapping[str, Any], tensors: Mapping[str, torch.Tensor]) -> LearnPhase:
        """The phase `state_meta` / `state_tensors` describe, over the small TrainState it was saved with."""
        plan = GrowPlan(**meta["plan"])
        phase = cls(state, plan, steps=int(meta["steps"]), lr=float(meta["lr"]))
        dev = state.device
        maps_sd = {n[len("maps/") :]: t.to(dev) for n, t in tensors.items() if n.startswith("maps/")}
        phase.maps.load_state_dict(maps_sd, strict=True)
        sd = phase.optimizer.state_dict()
        names = [n for n, _ in phase.maps.named_parameters()]
        index = {id(p): i for i, p in enumerate(p for g in phase.optimizer.param_groups for p in g["params"])}
        by_param = dict(phase.maps.named_parameters())
        new_state = {}
        for n in names:
            if f"adam/exp_avg/{n}" not in tensors:
                continue
            new_state[index[id(by_param[n])]] = {
                "step": tensors[f"adam/step/{n}"].to(dev).reshape(()),
                "exp_avg": tensors[f"adam/exp_avg/{n}"].to(dev),
                "exp_avg_sq": tensors[f"adam/exp_avg_sq/{n}"].to(dev),
            }
        sd["state"] = new_state
        phase.optimizer.load_state_dict(sd)
        phase.done = int(meta["done"])
        phase.info = dict(meta.get("info", {}))
        return phase


def learn_grow(
    state: TrainState,
    plan: GrowPlan,
    batches: Iterable[Batch],
    *,
    steps: int = DEFAULT_LEARN_STEPS,
    lr: float = DEFAULT_LEARN_LR,
    grad_accum: int = 1,
) -> tuple[TrainState, LearnPhase]:
    """Run a whole G_learn (`steps` learn steps of `grad_accum` batches each, moved to the state's
    device) and return (grown state, the finished phase). The input state is not modified."""
    phase = LearnPhase(state, plan, steps=steps, lr=lr)
    it = iter(batches)
    dev = state.device
    for _ in range(phase.steps):
        micro = []
        for _ in range(grad_accum):
            try:
                x, y = next(it)
            except StopIteration:
                raise ValueError(f"G_learn ran out of data after {phase.done} of {phase.steps} learn steps") from None
            micro.append((x.to(dev), y.to(dev)))
        phase.train_step(micro)
    return phase.materialise(), phase


class _Expanded(nn.Module):
    """LearnPhase.as_model: the expansion's weights, frozen, behind a Transformer's forward."""

    def __init__(self, phase: LearnPhase) -> None:
        super().__init__()
        self.maps = phase.maps  # registered, so .parameters() (and hence the device) are the maps'
        with torch.no_grad(), exact_matmuls():
            self._params = {**phase.expand(), **phase.buffers}
        self._loss = phase._loss  # a bound method: the meta skeleton stays unregistered

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        return self._loss(self._params, tokens, targets)
