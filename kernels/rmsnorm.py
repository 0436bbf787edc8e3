"""RMSNorm: y = x / sqrt(mean(x^2) + eps) * weight, statistics in fp32.

Placeholder: the reference path only; the Triton kernels land with their own issue behind the same API.
"""

from __future__ import annotations

import torch
from torch import nn

from ._common import check_float, check_same_device


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6) -> torch.Tensor:
    """fp32 torch reference; returns x.dtype."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(x.dtype)


def add_rms_norm_ref(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6
) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual (in x.dtype), y = rms_norm(h); returns (h, y)."""
    h = x + residual
    return h, rms_norm_ref(h, weight, eps)


def rms_norm(x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6, *, impl: str = "auto") -> torch.Tensor:
    check_float("x", x)
    if weight is not None:
        check_float("weight", weight)
        check_same_device(x=x, weight=weight)
        if weight.shape != x.shape[-1:]:
            raise ValueError(f"weight shape {tuple(weight.shape)} must be ({x.shape[-1]},)")
    return rms_norm_ref(x, weight, eps)


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-6,
    *,
    impl: str = "auto",
) -> tuple[torch.Tensor, torch.Tensor]:
    if x.shape != residual.shape:
        raise ValueError(f"x {tuple(x.shape)} and residual {tuple(residual.shape)} must have one shape")
    h = x + residual
    return h, rms_norm(h, weight, eps, impl=impl)


class RMSNorm(nn.Module):
    """Drop-in for torch.nn.RMSNorm (same state_dict: `weight`)."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps)
