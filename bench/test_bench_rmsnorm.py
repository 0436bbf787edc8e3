"""RMSNorm / fused residual RMSNorm microbenchmarks: fastgrow vs torch eager, torch.compile, Liger-Kernel.

    pytest bench/test_bench_rmsnorm.py --benchmark-enable --benchmark-only

CUDA: bf16, rows 4096 x widths 1k..16k plus the model's token-batch shapes (16384 rows x dim 1024/2048/
4096). CPU: one tiny fp32 shape through the Triton interpreter, only so the harness stays tested (those
numbers mean nothing). GB/s counts the tensor bytes an ideal implementation must move once (see
bench/README.md); the same count for every impl, so GB/s compares directly with the copy bandwidth
measured by bench/test_bench_ceilings.py::test_copy_bandwidth (same harness). With FASTGROW_BENCH_OUT
set, each result is appended as a JSON line to $FASTGROW_BENCH_OUT/rmsnorm.jsonl.
"""

import importlib

import kernel_harness as harness
import pytest
import torch
import torch.nn.functional as F
from fastgrow.kernels import add_rms_norm, rms_norm, rms_norm_ref
from kernel_harness import CUDA, DEVICE, DTYPE, MODES, QUICK, _compile, _liger, make_timed

EPS = 1e-6
if CUDA:
    SHAPES = [(4096, n) for n in (1024, 2048, 4096, 8192, 16384)] + [(16384, d) for d in (1024, 2048, 4096)]
    ADD_SHAPES = SHAPES[-3:]
    if QUICK:  # the model shapes (410M: dim 1024; 3B-ish: 4096)
        SHAPES = ADD_SHAPES = [(16384, 1024), (16384, 4096)]
else:
    SHAPES = ADD_SHAPES = [(64, 256)]
# On a CPU our kernels only run if fastgrow.kernels was first imported with TRITON_INTERPRET=1 (set
# above); another bench module importing it earlier without the variable would leave compiled-mode
# kernels that cannot take CPU tensors. Detect that and skip rather than fail.
KERNELS_RUNNABLE = (
    CUDA or "Interpreted" in type(importlib.import_module("fastgrow.kernels.rmsnorm")._rms_norm_fwd_kernel).__name__
)
JSONL_NAME = "rmsnorm"


# The shared harness (timing, GB/s, JSONL) lives in bench/kernel_harness.py.
def run_bench(benchmark, fn, nbytes: int, **info) -> None:
    harness.run_bench(benchmark, fn, nbytes, jsonl_name=JSONL_NAME, **info)


# ----------------------------------------------------------------------------------------------------
# RMSNorm
# ----------------------------------------------------------------------------------------------------
def _rms_impls():
    impls = {
        "fastgrow": lambda x, w: rms_norm(x, w, EPS),
        "eager": lambda x, w: F.rms_norm(x, (x.shape[-1],), w, EPS),
        "compile": _compile(lambda x, w: rms_norm_ref(x, w, EPS)),
    }
    liger = _liger("liger_rms_norm")
    if liger is not None:
        impls["liger"] = lambda x, w: liger(x, w, EPS)
    return impls


RMS_IMPLS = _rms_impls()


def rms_bytes(m: int, n: int, mode: str) -> int:
    e = torch.finfo(DTYPE).bits // 8
    fwd = 2 * m * n * e + n * e  # read x, write y, read w
    bwd = 3 * m * n * e + 2 * n * e  # read x, dy; write dx; read w, write dw
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[mode]


@pytest.mark.parametrize("impl", list(RMS_IMPLS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_rms_norm(benchmark, shape, mode, impl):
    if impl == "fastgrow" and not KERNELS_RUNNABLE:
        pytest.skip("fastgrow.kernels was imported without TRITON_INTERPRET on a CPU; run this file alone")
    if QUICK and impl == "compile" and shape != SHAPES[0]:
        pytest.skip("quick mode: torch.compile is compared at the first shape only (its compile time)")
    m, n = shape
    x = torch.randn(m, n, device=DEVICE, dtype=DTYPE)
    w = torch.randn(n, device=DEVICE, dtype=DTYPE)
    fn = make_timed(mode, RMS_IMPLS[impl], [x, w], [torch.randn_like(x)])
    benchmark.group = f"rms_norm {mode} {m}x{n}"
    run_bench(benchmark, fn, rms_bytes(m, n, mode), op="rms_norm", mode=mode, impl=impl, shape=[m, n])


# ----------------------------------------------------------------------------------------------------
# Fused residual RMSNorm
# ----------------------------------------------------------------------------------------------------
def _eager_add_rms(x, r, w):
    h = x + r
    return h, F.rms_norm(h, (h.shape[-1],), w, EPS)


def _ref_add_rms(x, r, w):
    h = x + r
    return h, rms_norm_ref(h, w, EPS)


def _add_impls():
    impls = {
        "fastgrow": lambda x, r, w: add_rms_norm(x, r, w, EPS),
        "eager": _eager_add_rms,
        "compile": _compile(_ref_add_rms),
    }
    liger = _liger("liger_fused_add_rms_norm")
    if liger is not None:
        impls["liger"] = lambda x, r, w: liger(x, r, w, EPS)
    return impls


ADD_IMPLS = _add_impls()


def add_bytes(m: int, n: int, mode: str) -> int:
    e = torch.finfo(DTYPE).bits // 8
    fwd = 4 * m * n * e + n * e  # read x, residual; write h, y; read w
    bwd = 4 * m * n * e + 2 * n * e  # read dh, dy, h; write d(x) (= d(residual)); read w, write dw
    return {"fwd": fwd, "bwd": bwd, "fwdbwd": fwd + bwd}[mode]


@pytest.mark.parametrize("impl", list(ADD_IMPLS))
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("shape", ADD_SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
def test_add_rms_norm(benchmark, shape, mode, impl):
    if impl == "fastgrow" and not KERNELS_RUNNABLE:
        pytest.skip("fastgrow.kernels was imported without TRITON_INTERPRET on a CPU; run this file alone")
    if QUICK and impl == "compile" and shape != SHAPES[0]:
        pytest.skip("quick mode: torch.compile is compared at the first shape only (its compile time)")
    m, n = shape
    x, r = (torch.randn(m, n, device=DEVICE, dtype=DTYPE) for _ in range(2))
    w = torch.randn(n, device=DEVICE, dtype=DTYPE)
    fn = make_timed(mode, ADD_IMPLS[impl], [x, r, w], [torch.randn_like(x), torch.randn_like(x)])
    benchmark.group = f"add_rms_norm {mode} {m}x{n}"
    run_bench(benchmark, fn, add_bytes(m, n, mode), op="add_rms_norm", mode=mode, impl=impl, shape=[m, n])
