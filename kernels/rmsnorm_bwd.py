"""Triton backward kernels of RMSNorm and the fused residual-add RMSNorm, used by `rmsnorm.py`.

Per row, with xhat = x * rstd (rstd saved by the forward, fp32) and g = dy * w:

    dx = rstd * (g - xhat * mean(g * xhat))       (+ dh, the gradient reaching h directly, when fused)
    dw = sum over rows of dy * xhat

dw is deterministic without atomics: each program of `_rms_norm_bwd_kernel` owns a fixed contiguous range
of rows and writes one fp32 partial row; `_dw_sum_kernel` then reduces the partials column-wise in a
fixed order. Gradients are written to fresh tensors, never over dy or the saved inputs.
"""

import triton
import triton.language as tl


@triton.jit
def _rms_norm_bwd_kernel(
    DY, stride_dym, stride_dyn,
    X, stride_xm, stride_xn,
    DH, stride_dhm, stride_dhn,
    W, RSTD, DX, DR, DW_PART,
    M, N, tiles_per_prog,
    HAS_W: tl.constexpr, HAS_DH: tl.constexpr, HAS_DR: tl.constexpr, COMPUTE_DW: tl.constexpr,
    RELOAD_W: tl.constexpr,
    ROWS: tl.constexpr, BLOCK_N: tl.constexpr, NUM_STAGES: tl.constexpr,
):  # fmt: skip
    # Each program owns the rows [pid, pid + 1) * tiles_per_prog * ROWS and walks them a tile at a time
    # (rows past M masked), keeping its dw contribution in fp32 registers; it writes one partial row at
    # the end. The fixed row ownership and summation order make dw bit-reproducible without atomics.
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    col_mask = cols < N
    # Wide rows (RELOAD_W) re-read w each row from L1/L2 instead of pinning it in registers: with x,
    # dy and the dw accumulator already live, a register-resident w would spill at 8K+ widths.
    if HAS_W and not RELOAD_W:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
    dw_acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid.to(tl.int64) * tiles_per_prog * ROWS
    # NUM_STAGES = 2: the compiler prefetches the next tile's x, dy (and dh) into shared memory with
    # async copies while this tile is computed (sm_90 compile: no extra registers), so a program's
    # loads overlap its math instead of stalling at the top of every row.
    for t in tl.range(0, tiles_per_prog, num_stages=NUM_STAGES):
        rows = row_start + t * ROWS + tl.arange(0, ROWS)
        row_mask = rows < M
        mask = row_mask[:, None] & col_mask[None, :]
        x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0)
        dy = tl.load(DY + rows[:, None] * stride_dym + cols[None, :] * stride_dyn, mask=mask, other=0.0)
        rstd = tl.load(RSTD + rows, mask=row_mask, other=0.0)
        xhat = x.to(tl.float32) * rstd[:, None]
        dy = dy.to(tl.float32)
        if HAS_W:
            if RELOAD_W:
                w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
            g = dy * w[None, :]
        else:
            g = dy
        c = tl.sum(g * xhat, axis=1) / N
        dx = (g - xhat * c[:, None]) * rstd[:, None]
        if HAS_DH:
            dh = tl.load(DH + rows[:, None] * stride_dhm + cols[None, :] * stride_dhn, mask=mask, other=0.0)
            dx = dx + dh.to(tl.float32)
        tl.store(DX + rows[:, None] * N + cols[None, :], dx.to(DX.dtype.element_ty), mask=mask)
        if HAS_DR:  # fused residual with x and residual of two dtypes: each gets its own copy
            tl.store(DR + rows[:, None] * N + cols[None, :], dx.to(DR.dtype.element_ty), mask=mask)
        if COMPUTE_DW:
            dw_acc += tl.sum(dy * xhat, axis=0)
    if COMPUTE_DW:
        tl.store(DW_PART + pid.to(tl.int64) * N + cols, dw_acc, mask=col_mask)


@triton.jit
def _dw_sum_kernel(PART, DW, P, N, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    # Second stage of the weight gradient: each program sums one column block of the [P, N] fp32
    # partials in a fixed order and writes it in the weight's dtype (one launch instead of torch's sum
    # plus a cast; a [BLOCK_P, BLOCK_C] accumulator keeps several rows' loads in flight).
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    col_mask = cols < N
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for p0 in range(0, P, BLOCK_P):
        rows = p0 + tl.arange(0, BLOCK_P)
        mask = (rows < P)[:, None] & col_mask[None, :]
        acc += tl.load(PART + rows[:, None] * N + cols[None, :], mask=mask, other=0.0)
    tl.store(DW + cols, tl.sum(acc, axis=0).to(DW.dtype.element_ty), mask=col_mask)
