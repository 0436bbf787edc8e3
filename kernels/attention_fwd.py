"""Triton forward kernel of fused attention (FlashAttention-2 algorithm), used by `attention.py`.

Layout (batch, seq, heads, head_dim) with arbitrary strides. One program owns BLOCK_M query rows of
one (batch, query head) and streams the K/V blocks of its KV head (head // GROUP, so GQA/MQA read the
shared K/V without materialising repeats), keeping the online-softmax state in fp32:

    s = (q . k) * scale * log2(e)          (exp2 is cheaper than exp; log2(e) is folded into the scale)
    m' = max(m, rowmax(s));  p = exp2(s - m');  l' = l * exp2(m - m') + rowsum(p)
    acc' = acc * exp2(m - m') + p @ v
    out = acc / l,   lse = (m + log2(l)) * ln(2)   (natural-log LSE, saved in fp32 for the backward)

Causal masking is aligned to the bottom-right like flash-attn: query row i sees key j iff
j <= i + (seqlen_k - seqlen_q). The key loop is split in two: blocks that every row of the tile sees
entirely (no mask arithmetic at all), then the few diagonal/tail blocks that need a mask. A row that sees
no key at all (causal with seqlen_q > seqlen_k) gets out = 0 and lse = -inf; the backward gives it zero
gradients.
"""

from __future__ import annotations

import triton
import triton.language as tl

# m starts at a large finite negative number instead of -inf so that a row whose keys in one block are
# all masked computes exp2(-inf - m) = 0 and exp2(m - m) = 1 instead of NaN (-inf - -inf).
NEG_BIG = tl.constexpr(-1.0e30)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _fwd_inner(
    acc,
    m_i,
    l_i,
    q,
    k_base,
    v_base,
    stride_ks,
    stride_kd,
    stride_vs,
    stride_vd,
    offs_m,
    offs_n,
    offs_d,
    lo,
    hi,
    SEQ_K,
    diag,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_N: tl.constexpr,
    MASKED: tl.constexpr,
    CAUSAL: tl.constexpr,
    PAD_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    for start_n in range(lo, hi, BLOCK_N):
        cols = start_n + offs_n
        kT_ptrs = k_base + cols[None, :] * stride_ks + offs_d[:, None] * stride_kd
        v_ptrs = v_base + cols[:, None] * stride_vs + offs_d[None, :] * stride_vd
        # Loads need a mask only on the tail key block (MASKED) or when head_dim is padded (96 -> 128).
        if MASKED:
            if PAD_D:
                kT = tl.load(kT_ptrs, mask=(cols[None, :] < SEQ_K) & (offs_d[:, None] < HEAD_DIM), other=0.0)
                v = tl.load(v_ptrs, mask=(cols[:, None] < SEQ_K) & (offs_d[None, :] < HEAD_DIM), other=0.0)
            else:
                kT = tl.load(kT_ptrs, mask=cols[None, :] < SEQ_K, other=0.0)
                v = tl.load(v_ptrs, mask=cols[:, None] < SEQ_K, other=0.0)
        else:
            if PAD_D:
                kT = tl.load(kT_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
                v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
            else:
                kT = tl.load(kT_ptrs)
                v = tl.load(v_ptrs)
        s = tl.dot(q, kT, input_precision=DOT_PREC) * qk_scale
        if MASKED:
            valid = cols[None, :] < SEQ_K
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None] + diag)
            s = tl.where(valid, s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        p = tl.exp2(s - m_new[:, None])
        alpha = tl.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PREC)
        m_i = m_new
    return acc, m_i, l_i


@triton.jit
def attn_fwd_kernel(
    Q,
    K,
    V,
    O,
    LSE,
    stride_qb,
    stride_qs,
    stride_qh,
    stride_qd,
    stride_kb,
    stride_ks,
    stride_kh,
    stride_kd,
    stride_vb,
    stride_vs,
    stride_vh,
    stride_vd,
    stride_ob,
    stride_os,
    stride_oh,
    stride_od,
    H,
    SEQ_Q,
    SEQ_K,
    GROUP,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAD_D: tl.constexpr,  # BLOCK_D != HEAD_DIM: mask the padded head-dim lanes
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # Causal query tiles near the end of the sequence do the most work: launch them first so the
    # cheap tiles fill the tail of the grid.
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    off_hk = off_h // GROUP

    q_base = Q + off_b * stride_qb + off_h * stride_qh
    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    o_base = O + off_b * stride_ob + off_h * stride_oh

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < SEQ_Q
    if PAD_D:
        io_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    else:
        io_mask = row_ok[:, None]
    q = tl.load(q_base + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd, mask=io_mask, other=0.0)

    m_i = tl.full([BLOCK_M], NEG_BIG, dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    diag = SEQ_K - SEQ_Q  # bottom-right causal alignment
    if CAUSAL:
        # Keys j <= start_m + diag are visible to every row of the tile: whole blocks below that are
        # unmasked; blocks up to the last row's limit (start_m + BLOCK_M - 1 + diag) need the mask.
        full_hi = tl.maximum(tl.minimum(SEQ_K, start_m + diag + 1), 0)
        full_hi = (full_hi // BLOCK_N) * BLOCK_N
        hi = tl.maximum(tl.minimum(SEQ_K, start_m + BLOCK_M + diag), 0)
    else:
        full_hi = (SEQ_K // BLOCK_N) * BLOCK_N
        hi = SEQ_K

    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, offs_m, offs_n, offs_d,
        0, full_hi, SEQ_K, diag, qk_scale,
        HEAD_DIM, BLOCK_N, False, CAUSAL, PAD_D, DOT_PREC,
    )  # fmt: skip
    acc, m_i, l_i = _fwd_inner(
        acc, m_i, l_i, q, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd, offs_m, offs_n, offs_d,
        full_hi, hi, SEQ_K, diag, qk_scale,
        HEAD_DIM, BLOCK_N, True, CAUSAL, PAD_D, DOT_PREC,
    )  # fmt: skip

    # Rows that saw no key (l == 0) output 0 and lse = -inf instead of 0/0.
    empty = l_i == 0.0
    l_safe = tl.where(empty, 1.0, l_i)
    out = acc / l_safe[:, None]
    lse = tl.where(empty, float("-inf"), (m_i + tl.log2(l_safe)) * LN2)
    tl.store(
        o_base + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
        out.to(O.dtype.element_ty),
        mask=io_mask,
    )
    tl.store(LSE + pid_bh.to(tl.int64) * SEQ_Q + offs_m, lse, mask=row_ok)
