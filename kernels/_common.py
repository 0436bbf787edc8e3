"""Helpers shared by the kernel files: implementation choice and input validation."""

from __future__ import annotations

import contextlib
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


def check_weight_dtype(name: str, weight: torch.Tensor, x_dtype: torch.dtype) -> None:
    """A weight must have the activation dtype or be fp32 (master weights kept in fp32)."""
    check_float(name, weight)
    if weight.dtype not in (x_dtype, torch.float32):
        raise ValueError(f"{name} must be {x_dtype} (like the input) or float32, got {weight.dtype}")


def autocast_dtype(x: torch.Tensor, out_dtype: torch.dtype | None) -> torch.dtype | None:
    """The output dtype an op should produce: `out_dtype` if given, else the autocast dtype when autocast is
    on for x's device (the next op is a matmul that would cast to it anyway), else None (the input's)."""
    if out_dtype is not None:
        return out_dtype
    if torch.is_autocast_enabled(x.device.type):
        return torch.get_autocast_dtype(x.device.type)
    return None


def cdiv(a: int, b: int) -> int:
    """Ceil division on Python ints (triton.cdiv goes through Triton's JIT-function call path, ~5 us)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    return 1 if n <= 1 else 1 << (n - 1).bit_length()


def as_rows(t: torch.Tensor) -> torch.Tensor:
    """View `t` as 2-D [rows, last_dim] for a kernel that takes row/column strides.

    `reshape` returns a view whenever the leading dims collapse into one stride (contiguous tensors,
    slices of the last dim such as the halves of a packed gate/up output, strided row selections) and
    copies only when they cannot (e.g. a transposed batch/sequence), which a single row stride cannot
    describe. A column stride other than 1 is copied to unit stride too: such loads are uncoalesced
    (one 32-byte sector per element), and `col * stride` in int32 can overflow 2^31 on large tensors
    (e.g. the transpose of a [4096, 2^20] tensor).
    """
    t2 = t.reshape(-1, t.shape[-1]) if t.dim() != 2 else t
    return t2 if t2.stride(1) == 1 or t2.shape[1] <= 1 else t2.contiguous()


_SM_COUNT: dict[int, int] = {}


def persistent_programs(device: torch.device) -> int:
    """How many programs a persistent (grid-stride) kernel launches per "wave".

    CUDA: the SM count of the device (cached; the query costs microseconds). CPU interpreter: a fixed
    small number, so the partial-sum layout, and with it every result, is the same run to run.
    """
    if device.type != "cuda":
        return 4
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


def device_guard(t: torch.Tensor):
    """Make `t`'s GPU the current one while launching (Triton launches on the current device)."""
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()
