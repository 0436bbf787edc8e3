"""Causal/non-causal attention in the flash-attn layout (batch, seq, heads, head_dim), with GQA.

Placeholder: reference and SDPA paths only; the Triton kernel lands with its own issue behind this API.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ._common import check_float

BACKENDS = ("auto", "triton", "sdpa", "flash_attn", "ref")


def attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool = True, softmax_scale: float | None = None
) -> torch.Tensor:
    """fp32 torch reference (materialises S x S; tests only). Returns q.dtype."""
    b, s, h, d = q.shape
    hk = k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(d)
    qf, kf, vf = (t.float().transpose(1, 2) for t in (q, k, v))
    if hk != h:
        kf = kf.repeat_interleave(h // hk, dim=1)
        vf = vf.repeat_interleave(h // hk, dim=1)
    scores = (qf @ kf.transpose(-1, -2)) * scale
    if causal:
        sk = k.shape[1]
        mask = torch.ones(s, sk, dtype=torch.bool, device=q.device).tril(sk - s)
        scores = scores.masked_fill(~mask, float("-inf"))
    out = torch.softmax(scores, dim=-1) @ vf
    return out.transpose(1, 2).to(q.dtype)


def _sdpa(q, k, v, causal, softmax_scale):
    h, hk = q.shape[2], k.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    out = F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal, scale=softmax_scale, enable_gqa=(h != hk))
    return out.transpose(1, 2)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    softmax_scale: float | None = None,
    *,
    backend: str = "auto",
) -> torch.Tensor:
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_float(name, t)
        if t.dim() != 4:
            raise ValueError(f"{name} must be (batch, seq, heads, head_dim), got shape {tuple(t.shape)}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"kv heads ({k.shape[2]}) must divide query heads ({q.shape[2]})")
    if backend == "ref":
        return attention_ref(q, k, v, causal, softmax_scale)
    return _sdpa(q, k, v, causal, softmax_scale)
