"""Launch configurations of the attention kernels (attention_fwd.py, attention_bwd.py): per dtype class
and head-dim class a short list of tile candidates per kernel, which the launchers in attention.py time
on first use on CUDA (`_tune.pick`); and the envelope checks a launch needs (32-bit offsets, grid size).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ._common import next_pow2
from ._tune import length_bucket


# ----------------------------------------------------------------------------------------------------
# Launch configurations: per (fp32?, head_dim <= 64?) and kernel, a short list of candidates; on CUDA the
# fastest is chosen by timing on first use per (kernel, head_dim, dtype, causal, length bucket), see
# _tune.py (FASTGROW_TUNE=0: always the first, the fallback). NOT YET TIMED ON A GPU. The candidates are
# the tiles FlashAttention-2 and Triton's fused-attention tutorial use on A100/H100 and neighbours of
# them, kept only where an offline sm_90a compile (triton 3.6, the GPU machine's version; no GPU needed:
# tools/attention_sm90_report.py, its table in bench/results/attention-sm90-report.md) shows no register
# spills for bf16. Per thread, causal:
#   fwd  hd64  128x64 w4 s3: 231 regs, 64 KB smem   fwd  hd128 128x64 w8 s3: 174 regs, 128 KB smem
#   dKdV hd64  32x128 w8 s3: 255 regs, 56 KB        dKdV hd128 16x128 w8 s3: 245 regs, 88 KB (the former
#                                                    32x128 spilled 124 B: no 32-row tile fits without spills)
#   dQ   hd64  128x32 w8 s3: 114 regs, 56 KB        dQ   hd128 128x16 w8 s3: 120 regs, 88 KB (2 CTAs/SM;
#                                                    128x32 needs 140 registers: 1 CTA/SM)
# All main loops are software-pipelined (cp.async) and on Hopper wgmma in that compile.
# - forward: 128 query rows per program keep the tensor cores fed and halve K/V re-reads vs 64;
#   BLOCK_N 64 bounds the fp32 score tile (128x64) in registers; 3 stages multi-buffer K/V in shared
#   memory (hd 128: 128 KB of the 227 KB an sm_90 block may use).
# - dK/dV: 128 keys per program (dK, dV accumulators live across the whole query loop) and 16-32 query
#   rows per step, computed transposed (K Q^T) so every dot has 128 rows; dQ mirrors it (128 query rows,
#   16-32 keys per step). 8 warps so the two fp32 accumulators (dK, dV or dQ) fit in registers.
# - fp32 (the exact accuracy path, only with backend="triton"; auto sends fp32 CUDA inputs to SDPA):
#   half the blocks, one config, not tuned; it spills, which is why auto avoids it.
# - interpreter: small asymmetric tiles (BLOCK_M != BLOCK_N) so tiny CPU test shapes still cross several
#   blocks and exercise every masking path, while staying fast. Never tuned.
# ----------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class _Cfg:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int

    def __repr__(self) -> str:
        return f"{self.block_m}x{self.block_n}w{self.num_warps}s{self.num_stages}"


@dataclass(frozen=True)
class _Cands:
    fwd: tuple[_Cfg, ...]
    dkdv: tuple[_Cfg, ...]  # block_m: query rows per step, block_n: keys per program
    dq: tuple[_Cfg, ...]  # block_m: query rows per program, block_n: keys per step
    pre_block_m: int  # delta preprocess rows per program


def _c(*cfgs: tuple[int, int, int, int]) -> tuple[_Cfg, ...]:
    return tuple(_Cfg(*c) for c in cfgs)


_INTERPRET_CANDS = _Cands(_c((32, 16, 4, 1)), _c((16, 32, 4, 1)), _c((32, 16, 4, 1)), 32)
GPU_CANDIDATES = {
    # (fp32, head_dim <= 64): first of each tuple = fallback
    (False, True): _Cands(
        fwd=_c((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3), (64, 64, 4, 3)),
        dkdv=_c((32, 128, 8, 3), (32, 128, 8, 2), (16, 128, 8, 3)),
        dq=_c((128, 32, 8, 3), (64, 32, 4, 3), (128, 64, 8, 2), (64, 64, 4, 3)),
        pre_block_m=128,
    ),
    (False, False): _Cands(
        fwd=_c((128, 64, 8, 3), (128, 64, 8, 2), (128, 32, 8, 3), (64, 64, 4, 3)),
        dkdv=_c((16, 128, 8, 3), (16, 128, 8, 2)),
        dq=_c((128, 16, 8, 3), (128, 32, 8, 3), (64, 32, 8, 3)),
        pre_block_m=128,
    ),
    (True, True): _Cands(_c((64, 32, 4, 2)), _c((32, 64, 4, 2)), _c((64, 32, 4, 2)), 64),
    (True, False): _Cands(_c((64, 32, 8, 2)), _c((32, 64, 8, 2)), _c((64, 32, 8, 2)), 64),
}


def _candidates(head_dim: int, dtype: torch.dtype, device: torch.device) -> _Cands:
    if device.type != "cuda":
        return _INTERPRET_CANDS
    return GPU_CANDIDATES[(dtype == torch.float32, head_dim <= 64)]


def _tune_key(kernel: str, q: torch.Tensor, k: torch.Tensor, causal: bool) -> tuple:
    return ("attention", kernel, q.shape[3], q.dtype, causal, length_bucket(max(q.shape[1], k.shape[1])))


def _block_d(head_dim: int) -> int:
    return next_pow2(head_dim)


def _dot_precision(dtype: torch.dtype) -> str:
    # Only matters for fp32 operands (16-bit dots are exact products with fp32 accumulation).
    return "ieee" if dtype == torch.float32 else "tf32"


# Grid axis 1 is batch * heads (kv heads in the dK/dV pass); CUDA caps grid y at 65535.
_MAX_GRID_Y = 65535


def _offset_problem(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why int32 offsets inside one (batch, head) slice would overflow, or None if they do not.

    Inputs are read with their own strides; the output and dQ are written (b, sq, h, d)-contiguous and
    dK/dV (b, sk, hk, d)-contiguous (or as fp32 partials of that layout)."""
    for t in (q, k, v):
        if t.shape[1] > 0 and (t.shape[1] - 1) * abs(t.stride(1)) + t.shape[3] * abs(t.stride(3)) >= 2**31:
            return (
                f"one (batch, head) slice spans >= 2**31 elements (seq {t.shape[1]}, seq stride "
                f"{t.stride(1)}): outside the Triton attention envelope"
            )
    _, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    if sq > 0 and (sq - 1) * h * d + d >= 2**31:
        return f"seq {sq} x heads {h} x head_dim {d} spans >= 2**31 elements per batch"
    if sk > 0 and (sk - 1) * hk * d + d >= 2**31:
        return f"kv seq {sk} x kv heads {hk} x head_dim {d} spans >= 2**31 elements per batch (dK/dV)"
    return None
