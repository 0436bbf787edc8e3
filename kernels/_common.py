"""Helpers shared by the kernel files: implementation choice and input validation."""

from __future__ import annotations

import os

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def interpreter_enabled() -> bool:
    """True when Triton runs kernels on the CPU through its interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(x: torch.Tensor, impl: str = "auto") -> bool:
    """Decide whether an op runs its Triton kernel for tensor `x`.

    auto: CUDA tensors always; CPU tensors only under the Triton interpreter. "triton" forces it (a
    CPU tensor without the interpreter is an error), "ref" forces the torch reference.
    """
    if impl == "ref":
        return False
    if impl == "auto":
        return x.is_cuda or (x.device.type == "cpu" and interpreter_enabled())
    if impl == "triton":
        if not (x.is_cuda or interpreter_enabled()):
            raise ValueError("impl='triton' needs a CUDA tensor, or TRITON_INTERPRET=1 for CPU tensors")
        return True
    raise ValueError(f"impl must be 'auto', 'triton' or 'ref', got {impl!r}")


def check_float(name: str, t: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float32, float16 or bfloat16, got {t.dtype}")


def check_same_device(**tensors: torch.Tensor) -> None:
    devices = {name: t.device for name, t in tensors.items()}
    if len(set(devices.values())) > 1:
        raise ValueError(f"tensors must be on one device, got {devices}")
