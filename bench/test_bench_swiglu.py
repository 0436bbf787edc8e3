"""SwiGLU microbenchmarks (packed [rows, 2F] input, as the model calls it): fastgrow vs torch eager,
torch.compile, Liger-Kernel.

    pytest bench/test_bench_swiglu.py --benchmark-enable --benchmark-only

CUDA: bf16, rows 4096 x F 1k..16k plus the model's token-batch shapes (16384 rows x ffn 2816/5632/11008).
CPU: one tiny fp32 shape through the Triton interpreter, only so the harness stays tested (those numbers
mean nothing). GB/s counts the tensor bytes an ideal implementation must move once (see
bench/README.md); the same count for every impl. With FASTGROW_BENCH_OUT set, each result is appended
as a JSON line to $FASTGROW_BENCH_OUT/swiglu.jsonl.
"""

import importlib
import json
import os
import statistics
import subprocess

import torch

if not torch.cuda.is_available():
    # Before fastgrow.kernels (and so triton) is imported: run the kernels through the interpreter.
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import triton  # noqa: E402
from fastgrow.kernels import swiglu  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
if CUDA:
    SHAPES = [(4096, f) for f in (1024, 2048, 4096, 8192, 16384)] + [(16384, f) for f in (2816, 5632, 11008)]
    ROUNDS, WARMUP = 30, 3
else:
    SHAPES = [(64, 384)]
    ROUNDS, WARMUP = 2, 0
# On a CPU our kernels only run if fastgrow.kernels was first imported with TRITON_INTERPRET=1 (set
# above); another bench module importing it earlier without the variable would leave compiled-mode
# kernels that cannot take CPU tensors. Detect that and skip rather than fail.
KERNELS_RUNNABLE = (
    CUDA or "Interpreted" in type(importlib.import_module("fastgrow.kernels.swiglu")._swiglu_fwd_kernel).__name__
)
MODES = ("fwd", "bwd", "fwdbwd")
JSONL_NAME = "swiglu"


# ----------------------------------------------------------------------------------------------------
# harness (kept self-contained per bench file)
# ----------------------------------------------------------------------------------------------------
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


def run_bench(benchmark, fn, nbytes: int, **info) -> None:
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
        with open(os.path.join(out_dir, f"{JSONL_NAME}.jsonl"), "a") as f:
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


# ----------------------------------------------------------------------------------------------------
# SwiGLU, packed input
# ----------------------------------------------------------------------------------------------------
def _eager_swiglu(x):
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def _impls():
    impls = {
        "fastgrow": swiglu,
        "eager": _eager_swiglu,
        "compile": _compile(_eager_swiglu),
    }
    liger = _liger("liger_swiglu")
    if liger is not None:
        impls["liger"] = lambda x: liger(*x.chunk(2, dim=-1))
    return impls


IMPLS = _impls()


def swiglu_bytes(m: int, f: int, mode: str) -> int:
    e = torch.finfo(DTYPE).bits // 8
    fwd = 3 * m * f * e  # read gate, up; write out
    bwd = 5 * m * f * e  # read d_out, gate, up; write d_gate, d_up
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[mode]


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_swiglu(benchmark, shape, mode, impl):
    if impl == "fastgrow" and not KERNELS_RUNNABLE:
        pytest.skip("fastgrow.kernels was imported without TRITON_INTERPRET on a CPU; run this file alone")
    m, f = shape
    x = torch.randn(m, 2 * f, device=DEVICE, dtype=DTYPE)
    fn = make_timed(mode, IMPLS[impl], [x], [torch.randn(m, f, device=DEVICE, dtype=DTYPE)])
    benchmark.group = f"swiglu {mode} {m}x{f}"
    run_bench(benchmark, fn, swiglu_bytes(m, f, mode), op="swiglu", mode=mode, impl=impl, shape=[m, f])


# ----------------------------------------------------------------------------------------------------
# The yardstick: device copy bandwidth, measured the same way
# ----------------------------------------------------------------------------------------------------
def test_copy_bandwidth(benchmark):
    m, n = (4096, 16384) if CUDA else SHAPES[0]
    src = torch.randn(m, n, device=DEVICE, dtype=DTYPE)
    dst = torch.empty_like(src)
    benchmark.group = "copy"
    e = torch.finfo(DTYPE).bits // 8
    run_bench(benchmark, lambda: dst.copy_(src), 2 * m * n * e, op="copy", mode="fwd", impl="torch", shape=[m, n])
