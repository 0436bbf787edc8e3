"""The two ceilings every other number is a fraction of: device copy bandwidth and bf16 matmul rate.

Copy bandwidth counts bytes read + bytes written (2 x size) over the median time of a device-to-device
copy; the matmul rate is 2*M*N*K / time for a square bf16 product on random data (never zeros, which
run faster than real data on Hopper). On CPU the sizes are tiny: only the harness is exercised.
"""

from __future__ import annotations

import pytest
import torch
from results_log import record

CUDA = torch.cuda.is_available()
DEV = "cuda" if CUDA else "cpu"


def _sync():
    if CUDA:
        torch.cuda.synchronize()


@pytest.mark.benchmark(group="ceilings")
def test_copy_bandwidth(benchmark):
    n = (1 << 30) if CUDA else (1 << 22)  # 1 GiB on GPU (far above L2), 4 MiB on CPU
    src = torch.randint(0, 255, (n,), dtype=torch.uint8, device=DEV)
    dst = torch.empty_like(src)

    def run():
        dst.copy_(src)
        _sync()

    benchmark.pedantic(run, rounds=20 if CUDA else 5, warmup_rounds=3)
    gbs = 2 * n / benchmark.stats.stats.median / 1e9
    benchmark.extra_info.update(bytes=2 * n, gb_per_s=gbs)
    record("ceilings", what="copy_bandwidth", bytes=2 * n, median_s=benchmark.stats.stats.median, gb_per_s=gbs)
    assert torch.equal(dst[:1024], src[:1024])


@pytest.mark.benchmark(group="ceilings")
def test_matmul_rate(benchmark):
    n = 8192 if CUDA else 256
    dtype = torch.bfloat16 if CUDA else torch.float32
    a = torch.randn(n, n, device=DEV, dtype=dtype)
    b = torch.randn(n, n, device=DEV, dtype=dtype)

    def run():
        a @ b
        _sync()

    benchmark.pedantic(run, rounds=20 if CUDA else 5, warmup_rounds=3)
    tflops = 2 * n**3 / benchmark.stats.stats.median / 1e12
    benchmark.extra_info.update(n=n, dtype=str(dtype), tflop_per_s=tflops)
    record("ceilings", what="matmul", n=n, dtype=str(dtype), median_s=benchmark.stats.stats.median, tflop_per_s=tflops)
