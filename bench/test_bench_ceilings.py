"""The two ceilings every other number is a fraction of: device copy bandwidth and bf16 matmul rate.

Both are timed by the kernel harness (bench/kernel_harness.py: L2 flushed in the untimed setup, CUDA events
around the call), so the kernels' GB/s compare directly with the copy. Copy bandwidth counts bytes read +
written over the median time of `dst.copy_(src)` on a 4096 x 16384 tensor in the kernels' dtype (256 MB
moved, far above L2); the matmul rate is 2*M*N*K / time for a square bf16 product on random data (never
zeros, which run faster than real data on Hopper). On a CPU the sizes are tiny: only the harness is
exercised. Results go to $FASTGROW_BENCH_OUT/ceilings.jsonl.
"""

from __future__ import annotations

import pytest
import torch
from kernel_harness import CUDA, DEVICE, DTYPE, emit, measure, run_bench


@pytest.mark.benchmark(group="ceilings")
def test_copy_bandwidth(benchmark):
    m, n = (4096, 16384) if CUDA else (64, 256)
    src = torch.randn(m, n, device=DEVICE, dtype=DTYPE)
    dst = torch.empty_like(src)
    nbytes = 2 * src.numel() * src.element_size()
    run_bench(benchmark, lambda: dst.copy_(src), nbytes, jsonl_name="ceilings", op="copy", mode="fwd", shape=[m, n])
    assert torch.equal(dst, src)


@pytest.mark.benchmark(group="ceilings")
def test_matmul_rate(benchmark):
    n = 8192 if CUDA else 256
    dtype = torch.bfloat16 if CUDA else torch.float32
    a = torch.randn(n, n, device=DEVICE, dtype=dtype)
    b = torch.randn(n, n, device=DEVICE, dtype=dtype)
    median_s = measure(benchmark, lambda: a @ b)
    row = {"op": "matmul", "n": n, "dtype": str(dtype).removeprefix("torch."), "median_ms": median_s * 1e3}
    emit(benchmark, "ceilings", {**row, "tflops": 2 * n**3 / median_s / 1e12})
