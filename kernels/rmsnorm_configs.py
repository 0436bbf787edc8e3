"""Launch configurations of the RMSNorm kernels: tile shapes, warps, and the candidates the launchers
time on first use on CUDA (`_tune.pick`; `FASTGROW_TUNE=0`: always the first, the fallback table).
"""

import functools
from dataclasses import dataclass

from ._common import next_pow2

# num_warps by tile size (ROWS * BLOCK_N elements). Forward: ~16 elements per thread (two 16-byte bf16
# vectors per stream in flight), up to 32 warps; ptxas (sm_90, Triton 3.9) gives it 32-40 registers.
# Backward keeps x, dy and the fp32 dw accumulator live per element: 112-124 registers at 1K-8K (so
# 2 programs of 8 warps or 1 of 16 fit an SM), and 16K-wide rows stay at 16 warps (128 registers, a
# 64-byte spill) where 32 warps would cap every thread at 64 registers and spill much more; at 32K-64K
# spilling is unavoidable and the widest block wins. tests/test_norm_kernels_sm90.py checks this.
# These are the fallbacks; on CUDA the launchers time them against twice/half the warps on first use
# per (kernel, width, dtypes, row-count bucket) and keep the fastest (_tune.py; FASTGROW_TUNE=0: fallback).
_FWD_WARPS = {2048: 4, 4096: 8, 8192: 16, 16384: 32, 32768: 32, 65536: 32}
_BWD_WARPS = {2048: 4, 4096: 8, 8192: 16, 16384: 16, 32768: 32, 65536: 32}
# Shared memory the backward's prefetch buffers may take (two tiles of its streamed inputs); above it
# (fp32 inputs at 16K+ widths) the loop runs unpipelined rather than fail to launch (227 KB per block).
_PIPELINE_SMEM = 160 * 1024
# From this tile width the backward re-reads w per row instead of holding it in registers (RELOAD_W in
# rmsnorm_bwd.py: a register-resident w spills at 8K+ widths).
_RELOAD_W_MIN_BLOCK = 8192


@dataclass(frozen=True)
class NormCfg:
    rows: int  # rows per tile
    num_warps: int

    def __repr__(self) -> str:
        return f"{self.rows}r w{self.num_warps}"


def fwd_candidates(n: int) -> tuple[NormCfg, ...]:
    """Forward configs for width n, fallback first: the table's warps, then twice and half as many
    (the sm_90 compile report shows no spills for any of them at the model widths)."""
    _, rows, w, _ = _launch_config(n)
    return (NormCfg(rows, w), *(NormCfg(rows, c) for c in (2 * w, w // 2) if 2 <= c <= 32))


def bwd_candidates(n: int) -> tuple[NormCfg, ...]:
    """Backward configs for width n, fallback first: the table's warps, then twice as many for tiles of
    up to 4096 elements (fewer warps would spill, as x, dy and the dw accumulator are live per element;
    at 8192, 32 warps cap a thread at 64 registers and the fp32-stream variant spills)."""
    block_n, rows, _, w = _launch_config(n)
    more = (NormCfg(rows, 2 * w),) if rows * block_n <= 4096 and 2 * w <= 32 else ()
    return (NormCfg(rows, w), *more)


def _rows_bucket(m: int) -> int:
    return min(1 << 16, next_pow2(max(m, 1024)))


@functools.cache
def _launch_config(n: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, ROWS, fwd num_warps, bwd num_warps) for width n: the fallback table (what runs without
    tuning, and the first of `fwd_candidates` / `bwd_candidates`).

    - BLOCK_N: the row padded to a power of two (a whole row per tile; min 16 so a tile is never
      degenerate).
    - ROWS: wide rows (>= 4096) get one row per program, already 8-128 KB of traffic each; narrower
      rows are packed several per program so each program still moves ~4K elements, which amortises
      the per-program index math, weight load and rstd store.
    """
    block_n = max(16, next_pow2(n))
    rows = 1 if block_n >= 4096 else min(64, 4096 // block_n)
    tile = max(2048, rows * block_n)
    return block_n, rows, _FWD_WARPS[tile], _BWD_WARPS[tile]
