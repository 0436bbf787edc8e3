"""Shared harness of the kernel microbenchmarks (RMSNorm, SwiGLU): GPU-event timing with an L2 flush,
GB/s from a fixed byte count, JSON lines under $FASTGROW_BENCH_OUT, and the three timed modes
(forward, backward of a retained graph, forward+backward). See bench/README.md."""

import json
import os
import statistics
import subprocess

import torch
import triton

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
ROUNDS, WARMUP = (30, 3) if CUDA else (2, 0)
MODES = ("fwd", "bwd", "fwdbwd")


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


def _gpu_round(fn, times: list) -> None:
    """One timed call on CUDA, measured with events on the GPU timeline.

    A 512 MB memset first evicts L2 (so inputs come from HBM, as in training, not from a warm cache)
    and keeps the GPU busy for ~0.2 ms while the host enqueues `fn`: the events then time the
    kernels alone, not Python/launch overhead (what triton.testing.do_bench does too).
    """
    global _FLUSH
    if _FLUSH is None:
        _FLUSH = torch.empty(512 * 2**20, dtype=torch.uint8, device="cuda")
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    _FLUSH.zero_()
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    times.append(start.elapsed_time(end) / 1e3)


def run_bench(benchmark, fn, nbytes: int, *, jsonl_name: str, **info) -> None:
    """Time `fn`; record median ms and GB/s (CUDA: GPU-event time per call, see _gpu_round; CPU: the
    wall-clock median from pytest-benchmark)."""
    global _META
    for _ in range(2):  # compile / autotune / first-launch costs stay out of the numbers
        fn()
    _sync()
    gpu_times: list[float] = []
    target = (lambda: _gpu_round(fn, gpu_times)) if CUDA else fn
    benchmark.pedantic(target, rounds=ROUNDS, iterations=1, warmup_rounds=WARMUP)
    if benchmark.disabled:  # plain `pytest bench` (--benchmark-disable): ran once as a smoke test
        return
    median_s = statistics.median(gpu_times[WARMUP:]) if CUDA else benchmark.stats.stats.median
    gbps = nbytes / median_s / 1e9
    if _META is None:
        _META = _meta()
    row = {**_META, **info, "dtype": str(DTYPE).replace("torch.", ""), "bytes": nbytes}
    row.update(median_ms=median_s * 1e3, gbps=gbps, timer="cuda events, L2 flushed" if CUDA else "wall")
    benchmark.extra_info.update(row)
    out_dir = os.environ.get("FASTGROW_BENCH_OUT")
    if out_dir:
        os.makedirs(out_dir, exist_ok=True)
        with open(os.path.join(out_dir, f"{jsonl_name}.jsonl"), "a") as f:
            f.write(json.dumps(row) + "\n")


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
