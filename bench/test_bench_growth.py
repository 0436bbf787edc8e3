"""Growth benchmarks: grow() time against the copy floor, and training throughput before / after G_stack
(g = 4) next to the same target architecture trained from scratch, all in one run.

* grow() time: `grow(state, stack x4)` on a state whose AdamW has stepped (so moments are carried), timed
  end to end (allocation + copies, synchronised). Copy floor = bytes read + written by the copies
  (parameters, exp_avg, exp_avg_sq of the grown model, and their sources) / the device's measured copy
  bandwidth (a large `copy_`, counted as read + write). Goal (docs/architecture.md section 9): <= 1.2x the floor.
* Throughput: a training step = forward + backward + AdamW (fused on CUDA) under bf16 autocast on CUDA;
  tokens/s = batch * seq / median step time. Measured for the base model, for the grown model (its first
  step separately: depth growth changes no shape a kernel sees, so it should be at full speed), and for
  the target built from scratch. ratio = grown / scratch tokens/s (goal >= 0.99). MFU uses fastgrow's
  convention (6N + causal attention, fastgrow/metrics.py).

GPU: the paper's 410M target grown from its 6-layer base (seq 2048). CPU: a tiny config (harness check,
< 30 s). Results go to $FASTGROW_BENCH_OUT/growth.jsonl when set.
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import pytest
import torch
from results_log import record

from fastgrow.config import ModelConfig, RunConfig, TrainConfig, preset
from fastgrow.grow import GrowPlan, grow, resolve_plan
from fastgrow.metrics import mfu, peak_flops
from fastgrow.model import flops_per_token
from fastgrow.state import TrainState, build_state

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")

if CUDA:
    BASE = preset("410M-base").model
    BATCH, SEQ = 8, 2048
    STEPS, GROW_ROUNDS, COPY_BYTES = 10, 5, 1 << 30
else:
    BASE = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=128)
    BATCH, SEQ = 4, 64
    STEPS, GROW_ROUNDS, COPY_BYTES = 2, 2, 1 << 24
PLAN = GrowPlan("stack", factor=4)


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _state(model_cfg: ModelConfig) -> TrainState:
    run = RunConfig(model=model_cfg, train=TrainConfig(device=DEV.type, lr=1e-4, min_lr=1e-5, warmup_steps=1))
    return build_state(run, device=DEV)


def _amp():
    return torch.autocast("cuda", dtype=torch.bfloat16) if CUDA else contextlib.nullcontext()


def _batch(vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    t = torch.randint(0, vocab, (BATCH, SEQ + 1), generator=g).to(DEV)
    return t[:, :-1], t[:, 1:]


def _step(state: TrainState, x: torch.Tensor, y: torch.Tensor) -> None:
    with _amp():
        loss = state.model(x, y)
    loss.backward()
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1


def _timed_steps(state: TrainState, n: int, x, y) -> list[float]:
    out = []
    for _ in range(n):
        _sync()
        t0 = time.perf_counter()
        _step(state, x, y)
        _sync()
        out.append(time.perf_counter() - t0)
    return out


def _median(xs: list[float]) -> float:
    s = sorted(xs)
    return s[len(s) // 2]


def _copy_bandwidth() -> float:
    """Bytes/s of a large device copy, counting read + write."""
    n = COPY_BYTES // 4
    src = torch.randn(n, device=DEV)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    times = []
    for _ in range(5):
        _sync()
        t0 = time.perf_counter()
        dst.copy_(src)
        _sync()
        times.append(time.perf_counter() - t0)
    return 2 * n * 4 / _median(times)


def _grow_bytes(state: TrainState, plan: GrowPlan) -> int:
    """Bytes read + written by grow()'s copies: every grown parameter and both moments are written once
    and read once from their source (all depth-copied for a stack); step tensors are negligible."""
    dst = resolve_plan(plan, state.model.cfg).dst
    carried = 3 if state.optimizer.state else 1
    elem = state.model.tok_embeddings.weight.element_size()
    return 2 * dst.num_params() * elem * carried


@pytest.mark.benchmark(group="growth")
def test_grow_time_vs_copy_floor(benchmark):
    st = _state(BASE)
    x, y = _batch(BASE.vocab_size)
    _step(st, x, y)  # AdamW state exists: grow() carries the moments
    bw = _copy_bandwidth()
    moved = _grow_bytes(st, PLAN)
    floor = moved / bw

    def run():
        g = grow(st, PLAN)
        _sync()
        return g

    benchmark.pedantic(run, rounds=GROW_ROUNDS, warmup_rounds=1)
    t = benchmark.stats.stats.median
    benchmark.extra_info.update(grow_s=t, copy_floor_s=floor, vs_floor=t / floor, copy_GBps=bw / 1e9)
    record(
        "growth",
        kind="grow_time",
        op="stack",
        factor=4,
        layers_before=BASE.n_layers,
        layers_after=BASE.n_layers * 4,
        params_after=resolve_plan(PLAN, BASE).dst.num_params(),
        bytes_moved=moved,
        copy_bandwidth_Bps=bw,
        copy_floor_s=floor,
        grow_s=t,
        grow_vs_floor=t / floor,
    )


@pytest.mark.benchmark(group="growth")
def test_throughput_before_after_growth(benchmark):
    x, y = _batch(BASE.vocab_size)
    peak = peak_flops(DEV)
    base = _state(BASE)
    _timed_steps(base, 2, x, y)  # warm-up (kernel compilation, allocator)
    t_base = _median(_timed_steps(base, STEPS, x, y))

    grown = grow(base, PLAN)
    del base
    target = grown.model.cfg
    first = _timed_steps(grown, 1, x, y)[0]

    def grown_step():
        _step(grown, x, y)
        _sync()

    benchmark.pedantic(grown_step, rounds=STEPS, warmup_rounds=1)
    t_grown = benchmark.stats.stats.median
    grown = None  # free the grown state before building the scratch model

    scratch = _state(dataclasses.replace(target))
    _timed_steps(scratch, 2, x, y)
    t_scratch = _median(_timed_steps(scratch, STEPS, x, y))
    del scratch

    tok = BATCH * SEQ
    f_base, f_target = flops_per_token(BASE, SEQ), flops_per_token(target, SEQ)
    res = {
        "tokens_per_s_before": tok / t_base,
        "tokens_per_s_after": tok / t_grown,
        "tokens_per_s_scratch": tok / t_scratch,
        "first_step_after_s": first,
        "median_step_after_s": t_grown,
        "first_step_vs_median": first / t_grown,
        "ratio_grown_vs_scratch": t_scratch / t_grown,
        "mfu_before": mfu(f_base, tok / t_base, peak),
        "mfu_after": mfu(f_target, tok / t_grown, peak),
        "mfu_scratch": mfu(f_target, tok / t_scratch, peak),
    }
    benchmark.extra_info.update(res)
    record(
        "growth",
        kind="throughput",
        op="stack",
        factor=4,
        layers_before=BASE.n_layers,
        layers_after=target.n_layers,
        dim=BASE.dim,
        batch=BATCH,
        seq=SEQ,
        **res,
    )
    assert res["tokens_per_s_after"] > 0 and res["tokens_per_s_scratch"] > 0
