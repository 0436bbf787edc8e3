"""SwiGLU: silu(gate) * up, from two tensors or one packed [..., 2F] tensor (gate first, then up).

Placeholder: the reference path only; the Triton kernels land with their own issue behind the same API.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ._common import check_float


def swiglu_ref(gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
    """fp32 torch reference; `up=None` means `gate` is packed [..., 2F]. Returns the input dtype."""
    if up is None:
        gate, up = gate.chunk(2, dim=-1)
    return (F.silu(gate.float()) * up.float()).to(gate.dtype)


def swiglu(gate: torch.Tensor, up: torch.Tensor | None = None, *, impl: str = "auto") -> torch.Tensor:
    check_float("gate", gate)
    if up is None:
        if gate.shape[-1] % 2:
            raise ValueError(f"packed SwiGLU input needs an even last dim, got {gate.shape[-1]}")
    else:
        check_float("up", up)
        if gate.shape != up.shape:
            raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")
    return swiglu_ref(gate, up)


class SwiGLU(nn.Module):
    """Stateless module form of `swiglu` (packed input when called with one tensor)."""

    def forward(self, gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
        return swiglu(gate, up)
