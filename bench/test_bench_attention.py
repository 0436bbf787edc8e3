"""Attention microbenchmarks: TFLOP/s of forward, backward and forward+backward.

    pytest bench/test_bench_attention.py --benchmark-enable --benchmark-only

GPU (bf16, causal):
- test_attention: the FlashAttention benchmark shapes (hidden 2048, batch * seq = 16k tokens, seq 512..16k,
  head dims 64 and 128, MHA) for our Triton kernel, torch SDPA's default dispatch, each SDPA backend
  (flash, cuDNN, memory-efficient) forced with `sdpa_kernel`, and flash-attn when installed.
- test_attention_model_shapes: the presets' training shapes (batch 8 x seq 2048; 1.1B is GQA 32/4).
- test_attention_config_sweep: each kernel's configs timed one by one (the launchers' first-use tuner
  does the same per key; this keeps every number).
FASTGROW_BENCH_QUICK=1 (tools/gpu_check.sh): only the model shapes, triton vs SDPA's default dispatch.
CPU: tiny shapes for the reference and SDPA, and our kernel at one tiny shape when the interpreter is on
(bench/conftest.py turns it on without CUDA): only a harness check, CPU numbers mean nothing.

FLOPs (FlashAttention convention): forward 4 * b * h * s^2 * d, halved when causal; backward 2.5x forward.
Timing: bench/kernel_harness.py (L2 flushed in pedantic's untimed setup, CUDA events around one call).
Each benchmark stores TFLOP/s and median ms in `benchmark.extra_info` and, when FASTGROW_BENCH_OUT is set,
appends a JSON line to $FASTGROW_BENCH_OUT/attention.jsonl (via bench/kernel_harness.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math

import pytest
import torch
import triton
from fastgrow.kernels import attention_configs
from fastgrow.kernels._common import interpreter_enabled
from fastgrow.kernels.attention import attention
from kernel_harness import QUICK, emit, measure

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


def _make_step(backend: str, which: str, b: int, s: int, h: int, d: int, hk: int | None = None):
    """Returns a no-argument callable running one pass of `which` (the benchmarked work)."""
    dev = "cuda" if CUDA else "cpu"
    fn = _attn_fn(backend)
    grad = which != "fwd"
    hk = h if hk is None else hk
    q = torch.randn(b, s, h, d, device=dev, dtype=DTYPE, requires_grad=grad)
    k, v = (torch.randn(b, s, hk, d, device=dev, dtype=DTYPE, requires_grad=grad) for _ in range(2))
    if which == "fwd":
        return lambda: fn(q, k, v)
    do = torch.randn(b, s, h, d, device=dev, dtype=DTYPE)
    if which == "bwd":
        out = fn(q, k, v)  # one graph, backward replayed on it
        return lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
    return lambda: torch.autograd.grad(fn(q, k, v), (q, k, v), do)


def _time_and_record(
    benchmark, step, b: int, h: int, seq: int, d: int, backend: str, which: str, hk: int | None = None, **extra
):
    """Benchmark `step` with the kernel harness; TFLOP/s etc. to benchmark.extra_info and attention.jsonl."""
    median_s = measure(benchmark, step, rounds=30 if CUDA and not QUICK else (10 if CUDA else 3))
    tflops = _flops(b, h, seq, d, which) / median_s / 1e12
    info = {
        "op": "attention",
        "batch": b,
        "seq": seq,
        "heads": h,
        "kv_heads": h if hk is None else hk,
        "head_dim": d,
        "causal": CAUSAL,
        "dtype": str(DTYPE).removeprefix("torch."),
        "backend": backend,
        "pass": which,
        "median_ms": median_s * 1e3,
        "tflops": tflops,
        "timer": "cuda events, L2 flushed" if CUDA else "wall",
        **extra,
    }
    emit(benchmark, "attention", info)
    assert math.isnan(tflops) or tflops > 0


@pytest.mark.parametrize("which", PASSES)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("d", HEAD_DIMS)
@pytest.mark.parametrize("seq", SEQS)
def test_attention(benchmark, seq, d, backend, which):
    if QUICK:
        pytest.skip("quick mode: model shapes only (test_attention_model_shapes)")
    if backend == "triton" and not (CUDA or interpreter_enabled()):
        pytest.skip("triton attention needs CUDA (the interpreter is only for tests)")
    if backend == "triton" and not CUDA and seq > 128:
        pytest.skip("interpreter: only the smallest shape, as a harness check")
    if backend == "flash_attn":
        pytest.importorskip("flash_attn")
    h, b = HIDDEN // d, TOKENS // seq
    if backend == "triton" and not CUDA:
        h, b = 1, 1  # the interpreter runs programs one by one in Python: keep the harness check quick
    try:
        step = _make_step(backend, which, b, seq, h, d)
        step()  # compile / tune / pick kernels outside the timing
        _sync()
    except RuntimeError as e:  # an SDPA backend without a kernel for this device/shape
        pytest.skip(f"{backend} unavailable here: {str(e).splitlines()[0][:200]}")
    _time_and_record(benchmark, step, b, h, seq, d, backend, which)


# The presets' training shapes (fastgrow/config.py, batch 8 x seq 2048): what the end-to-end runs see.
# name: (heads, kv_heads, head_dim)
MODEL_SHAPES = {"410M": (16, 16, 64), "1.1B": (32, 4, 64), "3B": (20, 20, 128), "7B": (32, 32, 128)}
if QUICK:
    MODEL_SHAPES.pop("7B")  # 3B has its head dim; the lease is short
if not CUDA:  # harness check: one tiny GQA shape through the interpreter
    MODEL_SHAPES = {"tiny": (2, 1, 32)}


@pytest.mark.parametrize("which", ["fwd", "fwd_bwd"])
@pytest.mark.parametrize("backend", ["triton", "sdpa"] if QUICK else ["triton", "sdpa", "flash_attn"])
@pytest.mark.parametrize("model", list(MODEL_SHAPES))
def test_attention_model_shapes(benchmark, model, backend, which):
    if backend == "flash_attn":
        pytest.importorskip("flash_attn")
    if backend == "triton" and not (CUDA or interpreter_enabled()):
        pytest.skip("triton attention needs CUDA (the interpreter is only for tests)")
    h, hk, d = MODEL_SHAPES[model]
    b, seq = (8, 2048) if CUDA else (1, 64)
    step = _make_step(backend, which, b, seq, h, d, hk)
    step()
    _sync()
    _time_and_record(benchmark, step, b, h, seq, d, backend, which, hk, model=model)


# Launch-config sweep for the Triton kernels (GPU only): times configs one by one at seq 4096, so the
# candidate tables in kernels/attention_configs.py can be re-chosen from measurements. (block_m, block_n, warps, stages)
SWEEP = {
    ("fwd", 64): [(128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3), (128, 32, 4, 4)],
    ("fwd", 128): [(128, 64, 8, 3), (128, 128, 8, 3), (128, 128, 8, 2), (64, 64, 4, 3), (128, 64, 4, 3)],
    ("dkdv", 64): [(32, 128, 8, 3), (32, 128, 4, 3), (16, 128, 8, 3), (64, 128, 8, 2), (32, 64, 4, 3)],
    ("dkdv", 128): [(32, 128, 8, 3), (32, 128, 8, 2), (16, 128, 8, 2), (16, 128, 8, 3), (64, 128, 8, 2)],
    ("dq", 64): [(128, 32, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 2), (64, 32, 4, 3)],
    ("dq", 128): [(128, 32, 8, 3), (128, 32, 4, 3), (64, 64, 4, 3), (128, 64, 8, 2), (64, 32, 4, 3)],
}
# ... plus every candidate of the launchers' tuning tables.
for (_kern, _d), _cfgs in SWEEP.items():
    _cands = getattr(attention_configs.GPU_CANDIDATES[(False, _d <= 64)], _kern)
    _cfgs += [c for c in ((x.block_m, x.block_n, x.num_warps, x.num_stages) for x in _cands) if c not in _cfgs]
SWEEP_CASES = [(kern, d, cfg) for (kern, d), cfgs in SWEEP.items() for cfg in cfgs]


@pytest.mark.skipif(not CUDA or QUICK, reason="config sweep needs a CUDA GPU (and is not part of quick mode)")
@pytest.mark.parametrize(
    "kern,d,cfg", SWEEP_CASES, ids=[f"{k}-d{d}-{'x'.join(map(str, c))}" for k, d, c in SWEEP_CASES]
)
def test_attention_config_sweep(benchmark, monkeypatch, kern, d, cfg):
    key = (False, d <= 64)
    table = dict(attention_configs.GPU_CANDIDATES)
    # One candidate: the launcher runs exactly this config (no tuning).
    table[key] = dataclasses.replace(table[key], **{kern: (attention_configs._Cfg(*cfg),)})
    monkeypatch.setattr(attention_configs, "GPU_CANDIDATES", table)
    seq = 4096
    h, b = HIDDEN // d, TOKENS // seq
    which = "fwd" if kern == "fwd" else "bwd"
    step = _make_step("triton", which, b, seq, h, d)
    try:
        step()
        _sync()
    except triton.runtime.errors.OutOfResources as e:  # e.g. too much shared memory for this GPU
        pytest.skip(f"config does not fit: {e}")
    _time_and_record(benchmark, step, b, h, seq, d, "triton", which, kernel=kern, config=list(cfg))
