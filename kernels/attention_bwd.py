"""Triton backward kernels of fused attention (FlashAttention-2 algorithm), used by `attention.py`.

With P = softmax(scale * Q K^T) recomputed from the saved fp32 LSE (P_ij = exp(scale*q_i.k_j - lse_i)):

    delta_i = rowsum(dO_i * O_i) - dlse_i          (preprocess kernel; dlse only when LSE is used)
    dV_j = sum_i P_ij dO_i        dP_ij = dO_i . V_j        dS_ij = P_ij (dP_ij - delta_i)
    dK_j = scale * sum_i dS_ij Q_i                dQ_i = scale * sum_j dS_ij K_j

Two passes, so no atomics and bit-reproducible results:
- dK/dV: one program per (KV block, batch, KV head, group part). It loops over its share of the query
  heads of the GQA group and, for each, over the query blocks that see the KV block, accumulating dK and
  dV in fp32 registers. Summing the group's heads inside one program is what makes GQA atomic-free. When
  batch x KV heads x KV blocks is too few programs to fill the GPU (MQA at batch 1: 32 programs for 132
  SMs at 4096 keys), the group is split over SPLIT programs, each writing an fp32 partial dK/dV that the
  launcher sums in a fixed order (still deterministic).
- dQ: one program per (query block, batch, query head), looping over KV blocks like the forward.
Both split their loop into the diagonal blocks (causal mask applied) and the fully visible ones.

Fully masked query rows (lse = -inf, see attention_fwd.py) only ever meet keys in the masked (diagonal)
loops, where tl.where replaces their exp2(s + inf) = inf by 0 before it is used, so they get zero gradients
without a special case. Padding rows past seqlen_q read lse = +inf, hence P = 0.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def attn_bwd_preprocess_kernel(
    O,
    DO,
    DLSE,
    DELTA,
    stride_ob,
    stride_os,
    stride_oh,
    stride_od,
    stride_dob,
    stride_dos,
    stride_doh,
    stride_dod,
    H,
    SEQ_Q,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    HAS_DLSE: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask = (offs_m[:, None] < SEQ_Q) & (offs_d[None, :] < HEAD_DIM)
    o = tl.load(
        O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_os + offs_d[None, :] * stride_od,
        mask=mask,
        other=0.0,
    )
    do = tl.load(
        DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :] * stride_dod,
        mask=mask,
        other=0.0,
    )
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), axis=1)
    row = pid_bh.to(tl.int64) * SEQ_Q + offs_m
    if HAS_DLSE:
        # d lse_i / d s_ij = P_ij, so an upstream LSE gradient just shifts delta.
        delta -= tl.load(DLSE + row, mask=offs_m < SEQ_Q, other=0.0)
    tl.store(DELTA + row, delta, mask=offs_m < SEQ_Q)


@triton.jit
def _dkdv_inner(
    dk,
    dv,
    k,
    v,
    q_base,
    do_base,
    lse_base,
    delta_base,
    stride_qs,
    stride_qd,
    stride_dos,
    stride_dod,
    offs_n,
    offs_m,
    offs_d,
    lo,
    hi,
    SEQ_Q,
    diag,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_M: tl.constexpr,
    MASKED: tl.constexpr,
    PAD_D: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    # Works in the transposed orientation (rows = keys) so the big dimension of every dot is BLOCK_N.
    for start_m in range(lo, hi, BLOCK_M):
        rows = start_m + offs_m
        row_ok = rows < SEQ_Q
        if PAD_D:
            qT_mask = row_ok[None, :] & (offs_d[:, None] < HEAD_DIM)
            do_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
        else:
            qT_mask = row_ok[None, :]
            do_mask = row_ok[:, None]
        qT = tl.load(q_base + rows[None, :] * stride_qs + offs_d[:, None] * stride_qd, mask=qT_mask, other=0.0)
        do = tl.load(do_base + rows[:, None] * stride_dos + offs_d[None, :] * stride_dod, mask=do_mask, other=0.0)
        lse2 = tl.load(lse_base + rows, mask=row_ok, other=float("inf")) * LOG2E
        delta = tl.load(delta_base + rows, mask=row_ok, other=0.0)

        sT = tl.dot(k, qT, input_precision=DOT_PREC) * qk_scale
        pT = tl.exp2(sT - lse2[None, :])
        if MASKED:
            pT = tl.where(rows[None, :] + diag >= offs_n[:, None], pT, 0.0)
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PREC)
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(qT.dtype), tl.trans(qT), dk, input_precision=DOT_PREC)
    return dk, dv


@triton.jit
def attn_bwd_dkdv_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DK,
    DV,
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
    stride_dob,
    stride_dos,
    stride_doh,
    stride_dod,
    stride_dkb,
    stride_dks,
    stride_dkh,
    stride_dkd,
    stride_dvb,
    stride_dvs,
    stride_dvh,
    stride_dvd,
    stride_split,  # DK/DV stride between group parts (fp32 partial buffers when SPLIT > 1)
    H,
    HK,
    SEQ_Q,
    SEQ_K,
    GROUP,
    SPLIT,  # programs per (KV block, batch, KV head); each takes GROUP // SPLIT query heads
    sm_scale,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAD_D: tl.constexpr,  # BLOCK_D != HEAD_DIM: mask the padded head-dim lanes
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_1 = tl.program_id(1)
    pid_bhk = pid_1 // SPLIT
    part = pid_1 % SPLIT
    heads = GROUP // SPLIT
    off_b = (pid_bhk // HK).to(tl.int64)
    off_hk = (pid_bhk % HK).to(tl.int64)

    start_n = pid_n * BLOCK_N
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < SEQ_K
    if PAD_D:
        kv_mask = col_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    else:
        kv_mask = col_ok[:, None]
    k = tl.load(
        K + off_b * stride_kb + off_hk * stride_kh + offs_n[:, None] * stride_ks + offs_d[None, :] * stride_kd,
        mask=kv_mask,
        other=0.0,
    )
    v = tl.load(
        V + off_b * stride_vb + off_hk * stride_vh + offs_n[:, None] * stride_vs + offs_d[None, :] * stride_vd,
        mask=kv_mask,
        other=0.0,
    )
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)

    diag = SEQ_K - SEQ_Q
    q_end = tl.cdiv(SEQ_Q, BLOCK_M) * BLOCK_M
    if CAUSAL:
        # Query row i sees key j iff i >= j - diag. Rows below start_n - diag see none of this block;
        # rows from start_n + BLOCK_N - 1 - diag on see all of it; rows in between need the mask.
        lo = (tl.maximum(start_n - diag, 0) // BLOCK_M) * BLOCK_M
        lo = tl.minimum(lo, q_end)
        mid = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M
        mid = tl.minimum(tl.maximum(mid, lo), q_end)
    else:
        lo = 0
        mid = 0

    # This program's query heads of the KV head's group are summed here, in a fixed order: deterministic GQA.
    for g in range(heads):
        off_h = off_hk * GROUP + part * heads + g
        q_base = Q + off_b * stride_qb + off_h * stride_qh
        do_base = DO + off_b * stride_dob + off_h * stride_doh
        row_base = (off_b * H + off_h) * SEQ_Q
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base,
            stride_qs, stride_qd, stride_dos, stride_dod, offs_n, offs_m, offs_d,
            lo, mid, SEQ_Q, diag, qk_scale,
            HEAD_DIM, BLOCK_M, True, PAD_D, DOT_PREC,
        )  # fmt: skip
        dk, dv = _dkdv_inner(
            dk, dv, k, v, q_base, do_base, LSE + row_base, DELTA + row_base,
            stride_qs, stride_qd, stride_dos, stride_dod, offs_n, offs_m, offs_d,
            mid, q_end, SEQ_Q, diag, qk_scale,
            HEAD_DIM, BLOCK_M, False, PAD_D, DOT_PREC,
        )  # fmt: skip

    dk = dk * sm_scale
    part_off = part.to(tl.int64) * stride_split
    tl.store(
        DK
        + part_off
        + off_b * stride_dkb
        + off_hk * stride_dkh
        + offs_n[:, None] * stride_dks
        + offs_d[None, :] * stride_dkd,
        dk.to(DK.dtype.element_ty),
        mask=kv_mask,
    )
    tl.store(
        DV
        + part_off
        + off_b * stride_dvb
        + off_hk * stride_dvh
        + offs_n[:, None] * stride_dvs
        + offs_d[None, :] * stride_dvd,
        dv.to(DV.dtype.element_ty),
        mask=kv_mask,
    )


@triton.jit
def _dq_inner(
    dq,
    q,
    do,
    lse2,
    delta,
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
        vT_ptrs = v_base + cols[None, :] * stride_vs + offs_d[:, None] * stride_vd
        if MASKED:
            if PAD_D:
                kv_mask = (cols[None, :] < SEQ_K) & (offs_d[:, None] < HEAD_DIM)
            else:
                kv_mask = cols[None, :] < SEQ_K
            kT = tl.load(kT_ptrs, mask=kv_mask, other=0.0)
            vT = tl.load(vT_ptrs, mask=kv_mask, other=0.0)
        else:
            if PAD_D:
                kT = tl.load(kT_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
                vT = tl.load(vT_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
            else:
                kT = tl.load(kT_ptrs)
                vT = tl.load(vT_ptrs)
        s = tl.dot(q, kT, input_precision=DOT_PREC) * qk_scale
        p = tl.exp2(s - lse2[:, None])
        if MASKED:
            valid = cols[None, :] < SEQ_K
            if CAUSAL:
                valid = valid & (cols[None, :] <= offs_m[:, None] + diag)
            p = tl.where(valid, p, 0.0)
        dp = tl.dot(do, vT, input_precision=DOT_PREC)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(kT.dtype), tl.trans(kT), dq, input_precision=DOT_PREC)
    return dq


@triton.jit
def attn_bwd_dq_kernel(
    Q,
    K,
    V,
    DO,
    LSE,
    DELTA,
    DQ,
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
    stride_dob,
    stride_dos,
    stride_doh,
    stride_dod,
    stride_dqb,
    stride_dqs,
    stride_dqh,
    stride_dqd,
    H,
    SEQ_Q,
    SEQ_K,
    GROUP,
    sm_scale,
    qk_scale,
    HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr,
    PAD_D: tl.constexpr,  # BLOCK_D != HEAD_DIM: mask the padded head-dim lanes
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CAUSAL: tl.constexpr,
    DOT_PREC: tl.constexpr,
):
    pid_m = tl.num_programs(0) - 1 - tl.program_id(0)  # heaviest causal tiles first, as in the forward
    pid_bh = tl.program_id(1)
    off_b = (pid_bh // H).to(tl.int64)
    off_h = (pid_bh % H).to(tl.int64)
    off_hk = off_h // GROUP

    start_m = pid_m * BLOCK_M
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < SEQ_Q
    if PAD_D:
        io_mask = row_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    else:
        io_mask = row_ok[:, None]
    q = tl.load(
        Q + off_b * stride_qb + off_h * stride_qh + offs_m[:, None] * stride_qs + offs_d[None, :] * stride_qd,
        mask=io_mask,
        other=0.0,
    )
    do = tl.load(
        DO + off_b * stride_dob + off_h * stride_doh + offs_m[:, None] * stride_dos + offs_d[None, :] * stride_dod,
        mask=io_mask,
        other=0.0,
    )
    row = pid_bh.to(tl.int64) * SEQ_Q + offs_m
    lse2 = tl.load(LSE + row, mask=row_ok, other=float("inf")) * LOG2E
    delta = tl.load(DELTA + row, mask=row_ok, other=0.0)
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)

    k_base = K + off_b * stride_kb + off_hk * stride_kh
    v_base = V + off_b * stride_vb + off_hk * stride_vh
    diag = SEQ_K - SEQ_Q
    if CAUSAL:
        full_hi = tl.maximum(tl.minimum(SEQ_K, start_m + diag + 1), 0)
        full_hi = (full_hi // BLOCK_N) * BLOCK_N
        hi = tl.maximum(tl.minimum(SEQ_K, start_m + BLOCK_M + diag), 0)
    else:
        full_hi = (SEQ_K // BLOCK_N) * BLOCK_N
        hi = SEQ_K
    dq = _dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
        offs_m, offs_n, offs_d, 0, full_hi, SEQ_K, diag, qk_scale,
        HEAD_DIM, BLOCK_N, False, CAUSAL, PAD_D, DOT_PREC,
    )  # fmt: skip
    dq = _dq_inner(
        dq, q, do, lse2, delta, k_base, v_base, stride_ks, stride_kd, stride_vs, stride_vd,
        offs_m, offs_n, offs_d, full_hi, hi, SEQ_K, diag, qk_scale,
        HEAD_DIM, BLOCK_N, True, CAUSAL, PAD_D, DOT_PREC,
    )  # fmt: skip
    dq = dq * sm_scale
    tl.store(
        DQ + off_b * stride_dqb + off_h * stride_dqh + offs_m[:, None] * stride_dqs + offs_d[None, :] * stride_dqd,
        dq.to(DQ.dtype.element_ty),
        mask=io_mask,
    )
