"""Exact attention in the flash-attn layout (batch, seq, heads, head_dim), causal or not, with GQA/MQA.

    out = softmax(scale * Q K^T + mask) V,   scale = softmax_scale or 1/sqrt(head_dim)

`attention(q, k, v, causal=True, softmax_scale=None, *, backend="auto", return_lse=False)` is a drop-in
for `flash_attn_func(q, k, v, softmax_scale=..., causal=...)`:
- q: (b, sq, h, d); k, v: (b, sk, hk, d) with hk dividing h (query head i uses KV head i // (h // hk),
  the `repeat_interleave` convention of flash-attn and SDPA's enable_gqa). Any strides (e.g. views of a
  packed QKV projection): the Triton path reads them in place, no copies.
- causal with sq != sk is aligned to the bottom-right like flash-attn: query i sees key j iff
  j <= i + sk - sq. Query rows that see no key (sq > sk) output 0 with lse = -inf and get zero
  gradients (flash-attn convention; torch's SDPA would produce NaN there, our sdpa backend returns 0 too).
- returns out (q.dtype), or (out, lse) with lse fp32 (b, h, sq), the natural-log sum of exp of the
  scaled scores. The LSE is differentiable on the triton and ref backends.

Backends: "triton" (the fused kernels of attention_fwd.py / attention_bwd.py with the tile tables of
attention_configs.py, FlashAttention-2 algorithm, deterministic backward without atomics), "sdpa" (torch scaled_dot_product_attention), "flash_attn"
(flash_attn_func, imported lazily), "ref" (`attention_ref`, fp32 torch, materialises S x S), "auto"
(triton where `use_triton(q)`, i.e. CUDA or CPU under TRITON_INTERPRET=1, and the input is inside the
Triton envelope below; otherwise sdpa, e.g. bfloat16 on CPU, which the interpreter cannot do, and fp32 on
CUDA, whose exact-fp32 Triton tiles spill registers).

Triton envelope: head_dim 16, 32, 64, 96, 128 (96 runs in a 128-wide tile masked on d); fp16 and bf16 on GPU,
fp32 everywhere (GPU dots in exact fp32, "ieee", since fp32 is the accuracy path); any sequence length >= 1.
Within one (batch, head) slice, offsets are 32-bit (seq * stride_seq < 2**31); batch/head offsets are 64-bit.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import (
    cdiv,
    check_float,
    check_same_device,
    device_guard,
    interpreter_enabled,
    persistent_programs,
    use_triton,
)
from ._tune import pick
from .attention_bwd import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel, attn_bwd_preprocess_kernel
from .attention_configs import (
    _MAX_GRID_Y,
    _block_d,
    _candidates,
    _Cfg,
    _dot_precision,
    _offset_problem,
    _tune_key,
)
from .attention_fwd import attn_fwd_kernel

BACKENDS = ("auto", "triton", "sdpa", "flash_attn", "ref")
TRITON_HEAD_DIMS = (16, 32, 64, 96, 128)
_LOG2E = 1.4426950408889634


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------
def _launch_fwd(cfg: _Cfg, q, k, v, causal: bool, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    out = torch.empty((b, sq, h, d), dtype=q.dtype, device=q.device)
    lse = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
    grid = (cdiv(sq, cfg.block_m), b * h)
    attn_fwd_kernel[grid](
        q, k, v, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        h, sq, sk, h // hk, scale * _LOG2E,
        HEAD_DIM=d, BLOCK_D=_block_d(d), PAD_D=_block_d(d) != d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        CAUSAL=causal, DOT_PREC=_dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out, lse


def _fwd(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    cands = _candidates(q.shape[3], q.dtype, q.device).fwd
    cfg = pick(_tune_key("fwd", q, k, causal), cands, lambda c: _launch_fwd(c, q, k, v, causal, scale), q.device)
    return _launch_fwd(cfg, q, k, v, causal, scale)


def gqa_split(batch: int, kv_heads: int, group: int, kv_blocks: int, device: torch.device) -> int:
    """Programs per (KV block, batch, KV head) in the dK/dV pass: 1 when batch x KV heads x KV blocks
    already fills the SMs; else the smallest divisor of the GQA group that does (or the whole group),
    each program then summing group / split query heads into an fp32 partial."""
    programs, sms = kv_blocks * batch * kv_heads, persistent_programs(device)
    if group == 1 or programs >= sms:
        return 1
    for split in range(2, group + 1):
        if group % split == 0 and programs * split >= sms:
            return split
    return group


def _launch_dkdv(cfg: _Cfg, q, k, v, do, lse, delta, causal: bool, scale: float):
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    block_d = _block_d(d)
    split = gqa_split(b, hk, h // hk, cdiv(sk, cfg.block_n), q.device)
    if split == 1:
        dk = torch.empty((b, sk, hk, d), dtype=k.dtype, device=k.device)
        dv = torch.empty((b, sk, hk, d), dtype=v.dtype, device=v.device)
        dk_out, dv_out, stride_split = dk, dv, 0
    else:  # fp32 partials, one per group part, summed below in a fixed order
        dk_out = torch.empty((split, b, sk, hk, d), dtype=torch.float32, device=k.device)
        dv_out = torch.empty_like(dk_out)
        stride_split = dk_out.stride(0)
    dk_s, dv_s = (dk_out, dv_out) if split == 1 else (dk_out[0], dv_out[0])
    attn_bwd_dkdv_kernel[(cdiv(sk, cfg.block_n), b * hk * split)](
        q, k, v, do, lse, delta, dk_out, dv_out,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk_s.stride(), *dv_s.stride(), stride_split,
        h, hk, sq, sk, h // hk, split, scale, scale * _LOG2E,
        HEAD_DIM=d, BLOCK_D=block_d, PAD_D=block_d != d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal,
        DOT_PREC=_dot_precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    if split == 1:
        return dk_out, dv_out
    return dk_out.sum(0).to(k.dtype), dv_out.sum(0).to(v.dtype)


def _launch_dq(cfg: _Cfg, q, k, v, do, lse, delta, causal: bool, scale: float) -> torch.Tensor:
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    block_d = _block_d(d)
    dq = torch.empty((b, sq, h, d), dtype=q.dtype, device=q.device)
    attn_bwd_dq_kernel[(cdiv(sq, cfg.block_m), b * h)](
        q, k, v, do, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        h, sq, sk, h // hk, scale, scale * _LOG2E,
        HEAD_DIM=d, BLOCK_D=block_d, PAD_D=block_d != d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal,
        DOT_PREC=_dot_precision(q.dtype), num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return dq


def _bwd(
    do: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, sq, h, d = q.shape
    cands = _candidates(d, q.dtype, q.device)

    delta = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
    attn_bwd_preprocess_kernel[(cdiv(sq, cands.pre_block_m), b * h)](
        out, do, dlse if dlse is not None else delta, delta,
        *out.stride(), *do.stride(), h, sq,
        HEAD_DIM=d, BLOCK_D=_block_d(d), BLOCK_M=cands.pre_block_m, HAS_DLSE=dlse is not None,
    )  # fmt: skip

    args = (q, k, v, do, lse, delta, causal, scale)
    c = pick(_tune_key("dkdv", q, k, causal), cands.dkdv, lambda c: _launch_dkdv(c, *args), q.device)
    dk, dv = _launch_dkdv(c, *args)
    c = pick(_tune_key("dq", q, k, causal), cands.dq, lambda c: _launch_dq(c, *args), q.device)
    return _launch_dq(c, *args), dk, dv


# Under torch.compile the launchers run as torch custom ops, so the compiler sees one opaque op with a
# known output shape (the fake implementations) instead of tracing into Triton launch code, which would
# break the graph at every attention call. Eager calls skip the op dispatch (~30 us a call measured on
# CPU, comparable to a short attention kernel) and call the launchers directly.
@torch.library.custom_op("fastgrow::attention_fwd", mutates_args=())
def _fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool, scale: float
) -> tuple[torch.Tensor, torch.Tensor]:
    with device_guard(q):
        return _fwd(q, k, v, causal, scale)


@_fwd_op.register_fake
def _fwd_fake(q, k, v, causal, scale):
    b, sq, h, d = q.shape
    return q.new_empty((b, sq, h, d)), q.new_empty((b, h, sq), dtype=torch.float32)


@torch.library.custom_op("fastgrow::attention_bwd", mutates_args=())
def _bwd_op(
    do: torch.Tensor,
    dlse: torch.Tensor | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    causal: bool,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    with device_guard(q):
        return _bwd(do, dlse, q, k, v, out, lse, causal, scale)


@_bwd_op.register_fake
def _bwd_fake(do, dlse, q, k, v, out, lse, causal, scale):
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
    )


class _TritonAttention(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, causal: bool, scale: float):
        if torch.compiler.is_compiling():
            out, lse = _fwd_op(q, k, v, causal, scale)
        else:
            with device_guard(q):
                out, lse = _fwd(q, k, v, causal, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.causal = causal
        ctx.scale = scale
        # Unused outputs then arrive as None: no zero-filled dO/dLSE tensors, no wasted preprocess work.
        ctx.set_materialize_grads(False)
        return out, lse

    @staticmethod
    def backward(ctx, do, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        if do is None:
            do = torch.zeros_like(out)
        elif do.shape[1] > 0 and (do.shape[1] - 1) * abs(do.stride(1)) + do.shape[3] * abs(do.stride(3)) >= 2**31:
            do = do.contiguous()  # a layout whose int32 offsets would overflow (e.g. a permuted view)
        if dlse is not None:
            dlse = dlse.float().contiguous()
        if torch.compiler.is_compiling():
            dq, dk, dv = _bwd_op(do, dlse, q, k, v, out, lse, ctx.causal, ctx.scale)
        else:
            with device_guard(q):
                dq, dk, dv = _bwd(do, dlse, q, k, v, out, lse, ctx.causal, ctx.scale)
        return dq, dk, dv, None, None


# ----------------------------------------------------------------------------------------------------
# Other backends and the reference
# ----------------------------------------------------------------------------------------------------
def _visible_mask(sq: int, sk: int, causal: bool, device: torch.device) -> torch.Tensor:
    """(sq, sk) bool: query i may attend key j (bottom-right aligned when causal)."""
    mask = torch.ones(sq, sk, dtype=torch.bool, device=device)
    return mask.tril(sk - sq) if causal else mask


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    *,
    return_lse: bool = False,
    compute_dtype: torch.dtype = torch.float32,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Reference in `compute_dtype` torch (fp32 by default; tests use fp64). Materialises S x S.

    Same semantics as `attention`: GQA by repeat_interleave, bottom-right causal alignment, rows that see
    no key give 0 (lse -inf). Returns q.dtype (and lse in fp32 when asked).
    """
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    qf, kf, vf = (t.to(compute_dtype).transpose(1, 2) for t in (q, k, v))
    if hk != h:
        kf = kf.repeat_interleave(h // hk, dim=1)
        vf = vf.repeat_interleave(h // hk, dim=1)
    scores = (qf @ kf.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~_visible_mask(sq, sk, causal, q.device), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)  # (b, h, sq); -inf for rows that see nothing
    # exp(s - lse) with lse replaced by +inf on empty rows gives 0 there instead of NaN.
    probs = torch.exp(scores - torch.where(torch.isinf(lse), float("inf"), lse).unsqueeze(-1))
    out = (probs @ vf).transpose(1, 2).to(q.dtype)
    if return_lse:
        return out, lse.float()
    return out


def _sdpa(q, k, v, causal: bool, scale: float | None) -> torch.Tensor:
    sq, h = q.shape[1], q.shape[2]
    sk, hk = k.shape[1], k.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if not causal or sq == sk:
        out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=scale, enable_gqa=(h != hk))
        return out.transpose(1, 2)
    # SDPA's is_causal is top-left aligned: build the bottom-right mask ourselves. Rows that see nothing
    # are let see everything (no NaN in fwd or bwd) and then zeroed, matching the other backends.
    mask = _visible_mask(sq, sk, True, q.device)
    row_ok = mask.any(dim=1)
    mask = mask | ~row_ok[:, None]
    out = F.scaled_dot_product_attention(qt, kt, vt, attn_mask=mask, scale=scale, enable_gqa=(h != hk))
    return (out * row_ok[:, None].to(out.dtype)).transpose(1, 2)


def _flash_attn(q, k, v, causal: bool, scale: float | None, return_lse: bool):
    if not q.is_cuda or q.dtype == torch.float32:
        raise ValueError(f"backend='flash_attn' needs CUDA fp16/bf16 tensors, got {q.device} {q.dtype}")
    try:
        from flash_attn import flash_attn_func
    except ImportError as e:
        raise ValueError("backend='flash_attn' needs the flash-attn package (pip install flash-attn)") from e
    if return_lse:
        out, lse, _ = flash_attn_func(q, k, v, softmax_scale=scale, causal=causal, return_attn_probs=True)
        return out, lse
    return flash_attn_func(q, k, v, softmax_scale=scale, causal=causal)


# ----------------------------------------------------------------------------------------------------
# Functional entry point
# ----------------------------------------------------------------------------------------------------
def _validate(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, softmax_scale) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be (batch, seq, heads, head_dim), got shape {tuple(t.shape)}")
    check_same_device(q=q, k=k, v=v)
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"q and k must have the same batch size, got {q.shape[0]} and {k.shape[0]}")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"q and k/v must have the same head_dim, got {q.shape[3]} and {k.shape[3]}")
    if k.shape[2] == 0 or q.shape[2] % k.shape[2]:
        raise ValueError(f"kv heads ({k.shape[2]}) must divide query heads ({q.shape[2]})")
    if softmax_scale is not None and not (isinstance(softmax_scale, (int, float)) and math.isfinite(softmax_scale)):
        raise ValueError(f"softmax_scale must be a finite float or None, got {softmax_scale!r}")


def auto_backend(device_type: str, dtype: torch.dtype, head_dim: int, batch_heads: int, triton_ok: bool) -> str:
    """What backend="auto" runs: "triton" inside the Triton envelope where Triton runs (`triton_ok`:
    CUDA, or CPU under the interpreter), else "sdpa".

    Outside the envelope: other head dims, bf16 in the interpreter (its bf16 tl.dot is wrong), more
    (batch, head) pairs than grid axis 1 takes, and fp32 on CUDA: the exact-fp32 ("ieee") tiles spill
    registers on sm_90 (~30 KB of spill stores in the hd64 causal dK/dV pass), while SDPA runs fp32 on
    its own kernels (TF32 where the user enabled it). backend="triton" still runs fp32, as the accuracy path.
    """
    cpu_bf16 = device_type == "cpu" and dtype == torch.bfloat16
    cuda_fp32 = device_type == "cuda" and dtype == torch.float32
    fits = head_dim in TRITON_HEAD_DIMS and not (cpu_bf16 or cuda_fp32) and batch_heads <= _MAX_GRID_Y
    return "triton" if triton_ok and fits else "sdpa"


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    *,
    backend: str = "auto",
    return_lse: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Attention over (batch, seq, heads, head_dim) tensors; see the module docstring."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _validate(q, k, v, softmax_scale)
    b, sq, h, d = q.shape
    sk = k.shape[1]
    checked = False  # whether the triton-only checks below already hold (auto made them)
    if backend == "auto":
        backend = auto_backend(q.device.type, q.dtype, d, b * h, use_triton(q))
        if backend == "triton" and _offset_problem(q, k, v):
            backend = "sdpa"
        checked = True

    if b == 0 or sq == 0 or h == 0 or d == 0:
        out = q.clone()  # empty, but still part of the autograd graph
        lse = torch.empty((b, h, sq), dtype=torch.float32, device=q.device)
        return (out, lse) if return_lse else out
    if sk == 0:
        raise ValueError("k and v have sequence length 0 while q does not: nothing to attend to")

    if backend == "ref":
        return attention_ref(q, k, v, causal, softmax_scale, return_lse=return_lse)
    if backend == "flash_attn":
        return _flash_attn(q, k, v, causal, softmax_scale, return_lse)
    if backend == "sdpa":
        if return_lse:
            raise ValueError("return_lse=True is not available with backend='sdpa' (use triton, flash_attn or ref)")
        return _sdpa(q, k, v, causal, softmax_scale)

    # backend == "triton"
    if not checked:
        _check_triton(q, k, v)
    scale = float(softmax_scale) if softmax_scale is not None else 1.0 / math.sqrt(d)
    out, lse = _TritonAttention.apply(q, k, v, bool(causal), scale)
    return (out, lse) if return_lse else out


def _check_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> None:
    """What backend="triton" needs, as one clear error each (backend="auto" only picks triton when all hold)."""
    b, _, h, d = q.shape
    use_triton(q, "triton")  # raises a clear error for CPU tensors without TRITON_INTERPRET=1
    if d not in TRITON_HEAD_DIMS:
        raise ValueError(f"triton attention supports head_dim in {TRITON_HEAD_DIMS}, got {d}")
    if q.device.type == "cpu" and q.dtype == torch.bfloat16 and interpreter_enabled():
        raise ValueError(
            "bfloat16 attention cannot run in the Triton interpreter (its bf16 tl.dot is wrong): "
            "use float16/float32 or backend='sdpa'"
        )
    if b * h > _MAX_GRID_Y:
        raise ValueError(
            f"batch * heads = {b * h} exceeds {_MAX_GRID_Y}, the CUDA grid-y limit the Triton attention launches "
            "with: use backend='sdpa' (what backend='auto' does) or split the batch"
        )
    problem = _offset_problem(q, k, v)
    if problem:
        raise ValueError(f"{problem}: use backend='sdpa' (what backend='auto' does)")
