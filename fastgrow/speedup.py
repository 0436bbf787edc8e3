"""Speedup at equal loss and loss gap at equal FLOPs between validation-loss-vs-FLOPs curves.

Speedup at equal loss, as Du et al. (2024) define it: FLOPs_scratch / FLOPs_grown - 1, where FLOPs_grown
is what the grown run needed to reach the scratch run's final validation loss L*. Validation curves are
noisy and a grown run's loss spikes right after growth, so each curve is first made *monotone*: its
running minimum (the best validation loss seen so far), the "loss reachable with this many FLOPs". The
FLOPs to reach a level are where that envelope first gets there, interpolated linearly in log(loss) vs
log(FLOPs) between evaluations: a power law L = a * F^-b is a straight line there, so the interpolation
is exact for it (`tests/test_study.py` checks a known speedup to 1e-9). L* is the scratch envelope's final
value (its best loss) and FLOPs_scratch the FLOPs at which the scratch envelope reached it. An EMA is not
used by default because it lags: it shifts a curve right by an amount that depends on the eval spacing,
which differs between runs of different step counts (`ema` is available for very noisy curves). A grown
run that never reaches L* has speedup None ("not reached"). The loss gap at equal FLOPs is the grown
envelope minus the scratch envelope at the scratch budget (negative = growing is better).

Curves come from a run directory's metrics.jsonl (`load_curve`): its `val` records (cumulative training
FLOPs, each phase counted at its own size, and the validation loss) and its `growth` records' FLOPs.
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Comparison",
    "Curve",
    "envelope",
    "flops_to_reach",
    "load_curve",
    "loss_at",
    "read_records",
    "speedup_at_equal_loss",
]


@dataclass(frozen=True)
class Curve:
    """A run's validation loss vs cumulative training FLOPs (ascending), and its growth events' FLOPs."""

    flops: tuple[float, ...]
    loss: tuple[float, ...]
    growth_flops: tuple[float, ...] = ()
    tokens: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        if len(self.flops) != len(self.loss):
            raise ValueError(f"curve has {len(self.flops)} FLOPs values but {len(self.loss)} losses")
        if any(b <= a for a, b in zip(self.flops, self.flops[1:])):
            raise ValueError("curve FLOPs must be strictly increasing")
        if any(not (f > 0 and math.isfinite(f)) for f in self.flops):
            raise ValueError("curve FLOPs must be positive and finite")


def envelope(losses: Sequence[float], ema: float = 0.0) -> list[float]:
    """The running minimum of the losses (after an optional EMA with weight `ema` on the past, 0 = off).
    Non-finite losses (a diverged eval) never lower the envelope."""
    if not 0.0 <= ema < 1.0:
        raise ValueError(f"ema must be in [0, 1), got {ema}")
    out: list[float] = []
    best = math.inf
    avg = None
    for x in losses:
        if math.isfinite(x):
            avg = x if avg is None or ema == 0.0 else ema * avg + (1.0 - ema) * x
            best = min(best, avg)
        out.append(best)
    return out


def flops_to_reach(curve: Curve, level: float, ema: float = 0.0) -> float | None:
    """FLOPs at which the curve's envelope first reaches `level` (log-log interpolation between evals);
    None if it never does. If the first evaluation is already at or below `level`, its FLOPs."""
    if not (level > 0 and math.isfinite(level)):
        raise ValueError(f"loss level must be positive and finite, got {level}")
    env = envelope(curve.loss, ema)
    for j, e in enumerate(env):
        if e <= level:
            if j == 0 or not math.isfinite(env[j - 1]):
                return curve.flops[j]
            hi, lo = env[j - 1], e
            if hi == lo:  # pragma: no cover - envelope drops at j by construction
                return curve.flops[j]
            t = (math.log(hi) - math.log(level)) / (math.log(hi) - math.log(lo))
            lf = math.log(curve.flops[j - 1]) + t * (math.log(curve.flops[j]) - math.log(curve.flops[j - 1]))
            return math.exp(lf)
    return None


def loss_at(curve: Curve, flops: float, ema: float = 0.0) -> float | None:
    """The envelope's loss at `flops` (log-log interpolation); None before the first eval. Past the last
    eval, the final envelope value (a grown run may end a fraction of a step short of the budget)."""
    env = envelope(curve.loss, ema)
    if not curve.flops or flops < curve.flops[0] or not math.isfinite(env[-1]):
        return None
    if flops >= curve.flops[-1]:
        return env[-1]
    for j in range(1, len(curve.flops)):
        if flops <= curve.flops[j]:
            a, b = env[j - 1], env[j]
            if not math.isfinite(a):
                return b
            f0, f1 = curve.flops[j - 1], curve.flops[j]
            t = (math.log(flops) - math.log(f0)) / (math.log(f1) - math.log(f0))
            return math.exp(math.log(a) + t * (math.log(b) - math.log(a)))
    return env[-1]  # pragma: no cover


@dataclass(frozen=True)
class Comparison:
    target_loss: float  # L*: the scratch envelope's final value
    flops_scratch: float  # FLOPs at which scratch reached L*
    flops_grown: float | None  # FLOPs at which the grown run reached L* (None: never)
    speedup: float | None  # flops_scratch / flops_grown - 1
    budget: float  # the scratch run's final FLOPs
    loss_grown_at_budget: float | None
    loss_gap: float | None  # grown - scratch at the budget


def speedup_at_equal_loss(scratch: Curve, grown: Curve, ema: float = 0.0) -> Comparison:
    """The paper's speedup (FLOPs_scratch / FLOPs_grown - 1 at the scratch run's final loss) and the loss
    gap at equal FLOPs (grown minus scratch at the scratch budget); see the module docstring."""
    if not scratch.flops or not grown.flops:
        raise ValueError("both curves need at least one validation point")
    env = envelope(scratch.loss, ema)
    target = env[-1]
    if not math.isfinite(target):
        raise ValueError("the scratch curve has no finite validation loss")
    f_s = flops_to_reach(scratch, target, ema)
    assert f_s is not None
    f_g = flops_to_reach(grown, target, ema)
    budget = scratch.flops[-1]
    at_budget = loss_at(grown, budget, ema)
    return Comparison(
        target_loss=target,
        flops_scratch=f_s,
        flops_grown=f_g,
        speedup=None if f_g is None else f_s / f_g - 1.0,
        budget=budget,
        loss_grown_at_budget=at_budget,
        loss_gap=None if at_budget is None else at_budget - target,
    )


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """metrics.jsonl records, deduplicated: a resumed run re-logs the steps after its last checkpoint,
    so for each (kind, step) the last record wins; sorted by step. A truncated last line is skipped."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"metrics file not found: {p}")
    latest: dict[tuple[str, int], dict[str, Any]] = {}
    with open(p) as f:
        for line in f:
            line = line.strip()
            if not line:
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut by a crash
            latest[(rec.get("kind", ""), int(rec.get("step", -1)))] = rec
    kind_order = {"growth": 0, "train": 1, "val": 2}
    return [latest[k] for k in sorted(latest, key=lambda k: (k[1], kind_order.get(k[0], 3)))]


def load_curve(run_dir: str | Path) -> Curve:
    """The validation curve of a run directory's metrics.jsonl."""
    return curve_from_records(read_records(Path(run_dir) / "metrics.jsonl"), run_dir)


def curve_from_records(recs: list[dict[str, Any]], run_dir: str | Path) -> Curve:
    """The validation curve of a run's metrics records (`run_dir` names the run in the error)."""
    val = [r for r in recs if r.get("kind") == "val"]
    if not val:
        raise ValueError(f"{run_dir}: no validation records in metrics.jsonl (set train.eval_every > 0)")
    return Curve(
        flops=tuple(float(r["flops"]) for r in val),
        loss=tuple(float(r["val_loss"]) for r in val),
        growth_flops=tuple(float(r["flops"]) for r in recs if r.get("kind") == "growth"),
        tokens=tuple(int(r["tokens"]) for r in val),
    )
