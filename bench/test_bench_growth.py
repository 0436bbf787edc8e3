"""Growth benchmarks: grow() against the copies it cannot avoid, its host overhead and peak memory, and
training throughput before / after G_stack (g = 4) next to the same target trained from scratch.

* grow() time (`test_grow_time_vs_copy_floor`): the paper's 410M-base (6 x 1024) grown into the 410M
  target (24 layers) by stack x4, moments carried, as the trainer runs it: `grow(state, plan,
  consume=True)` (one copy of each layer takes over the old tensors; 18 layers, with their moments and
  steps, are copied). Every round grows a fresh state (built in the untimed setup) and is timed end to
  end (allocation + copies, synchronised). Two baselines measured in the same rounds, in the same
  process:
  - allocate + copy: `torch.empty_like` of every tensor grow() must copy, then one
    `torch._foreach_copy_` from their sources: the same bytes, allocated the plain way (goal on a CPU:
    grow() within 1.3x of it);
  - copy floor: those bytes read + written at the device's copy bandwidth (a large `copy_` into memory
    already touched): what no implementation beats (goal on a GPU: grow() within 1.2x of it).
  Peak memory: the growth's extra bytes over the input state (GPU: the allocator's peak; CPU: the
  process's peak RSS, reset before the call through /proc/self/clear_refs), next to a growth that copies
  everything (consume=False), whose extra peak is the whole grown state.
  On a CPU, glibc's malloc is pinned to mmap every allocation of 128 KiB and more (`mallopt`), so every
  round writes fresh memory, as a run's one growth does (otherwise allocations below its adaptive 32 MB
  threshold come back warm from earlier rounds and the comparison depends on the round).
* Host overhead (`test_grow_host_overhead`): the same 6 -> 24 layer plan at tiny width, so the time is
  the per-tensor Python and dispatch work (goal: < 3 ms): on the device, and on the meta device (no
  data at all; meta ops are Python decompositions, so this is pessimistic).
* Throughput (`test_throughput_before_after_growth`): a training step = forward + backward + AdamW
  (fused on CUDA) under bf16 autocast on CUDA; tokens/s = batch * seq / median step time, for the base
  model, the grown model (its first step separately: depth growth changes no shape a kernel sees) and
  the target built from scratch. ratio = grown / scratch tokens/s (goal >= 0.99). MFU uses fastgrow's
  convention (6N + causal attention, fastgrow/metrics.py).

GPU: the sizes above. CPU: the grow() benchmark at the same 410M shapes (~7 GB of memory, ~1 minute),
the throughput one tiny; FASTGROW_BENCH_QUICK=1 on a CPU (the gpu_check dry run) makes everything tiny.
Results go to $FASTGROW_BENCH_OUT/growth.jsonl when set.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import os
import time

import pytest
import torch
from results_log import record

from fastgrow.config import ModelConfig, RunConfig, TrainConfig, preset
from fastgrow.grow import GrowPlan, grow, resolve_plan
from fastgrow.grow_tensors import owners
from fastgrow.metrics import mfu, peak_flops
from fastgrow.model import flops_per_token
from fastgrow.state import TrainState, build_state

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")
QUICK_CPU = not CUDA and bool(os.environ.get("FASTGROW_BENCH_QUICK"))
TINY = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=128)

GROW_BASE = TINY if QUICK_CPU else preset("410M-base").model
GROW_ROUNDS = 2 if QUICK_CPU else (5 if CUDA else 3)
COPY_BYTES = 1 << (24 if QUICK_CPU else 30)
if CUDA:
    BASE = preset("410M-base").model
    BATCH, SEQ, STEPS = 8, 2048, 10
else:
    BASE = TINY
    BATCH, SEQ, STEPS = 4, 64, 2
PLAN = GrowPlan("stack", factor=4)
HOST_BASE = ModelConfig(vocab_size=256, dim=64, n_layers=6, n_heads=4, n_kv_heads=4, ffn_dim=128, max_seq_len=64)


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _state(model_cfg: ModelConfig, device: torch.device = DEV) -> TrainState:
    run = RunConfig(model=model_cfg, train=TrainConfig(device=device.type, lr=1e-4, min_lr=1e-5, warmup_steps=1))
    return build_state(run, device=device)


def _amp():
    return torch.autocast("cuda", dtype=torch.bfloat16) if CUDA else contextlib.nullcontext()


def _batch(vocab: int, batch: int = BATCH, seq: int = SEQ) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator(device="cpu").manual_seed(0)
    t = torch.randint(0, vocab, (batch, seq + 1), generator=g).to(DEV)
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
    """Bytes/s of a large device copy into memory already touched, counting read + write."""
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


def _stepped_state(cfg: ModelConfig) -> TrainState:
    """A fresh state whose AdamW has stepped once (so grow() carries moments and steps)."""
    st = _state(cfg)
    _step(st, *_batch(cfg.vocab_size, 1, 16 if not CUDA else SEQ))
    _sync()
    return st


def _copied(state: TrainState, plan: GrowPlan) -> list[torch.Tensor]:
    """The source of every tensor a consuming grow() copies: each parameter, exp_avg, exp_avg_sq and
    step of the grown layers that do not take over their source (fastgrow.grow_tensors.owners)."""
    r = resolve_plan(plan, state.model.cfg)
    owned = owners(r.sources, take=True)
    params = dict(state.model.named_parameters())
    out = []
    for i, s in enumerate(r.sources):
        if i in owned or s < 0:
            continue
        for name, p in params.items():
            if name.startswith(f"layers.{s}."):
                st = state.optimizer.state[p]
                out += [p.detach(), st["exp_avg"], st["exp_avg_sq"], st["step"]]
    return out


def _alloc_and_copy(sources: list[torch.Tensor]) -> float:
    _sync()
    t0 = time.perf_counter()
    dst = [torch.empty_like(s) for s in sources]
    torch._foreach_copy_(dst, sources)
    _sync()
    return time.perf_counter() - t0


def _fresh_memory_on_cpu() -> None:
    if CUDA:
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD, fixed (module doc)


class _Peak:
    """Extra memory at the peak of a call over what was in use before it (bytes)."""

    def __enter__(self) -> _Peak:
        _sync()
        if CUDA:
            torch.cuda.reset_peak_memory_stats()
            self.before = torch.cuda.memory_allocated()
        else:
            self.before = _proc_kb("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as f:  # resets VmHWM to the current RSS (Linux >= 4.0)
                f.write("5")
        return self

    def __exit__(self, *exc) -> None:
        _sync()
        peak = torch.cuda.max_memory_allocated() if CUDA else _proc_kb("VmHWM") * 1024
        self.extra = peak - self.before


def _proc_kb(key: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/self/status")


@pytest.mark.benchmark(group="growth")
def test_grow_time_vs_copy_floor(benchmark):
    _fresh_memory_on_cpu()
    bw = _copy_bandwidth()
    baseline: list[float] = []
    peaks: list[int] = []
    moved = 0

    def setup():
        nonlocal moved
        st = _stepped_state(GROW_BASE)
        sources = _copied(st, PLAN)
        moved = sum(t.numel() * t.element_size() for t in sources)
        baseline.append(_alloc_and_copy(sources))  # interleaved with the rounds of grow()
        del sources
        return (st,), {}

    def run(st):
        with _Peak() as peak:
            g = grow(st, PLAN, consume=True)
        peaks.append(peak.extra)
        return g

    benchmark.pedantic(run, setup=setup, rounds=GROW_ROUNDS, warmup_rounds=1)
    t = benchmark.stats.stats.median
    alloc_copy = _median(baseline[1:])  # the warm-up round's baseline is dropped with it
    floor = 2 * moved / bw
    # Reference: a growth that copies everything (consume=False): time and extra peak (old + new).
    st = _stepped_state(GROW_BASE)
    with _Peak() as peak_all:
        _sync()
        t0 = time.perf_counter()
        g = grow(st, PLAN)
        _sync()
        t_all = time.perf_counter() - t0
    del g, st
    dst = resolve_plan(PLAN, GROW_BASE).dst
    res = {
        "grow_s": t,
        "alloc_copy_s": alloc_copy,
        "copy_floor_s": floor,
        "grow_vs_alloc_copy": t / alloc_copy,
        "grow_vs_floor": t / floor,
        "bytes_copied": moved,
        "copy_bandwidth_Bps": bw,
        "peak_extra_bytes": _median(peaks),
        "grow_copy_all_s": t_all,
        "peak_extra_copy_all_bytes": peak_all.extra,
        "grown_state_bytes": 3 * dst.num_params() * 4,
    }
    benchmark.extra_info.update(res)
    record(
        "growth",
        kind="grow_time",
        op="stack",
        factor=4,
        consume=True,
        layers_before=GROW_BASE.n_layers,
        layers_after=dst.n_layers,
        dim=GROW_BASE.dim,
        params_after=dst.num_params(),
        rounds=GROW_ROUNDS,
        **res,
    )


@pytest.mark.benchmark(group="growth")
def test_grow_host_overhead(benchmark):
    """grow() of a 6-layer model to 24 layers at tiny width: the host's per-tensor work."""

    def fresh(device: torch.device) -> TrainState:
        st = _state(HOST_BASE, torch.device("cpu"))
        if device.type != "cpu":
            st = dataclasses.replace(st, model=st.model.to(device))
            from fastgrow.optim import build_optimizer

            st.optimizer = build_optimizer(st.model, st.config.train)
        for grp in st.optimizer.param_groups:
            for p in grp["params"]:
                step = torch.tensor(1.0, device=device)
                moments = {"exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
                st.optimizer.state[p] = {"step": step, **moments}
        return st

    def timed(device: torch.device, rounds: int, clock) -> float:
        out = []
        for _ in range(rounds):
            st = fresh(device)
            _sync()
            t0 = clock()
            grow(st, PLAN, consume=True)
            out.append(clock() - t0)  # no sync: the host's time (on a GPU the copies run on)
        return _median(out)

    n = 5 if QUICK_CPU else 30
    benchmark.pedantic(lambda st: grow(st, PLAN, consume=True), setup=lambda: ((fresh(DEV),), {}), rounds=n)
    res = {
        "host_ms": benchmark.stats.stats.median * 1e3,  # wall time
        # CPU time of this thread: what the host spends, without the waits of a shared, loaded machine
        "host_cpu_ms": timed(DEV, n, time.thread_time) * 1e3,
        "host_cpu_ms_meta": timed(torch.device("meta"), n, time.thread_time) * 1e3,
    }
    benchmark.extra_info.update(res)
    record("growth", kind="grow_host", layers_before=HOST_BASE.n_layers, layers_after=24, dim=HOST_BASE.dim, **res)


@pytest.mark.benchmark(group="growth")
def test_throughput_before_after_growth(benchmark):
    x, y = _batch(BASE.vocab_size)
    peak = peak_flops(DEV)
    base = _state(BASE)
    _timed_steps(base, 2, x, y)  # warm-up (kernel compilation, allocator)
    t_base = _median(_timed_steps(base, STEPS, x, y))

    grown = grow(base, PLAN, consume=True)  # as the trainer grows
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
