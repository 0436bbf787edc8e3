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

import kernel_harness as harness
import pytest
import torch
import torch.nn.functional as F
from fastgrow.kernels import swiglu
from kernel_harness import CUDA, DEVICE, DTYPE, MODES, QUICK, _compile, _liger, make_timed

if CUDA:
    SHAPES = [(4096, f) for f in (1024, 2048, 4096, 8192, 16384)] + [(16384, f) for f in (2816, 5632, 11008)]
    if QUICK:  # the model shapes (410M: ffn 2816; 7B: 11008)
        SHAPES = [(16384, 2816), (16384, 11008)]
else:
    SHAPES = [(64, 384)]
# On a CPU our kernels only run if fastgrow.kernels was first imported with TRITON_INTERPRET=1 (set
# above); another bench module importing it earlier without the variable would leave compiled-mode
# kernels that cannot take CPU tensors. Detect that and skip rather than fail.
KERNELS_RUNNABLE = (
    CUDA or "Interpreted" in type(importlib.import_module("fastgrow.kernels.swiglu")._swiglu_fwd_kernel).__name__
)
JSONL_NAME = "swiglu"


# The shared harness (timing, GB/s, JSONL) lives in bench/kernel_harness.py.
def run_bench(benchmark, fn, nbytes: int, **info) -> None:
    harness.run_bench(benchmark, fn, nbytes, jsonl_name=JSONL_NAME, **info)


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
    if QUICK and impl == "compile" and shape != SHAPES[0]:
        pytest.skip("quick mode: torch.compile is compared at the first shape only (its compile time)")
    m, f = shape
    x = torch.randn(m, 2 * f, device=DEVICE, dtype=DTYPE)
    fn = make_timed(mode, IMPLS[impl], [x], [torch.randn(m, f, device=DEVICE, dtype=DTYPE)])
    benchmark.group = f"swiglu {mode} {m}x{f}"
    run_bench(benchmark, fn, swiglu_bytes(m, f, mode), op="swiglu", mode=mode, impl=impl, shape=[m, f])
