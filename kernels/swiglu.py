"""SwiGLU: out = silu(gate) * up, forward and backward Triton kernels, from two tensors or one packed one.

Math (elementwise, in fp32 registers whatever the storage dtype; s = sigmoid(gate)):

    out    = gate * s * up
    d_up   = d_out * gate * s
    d_gate = d_out * up * s * (1 + gate * (1 - s))

Packed layout: `swiglu(x)` with x [..., 2F] reads gate = x[..., :F] and up = x[..., F:] as strided views
of x (typically the output of the fused gate/up matmul `w13`), and its backward writes d_gate and d_up
straight into the two halves of one [..., 2F] gradient, so neither direction makes a split or concat
copy. The backward recomputes silu from the saved inputs (nothing but the inputs is saved) and writes
only fresh tensors: never grad_output or the saved inputs.

Envelope: fp32/fp16/bf16; gate and up of one shape, dtype and device; any leading shape and width;
row/column strides are passed to the kernels (see `_common.as_rows` for when a copy is unavoidable).

torch.compile: registered as custom ops (`fastgrow::swiglu_fwd`, `fastgrow::swiglu_packed_fwd` and
their backward ops) with fake implementations and autograd formulas. Eager calls go through an
autograd.Function over the same launchers (less host overhead per call).
"""

import functools

import torch
import triton
import triton.language as tl
from torch import nn

from ._common import (
    as_rows,
    autocast_dtype,
    cdiv,
    check_float,
    check_same_device,
    device_guard,
    next_pow2,
    use_triton,
)


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _swiglu_fwd_kernel(
    G, stride_gm, stride_gn,
    U, stride_um, stride_un,
    O, M, F,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    # 2-D grid of [BLOCK_M, BLOCK_F] tiles: rows on axis 0 (up to 2^31 programs), column blocks on
    # axis 1. O is a fresh contiguous [M, F] tensor. Row offsets in int64.
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows < M)[:, None] & (cols < F)[None, :]
    g = tl.load(G + rows[:, None] * stride_gm + cols[None, :] * stride_gn, mask=mask, other=0.0)
    u = tl.load(U + rows[:, None] * stride_um + cols[None, :] * stride_un, mask=mask, other=0.0)
    g = g.to(tl.float32)
    # silu written out (what tl.sigmoid computes): tl.sigmoid is a @jit library function, which a
    # process running TRITON_INTERPRET=1 turns into an interpreted one that the real compiler then
    # rejects (tests/test_norm_kernels_sm90.py compiles these kernels for sm_90 in such a process).
    # exp(-g) overflowing to inf for very negative g gives the right limit, silu -> 0.
    out = g / (1.0 + tl.exp(-g)) * u.to(tl.float32)
    tl.store(O + rows[:, None] * F + cols[None, :], out.to(O.dtype.element_ty), mask=mask)


@triton.jit
def _swiglu_bwd_kernel(
    DO, stride_dom, stride_don,
    G, stride_gm, stride_gn,
    U, stride_um, stride_un,
    DG, DU, stride_dm,
    M, F,
    BLOCK_M: tl.constexpr, BLOCK_F: tl.constexpr,
):  # fmt: skip
    # DG and DU share a row stride: either two contiguous [M, F] tensors (stride F) or the two halves
    # of one contiguous packed [M, 2F] gradient (stride 2F, DU = DG + F).
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_F + tl.arange(0, BLOCK_F)
    mask = (rows < M)[:, None] & (cols < F)[None, :]
    do = tl.load(DO + rows[:, None] * stride_dom + cols[None, :] * stride_don, mask=mask, other=0.0)
    g = tl.load(G + rows[:, None] * stride_gm + cols[None, :] * stride_gn, mask=mask, other=0.0)
    u = tl.load(U + rows[:, None] * stride_um + cols[None, :] * stride_un, mask=mask, other=0.0)
    do = do.to(tl.float32)
    g = g.to(tl.float32)
    u = u.to(tl.float32)
    s = 1.0 / (1.0 + tl.exp(-g))
    silu = g * s
    du = do * silu
    dg = do * u * (s + silu * (1.0 - s))  # silu'(g) = s * (1 + g * (1 - s))
    offs = rows[:, None] * stride_dm + cols[None, :]
    tl.store(DG + offs, dg.to(DG.dtype.element_ty), mask=mask)
    tl.store(DU + offs, du.to(DU.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------
# Elements per program. Forward moves 3 streams, backward 5; ~16 elements per thread at 8 warps keeps
# two 16-byte bf16 vectors per stream in flight per thread with modest register use, and gives enough
# programs (thousands at 4096 x 2816) to fill every SM several times over.
_TILE = 4096
_NUM_WARPS = 8


@functools.cache
def _launch_config(f: int) -> tuple[int, int]:
    """(BLOCK_M, BLOCK_F) from a fixed table.

    BLOCK_F is the widest of 1024/512/256/128 whose column padding wastes at most 1/16 of the lanes
    (the model's ffn widths 2816/5632/11008 are multiples of 256, not of 1024); narrow rows use their
    padded width and stack rows instead, so a tile is always ~_TILE elements.
    """
    block_f = max(16, next_pow2(f))
    if block_f > 1024:
        block_f = 128
        for cand in (1024, 512, 256):
            if cdiv(f, cand) * cand * 16 <= f * 17:
                block_f = cand
                break
    return max(1, _TILE // block_f), block_f


def _launch_fwd(gate: torch.Tensor, up: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    out = torch.empty(gate.shape, dtype=out_dtype or gate.dtype, device=gate.device)
    if out.numel() == 0:
        return out
    g2, u2 = as_rows(gate), as_rows(up)
    m, f = g2.shape
    block_m, block_f = _launch_config(f)
    grid = (cdiv(m, block_m), cdiv(f, block_f))
    with device_guard(gate):
        _swiglu_fwd_kernel[grid](
            g2, g2.stride(0), g2.stride(1),
            u2, u2.stride(0), u2.stride(1),
            out, m, f,
            BLOCK_M=block_m, BLOCK_F=block_f, num_warps=_NUM_WARPS,
        )  # fmt: skip
    return out


def _launch_bwd(
    dout: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, dgate: torch.Tensor, dup: torch.Tensor
) -> None:
    """Write d_gate/d_up into `dgate`/`dup`: fresh [M, F] views with unit column stride, one row stride."""
    if dout.numel() == 0:
        return
    do2, g2, u2 = as_rows(dout), as_rows(gate), as_rows(up)
    m, f = g2.shape
    block_m, block_f = _launch_config(f)
    grid = (cdiv(m, block_m), cdiv(f, block_f))
    with device_guard(gate):
        _swiglu_bwd_kernel[grid](
            do2, do2.stride(0), do2.stride(1),
            g2, g2.stride(0), g2.stride(1),
            u2, u2.stride(0), u2.stride(1),
            dgate, dup, dgate.stride(0),
            m, f,
            BLOCK_M=block_m, BLOCK_F=block_f, num_warps=_NUM_WARPS,
        )  # fmt: skip


def _halves(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    f = x.shape[-1] // 2
    return x[..., :f], x[..., f:]


# ----------------------------------------------------------------------------------------------------
# Custom ops + autograd
# ----------------------------------------------------------------------------------------------------
@torch.library.custom_op(
    "fastgrow::swiglu_fwd", mutates_args=(), schema="(Tensor gate, Tensor up, ScalarType? out_dtype) -> Tensor"
)
def _swiglu_fwd_op(gate, up, out_dtype):
    return _launch_fwd(gate, up, out_dtype)


@_swiglu_fwd_op.register_fake
def _(gate, up, out_dtype):
    return torch.empty_like(gate, dtype=out_dtype or gate.dtype, memory_format=torch.contiguous_format)


@torch.library.custom_op(
    "fastgrow::swiglu_bwd",
    mutates_args=(),
    schema="(Tensor dout, Tensor gate, Tensor up) -> (Tensor, Tensor)",
)
def _swiglu_bwd_op(dout, gate, up):
    dg = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    du = torch.empty(up.shape, dtype=up.dtype, device=up.device)
    _launch_bwd(dout, gate, up, as_rows(dg), as_rows(du))
    return dg, du


@_swiglu_bwd_op.register_fake
def _(dout, gate, up):
    return (
        torch.empty_like(gate, memory_format=torch.contiguous_format),
        torch.empty_like(up, memory_format=torch.contiguous_format),
    )


@torch.library.custom_op(
    "fastgrow::swiglu_packed_fwd", mutates_args=(), schema="(Tensor x, ScalarType? out_dtype) -> Tensor"
)
def _swiglu_packed_fwd_op(x, out_dtype):
    return _launch_fwd(*_halves(x), out_dtype)


@_swiglu_packed_fwd_op.register_fake
def _(x, out_dtype):
    return x.new_empty((*x.shape[:-1], x.shape[-1] // 2), dtype=out_dtype or x.dtype)


@torch.library.custom_op("fastgrow::swiglu_packed_bwd", mutates_args=(), schema="(Tensor dout, Tensor x) -> Tensor")
def _swiglu_packed_bwd_op(dout, x):
    dx = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    gate, up = _halves(x)
    dg, du = _halves(dx)
    _launch_bwd(dout, gate, up, as_rows(dg), as_rows(du))
    return dx


@_swiglu_packed_bwd_op.register_fake
def _(dout, x):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _swiglu_setup(ctx, inputs, output):
    ctx.save_for_backward(*inputs[:-1])  # the tensors; out_dtype is last


def _swiglu_backward(ctx, dout):
    gate, up = ctx.saved_tensors
    return (*torch.ops.fastgrow.swiglu_bwd(dout, gate, up), None)


def _swiglu_packed_backward(ctx, dout):
    (x,) = ctx.saved_tensors
    return torch.ops.fastgrow.swiglu_packed_bwd(dout, x), None


_swiglu_fwd_op.register_autograd(_swiglu_backward, setup_context=_swiglu_setup)
_swiglu_packed_fwd_op.register_autograd(_swiglu_packed_backward, setup_context=_swiglu_setup)


class _SwiGLUFn(torch.autograd.Function):
    """Eager twin of the custom ops above (same launchers, without the custom-op dispatch overhead).
    `up=None`: packed input, and the gradient is one packed tensor."""

    @staticmethod
    def forward(ctx, gate, up, out_dtype):
        ctx.packed = up is None
        ctx.save_for_backward(gate, up)
        return _launch_fwd(*_halves(gate), out_dtype) if up is None else _launch_fwd(gate, up, out_dtype)

    @staticmethod
    def backward(ctx, dout):
        gate, up = ctx.saved_tensors
        if ctx.packed:
            dx = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
            dg, du = _halves(dx)
            _launch_bwd(dout, *_halves(gate), as_rows(dg), as_rows(du))
            return dx, None, None
        dg = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
        du = torch.empty(up.shape, dtype=up.dtype, device=up.device)
        _launch_bwd(dout, gate, up, as_rows(dg), as_rows(du))
        return dg, du, None


# ----------------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------------
def _check_inputs(gate: torch.Tensor, up: torch.Tensor | None) -> None:
    check_float("gate", gate)
    if gate.dim() == 0:
        raise ValueError("gate must have at least one dimension, got a scalar")
    if up is None:
        if gate.shape[-1] % 2:
            raise ValueError(f"packed SwiGLU input needs an even last dim (gate | up), got {gate.shape[-1]}")
        return
    check_float("up", up)
    check_same_device(gate=gate, up=up)
    if gate.shape != up.shape:
        raise ValueError(f"gate {tuple(gate.shape)} and up {tuple(up.shape)} must have one shape")
    if gate.dtype != up.dtype:
        raise ValueError(f"gate ({gate.dtype}) and up ({up.dtype}) must have one dtype")


def swiglu(
    gate: torch.Tensor,
    up: torch.Tensor | None = None,
    *,
    impl: str = "auto",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """silu(gate) * up. `up=None`: `gate` is packed [..., 2F] (gate half, then up).

    Returns `out_dtype`; by default the input dtype, or the autocast dtype under autocast (the math is
    fp32 either way; the next op is the down projection, which would cast to it).
    impl: "auto" (Triton on CUDA, and on CPU under TRITON_INTERPRET=1; else the reference),
    "triton" or "ref".
    """
    _check_inputs(gate, up)
    out_dtype = autocast_dtype(gate, out_dtype)
    if out_dtype == gate.dtype:
        out_dtype = None
    if not use_triton(gate, impl) or gate.numel() == 0:
        return swiglu_ref(gate, up, out_dtype=out_dtype)
    if not torch.compiler.is_compiling():
        if torch.is_grad_enabled() and (gate.requires_grad or (up is not None and up.requires_grad)):
            return _SwiGLUFn.apply(gate, up, out_dtype)
        return _launch_fwd(*_halves(gate), out_dtype) if up is None else _launch_fwd(gate, up, out_dtype)
    if up is None:
        return torch.ops.fastgrow.swiglu_packed_fwd(gate, out_dtype)
    return torch.ops.fastgrow.swiglu_fwd(gate, up, out_dtype)


# ----------------------------------------------------------------------------------------------------
# Module
# ----------------------------------------------------------------------------------------------------
class SwiGLU(nn.Module):
    """Stateless module form of `swiglu` (packed input when called with one tensor)."""

    def __init__(self, *, impl: str = "auto") -> None:
        super().__init__()
        self.impl = impl

    def forward(self, gate: torch.Tensor, up: torch.Tensor | None = None) -> torch.Tensor:
        return swiglu(gate, up, impl=self.impl)


# ----------------------------------------------------------------------------------------------------
# fp32 reference (test oracle and CPU path)
# ----------------------------------------------------------------------------------------------------
def swiglu_ref(
    gate: torch.Tensor, up: torch.Tensor | None = None, *, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """fp32 torch reference; `up=None` means `gate` is packed [..., 2F]. Returns `out_dtype` (default the
    input dtype; no autocast resolution here)."""
    if up is None:
        gate, up = gate.chunk(2, dim=-1)
    return (torch.nn.functional.silu(gate.float()) * up.float()).to(out_dtype or gate.dtype)
