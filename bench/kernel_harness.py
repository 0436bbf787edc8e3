"""Shared harness of the kernel microbenchmarks (RMSNorm, SwiGLU, attention, the copy/matmul ceilings):
timing with the L2 flush outside the timed call, GB/s from a fixed byte count, JSON lines under
$FASTGROW_BENCH_OUT, and the three timed modes (forward, backward of a retained graph, forward+backward).
See bench/README.md.

Timing (`measure`): `benchmark.pedantic(call, setup=flush, rounds, warmup_rounds)`. On CUDA the setup
zeroes a 512 MB buffer (evicts L2, so inputs come from HBM as in training) and synchronises; the timed
call then runs the kernel(s) between two CUDA events and synchronises. pytest-benchmark's own numbers
(its table, --benchmark-compare) therefore time the call itself (launch + kernels + one sync), never the
flush; `median_ms` in extra_info / JSONL is the GPU-event time of the kernels alone. On a CPU the same
structure runs on tiny shapes (interpreter): only the harness is tested, the numbers mean nothing.

FASTGROW_BENCH_QUICK=1 (what tools/gpu_check.sh sets) trims every file to the shapes that answer the
project's goals (the model shapes), so the whole set fits a short GPU lease.
"""

import json
import os
import statistics
import subprocess

import torch
import triton

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
QUICK = os.environ.get("FASTGROW_BENCH_QUICK", "0") not in ("", "0")
ROUNDS, WARMUP = (30 if not QUICK else 15, 3) if CUDA else (2, 1)
MODES = ("fwd", "bwd", "fwdbwd") if not QUICK else ("fwd", "fwdbwd")


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _liger(name: str):
    try:
        import liger_kernel.transformers.functional as lf
    except Exception:
        return None
    return getattr(lf, name, None)


def _meta() -> dict:
    try:
        commit = subprocess.check_output(["git", "rev-parse", "HEAD"], text=True, stderr=subprocess.DEVNULL).strip()
    except Exception:
        commit = None
    return {
        "device": torch.cuda.get_device_name(0) if CUDA else "cpu (Triton interpreter)",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "commit": commit,
    }


_META = None
_FLUSH = None


def _flush() -> None:
    """pedantic's setup: evict L2 (CUDA) outside the timed call."""
    global _FLUSH
    if CUDA:
        if _FLUSH is None:
            _FLUSH = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
        _FLUSH.zero_()
        torch.cuda.synchronize()


def measure(benchmark, fn, *, rounds: int = ROUNDS, warmup: int = WARMUP) -> float:
    """Median seconds of one `fn()` call: GPU-event time on CUDA, wall time on a CPU. Untimed calls first
    (compilation, autotuning, first-launch costs: two on CUDA, one on a CPU), then `warmup` untimed rounds."""
    for _ in range(2 if CUDA else 1):
        fn()
    _sync()
    times: list[float] = []

    def call():
        if CUDA:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            fn()

    benchmark.pedantic(call, setup=_flush, rounds=rounds, iterations=1, warmup_rounds=warmup)
    if CUDA:
        return statistics.median(times[-rounds:]) if times else float("nan")
    if benchmark.disabled:  # --benchmark-disable: pedantic made one untimed call
        return float("nan")
    return benchmark.stats.stats.median


def emit(benchmark, jsonl_name: str, row: dict) -> dict:
    """Add device/versions/commit to `row`, put it in benchmark.extra_info and append it as a JSON line to
    $FASTGROW_BENCH_OUT/<jsonl_name>.jsonl (when that is set)."""
    global _META
    if _META is None:
        _META = _meta()
    row = {**_META, **row}
    benchmark.extra_info.update(row)
    out_dir = os.environ.get("FASTGROW_BENCH_OUT")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"{jsonl_name}.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")
    return row


def run_bench(benchmark, fn, nbytes: int, *, jsonl_name: str, **info) -> None:
    """Time `fn`; record median ms and GB/s (see `measure`)."""
    median_s = measure(benchmark, fn)
    row = {**info, "dtype": str(DTYPE).replace("torch.", ""), "bytes": nbytes}
    row.update(median_ms=median_s * 1e3, gbps=nbytes / median_s / 1e9)
    row["timer"] = "cuda events, L2 flushed" if CUDA else "wall"
    emit(benchmark, jsonl_name, row)


def make_timed(mode: str, forward, inputs: list[torch.Tensor], upstream: list[torch.Tensor]):
    """fwd: forward without autograd; bwd: backward of one retained graph; fwdbwd: both."""
    if mode == "fwd":

        def fwd():
            with torch.no_grad():
                forward(*inputs)

        return fwd
    leaves = [t.requires_grad_(True) for t in inputs]
    if mode == "bwd":
        outs = forward(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        return lambda: torch.autograd.grad(outs, leaves, upstream, retain_graph=True)

    def fwdbwd():
        outs = forward(*leaves)
        outs = outs if isinstance(outs, tuple) else (outs,)
        torch.autograd.grad(outs, leaves, upstream)

    return fwdbwd


# One compiled function serves every shape and grad mode: let it specialise on each (dynamic=False, a
# larger recompile budget) rather than fall back to a dynamic-shape kernel or to eager.
for _name in ("recompile_limit", "cache_size_limit"):
    if hasattr(torch._dynamo.config, _name):
        setattr(torch._dynamo.config, _name, 64)


def _compile(fn):
    # Inductor on CUDA (what users would compare against); aot_eager on CPU keeps the harness cheap.
    return torch.compile(fn, backend="inductor" if CUDA else "aot_eager", dynamic=False)
