"""Attention microbenchmarks: TFLOP/s of forward, backward and forward+backward.

GPU: the FlashAttention benchmark shapes (hidden 2048, batch * seq = 16k tokens, seq 512..16k, head dims 64
and 128, causal, bf16, MHA) for our Triton kernel, torch SDPA's default dispatch and each SDPA backend
(flash, cuDNN, memory-efficient) forced with `sdpa_kernel`, and flash-attn when installed.
CPU: tiny shapes for the reference and SDPA, so `pytest bench --benchmark-only` stays quick and checks the
harness; CPU numbers say nothing about the kernels.

FLOPs (FlashAttention convention): forward 4 * b * h * s^2 * d, halved when causal; backward 2.5x forward.
Each benchmark stores TFLOP/s and median ms in `benchmark.extra_info` and, when FASTGROW_BENCH_OUT is set,
appends a JSON line to $FASTGROW_BENCH_OUT/attention.jsonl. Self-contained: no bench/conftest.py needed.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import time

import pytest
import torch
import triton
from fastgrow.kernels._common import interpreter_enabled
from fastgrow.kernels.attention import attention

CUDA = torch.cuda.is_available()
if CUDA:
    HIDDEN, TOKENS, DTYPE = 2048, 16384, torch.bfloat16
    SEQS = [512, 1024, 2048, 4096, 8192, 16384]
    HEAD_DIMS = [64, 128]
    BACKENDS = ["triton", "sdpa", "sdpa_flash", "sdpa_cudnn", "sdpa_efficient", "flash_attn"]
else:
    HIDDEN, TOKENS, DTYPE = 128, 512, torch.float32
    SEQS = [128, 256]
    HEAD_DIMS = [64]
    BACKENDS = ["ref", "sdpa", "triton"]
PASSES = ["fwd", "bwd", "fwd_bwd"]
CAUSAL = True


def _sdpa_context(backend: str):
    if not backend.startswith("sdpa_"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel

    which = {
        "sdpa_flash": SDPBackend.FLASH_ATTENTION,
        "sdpa_cudnn": SDPBackend.CUDNN_ATTENTION,
        "sdpa_efficient": SDPBackend.EFFICIENT_ATTENTION,
    }[backend]
    return sdpa_kernel(which)


def _attn_fn(backend: str):
    name = "sdpa" if backend.startswith("sdpa") else backend

    def fn(q, k, v):
        with _sdpa_context(backend):
            return attention(q, k, v, causal=CAUSAL, backend=name)

    return fn


def _flops(b: int, h: int, s: int, d: int, which: str) -> float:
    fwd = 4.0 * b * h * s * s * d / (2.0 if CAUSAL else 1.0)
    return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd_bwd": 3.5}[which]


def _sync() -> None:
    if CUDA:
        torch.cuda.synchronize()


def _make_step(backend: str, which: str, b: int, s: int, h: int, d: int):
    """Returns a no-argument callable running one pass of `which` (the benchmarked work)."""
    dev = "cuda" if CUDA else "cpu"
    fn = _attn_fn(backend)
    grad = which != "fwd"
    q, k, v = (torch.randn(b, s, h, d, device=dev, dtype=DTYPE, requires_grad=grad) for _ in range(3))
    if which == "fwd":
        return lambda: fn(q, k, v)
    do = torch.randn(b, s, h, d, device=dev, dtype=DTYPE)
    if which == "bwd":
        out = fn(q, k, v)  # one graph, backward replayed on it
        return lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
    return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do)


def _record(row: dict) -> None:
    out_dir = os.environ.get("FASTGROW_BENCH_OUT")
    if not out_dir:
        return
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "attention.jsonl"), "a") as f:
        f.write(json.dumps(row) + "\n")


@pytest.mark.parametrize("which", PASSES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("seq", SEQS)
def test_attention(benchmark, seq, d, backend, which):
    if backend == "triton" and not (CUDA or interpreter_enabled()):
        pytest.skip("triton attention needs CUDA (or TRITON_INTERPRET=1, far too slow to benchmark)")
    if backend == "triton" and not CUDA and seq > 128:
        pytest.skip("interpreter: only the smallest shape, as a harness check")
    if backend == "flash_attn":
        pytest.importorskip("flash_attn")
    h, b = HIDDEN // d, TOKENS // seq
    try:
        step = _make_step(backend, which, b, seq, h, d)
        step()  # compile / pick kernels outside the timing
        _sync()
    except RuntimeError as e:  # an SDPA backend without a kernel for this device/shape
        pytest.skip(f"{backend} unavailable here: {str(e).splitlines()[0][:200]}")

    # Repeat the step inside one timed call so each round lasts >= ~5 ms and the host sync after it is noise.
    t0 = time.perf_counter()
    step()
    _sync()
    once = time.perf_counter() - t0
    inner = max(1, min(100, math.ceil(5e-3 / max(once, 1e-6)))) if CUDA else 1

    def run():
        for _ in range(inner):
            step()
        _sync()

    benchmark.pedantic(run, rounds=10 if CUDA else 3, warmup_rounds=1, iterations=1)
    if benchmark.stats is not None:
        median_s = benchmark.stats.stats.median / inner
    else:  # --benchmark-disable: one untimed call was made; time one more for the record
        t0 = time.perf_counter()
        run()
        median_s = (time.perf_counter() - t0) / inner
    tflops = _flops(b, h, seq, d, which) / median_s / 1e12
    info = {
        "op": "attention",
        "device": torch.cuda.get_device_name() if CUDA else "cpu",
        "torch": torch.__version__,
        "triton": triton.__version__,
        "batch": b,
        "seq": seq,
        "heads": h,
        "kv_heads": h,
        "head_dim": d,
        "causal": CAUSAL,
        "dtype": str(DTYPE).removeprefix("torch."),
        "backend": backend,
        "pass": which,
        "median_ms": median_s * 1e3,
        "tflops": tflops,
    }
    benchmark.extra_info.update(info)
    _record(info)
    assert math.isfinite(tflops) and tflops > 0
