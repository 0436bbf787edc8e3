"""RMSNorm and the fused residual-add RMSNorm, forward and backward Triton kernels.

Math, per row x of width N (statistics in fp32 whatever the input dtype):

    rstd = 1 / sqrt(mean(x^2) + eps)          (saved in fp32 for the backward, one float per row)
    y    = x * rstd * w                       (w optional; y in the input's dtype)
    dx   = rstd * (g - xhat * mean(g * xhat)),   xhat = x * rstd,  g = dy * w
    dw   = sum over rows of dy * xhat         (fp32 per-program partial sums, then a column reduction)

Fused residual variant (`add_rms_norm`): h = x + residual (rounded to its dtype, the same value the
caller receives), y = rms_norm(h). Backward: dh_total = dh + d(norm)/dh, returned for both x and
residual. A pre-norm block thus reads its two activations once and writes h and y once.

Envelope: x fp32/fp16/bf16; weight the output's dtype or fp32 (or None: no affine); residual of x's
shape, any float dtype (h and y take torch's promoted dtype, so under autocast a bf16 block output
added to an fp32 residual stream gives fp32 h and y, as the reference does); row width N <= 65536
on the Triton path (a whole row lives in registers, so x is read once; the backward spills registers
beyond 16K and is correct but slower there); any leading shape. Rows may be strided (row and column strides are passed to the
kernels; see `_common.as_rows` for when a copy is unavoidable). Weight gradients are deterministic:
every program owns a fixed contiguous range of rows and writes its own fp32 partial sum, and a
second small kernel reduces the partials column-wise in a fixed order; no atomics, so repeated backward passes are
bit-identical. Gradients never overwrite grad_output or saved inputs.

Files: the forward kernel, launchers, custom ops, functional API, module and references are here; the
backward kernels are in rmsnorm_bwd.py and the launch tables (tile shapes, warps, tuning candidates) in
rmsnorm_configs.py.

torch.compile: the launchers are registered as custom ops (`fastgrow::rms_norm_fwd`, ...), with fake
(meta) implementations and autograd formulas, so compiled graphs treat them as opaque nodes and do
not break around the Triton launch. Eager calls go through an autograd.Function over the same
launchers instead (less host overhead per call); both paths are tested against each other.
"""

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
    check_weight_dtype,
    device_guard,
    persistent_programs,
    use_triton,
)
from ._tune import pick
from .rmsnorm_bwd import _dw_sum_kernel, _rms_norm_bwd_kernel
from .rmsnorm_configs import (
    _PIPELINE_SMEM,
    _RELOAD_W_MIN_BLOCK,
    NormCfg,
    _launch_config,
    _rows_bucket,
    bwd_candidates,
    fwd_candidates,
)

MAX_WIDTH = 65536


# ----------------------------------------------------------------------------------------------------
# Triton kernels
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _rms_norm_fwd_kernel(
    X, stride_xm, stride_xn,
    R, stride_rm, stride_rn,
    H, Y, W, RSTD,
    M, N, eps,
    HAS_RES: tl.constexpr, HAS_W: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    # One [ROWS, BLOCK_N] tile per program: the whole row is in registers, so x is read exactly once.
    # Row offsets are int64 (M * stride can pass 2^31); H and Y are fresh contiguous [M, N] tensors.
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK_N)
    row_mask = rows < M
    col_mask = cols < N
    mask = row_mask[:, None] & col_mask[None, :]
    x = tl.load(X + rows[:, None] * stride_xm + cols[None, :] * stride_xn, mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_RES:
        r = tl.load(R + rows[:, None] * stride_rm + cols[None, :] * stride_rn, mask=mask, other=0.0)
        # Round h to the storage dtype before taking statistics: the backward recomputes from the
        # stored h, and the caller's h must be the value that was normalised.
        h = (x + r.to(tl.float32)).to(H.dtype.element_ty)
        tl.store(H + rows[:, None] * N + cols[None, :], h, mask=mask)
        x = h.to(tl.float32)
    # Masked lanes hold 0, so they add nothing to the sum; divide by the true width N.
    rstd = tl.rsqrt(tl.sum(x * x, axis=1) / N + eps)
    tl.store(RSTD + rows, rstd, mask=row_mask)
    y = x * rstd[:, None]
    if HAS_W:
        w = tl.load(W + cols, mask=col_mask, other=0.0).to(tl.float32)
        y = y * w[None, :]
    tl.store(Y + rows[:, None] * N + cols[None, :], y.to(Y.dtype.element_ty), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------
def _out_dtype(x: torch.Tensor, residual: torch.Tensor | None) -> torch.dtype:
    # h = x + residual follows torch's type promotion (autocast: a bf16 block output added to an fp32
    # residual stream gives an fp32 h), and y has h's dtype, exactly as the reference does.
    return x.dtype if residual is None else torch.promote_types(x.dtype, residual.dtype)


def _launch_fwd(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    eps: float,
    y_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Returns (h or None, y, rstd); y in `y_dtype` (default: h's dtype, see `_out_dtype`)."""
    n = x.shape[-1]
    out_dtype = _out_dtype(x, residual)
    y = torch.empty(x.shape, dtype=y_dtype or out_dtype, device=x.device)
    h = torch.empty(x.shape, dtype=out_dtype, device=x.device) if residual is not None else None
    rstd = torch.empty(x.shape[:-1], dtype=torch.float32, device=x.device)
    if y.numel() == 0:
        return h, y, rstd
    x2 = as_rows(x)
    r2 = as_rows(residual) if residual is not None else x2
    if weight is not None:
        weight = weight.contiguous()  # the kernels index W with unit stride (a no-op for parameters)
    m = x2.shape[0]
    block_n = _launch_config(n)[0]

    def run(cfg: NormCfg) -> None:
        _rms_norm_fwd_kernel[(cdiv(m, cfg.rows),)](
            x2, x2.stride(0), x2.stride(1),
            r2, r2.stride(0), r2.stride(1),
            h if h is not None else y, y, weight if weight is not None else y, rstd,
            m, n, eps,
            HAS_RES=residual is not None, HAS_W=weight is not None, ROWS=cfg.rows, BLOCK_N=block_n,
            num_warps=cfg.num_warps,
        )  # fmt: skip

    key = ("rms_fwd", block_n, x.dtype, residual.dtype if residual is not None else None, y.dtype, _rows_bucket(m))
    with device_guard(x):
        run(pick(key, fwd_candidates(n), run, x.device))
    return h, y, rstd


def _launch_bwd(
    dy: torch.Tensor,
    xh: torch.Tensor,
    weight: torch.Tensor | None,
    rstd: torch.Tensor,
    dh: torch.Tensor | None,
    compute_dw: bool,
    dx_dtype: torch.dtype,
    dr_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
    """Returns (dx in dx_dtype, dr in dr_dtype or None, dw in weight's dtype or an empty tensor).

    xh is the normalised input (x, or h for the fused residual); dh the gradient reaching h directly.
    dr is the same gradient as dx stored a second time, for a residual whose dtype differs from x's.
    """
    n = xh.shape[-1]
    compute_dw = compute_dw and weight is not None
    dx = torch.empty(xh.shape, dtype=dx_dtype, device=xh.device)
    dr = torch.empty(xh.shape, dtype=dr_dtype, device=xh.device) if dr_dtype is not None else None
    dw_dtype = weight.dtype if weight is not None else xh.dtype
    if dx.numel() == 0:
        dw = torch.zeros(n if compute_dw else 0, dtype=dw_dtype, device=xh.device)
        return dx, dr, dw
    dy2, x2 = as_rows(dy), as_rows(xh)
    dh2 = as_rows(dh) if dh is not None else dy2
    if weight is not None:
        weight = weight.contiguous()  # unit-stride W in the kernel; dw is written contiguous regardless
    m = x2.shape[0]
    block_n = _launch_config(n)[0]
    streamed = dy2.element_size() + x2.element_size() + (dh2.element_size() if dh is not None else 0)

    def run(cfg: NormCfg) -> torch.Tensor | None:
        """Launch with `cfg`; returns dW (None unless compute_dw)."""
        tiles = cdiv(m, cfg.rows)
        if compute_dw:
            # Persistent grid sized to what is resident at once, ~16 warps per SM (4 programs of 4
            # warps, 2 of 8, 1 of 16+; the register estimate above allows no more): enough loads in
            # flight to hide latency, no second wave, and an fp32 partial buffer (programs x N) that
            # stays small next to the main traffic (~8% at 4096 x 4096, less with more rows).
            progs = min(tiles, persistent_programs(xh.device) * max(1, 16 // cfg.num_warps))
        else:
            progs = tiles  # no reduction: one tile per program, the widest grid
        tiles_per_prog = cdiv(tiles, progs)
        progs = cdiv(tiles, tiles_per_prog)
        part = torch.empty((progs, n), dtype=torch.float32, device=xh.device) if compute_dw else dx  # dx: unused
        stages = 2 if 2 * cfg.rows * block_n * streamed <= _PIPELINE_SMEM else 1
        _rms_norm_bwd_kernel[(progs,)](
            dy2, dy2.stride(0), dy2.stride(1),
            x2, x2.stride(0), x2.stride(1),
            dh2, dh2.stride(0), dh2.stride(1),
            weight if weight is not None else dx, rstd, dx, dr if dr is not None else dx, part,
            m, n, tiles_per_prog,
            HAS_W=weight is not None, HAS_DH=dh is not None, HAS_DR=dr is not None,
            COMPUTE_DW=compute_dw, RELOAD_W=block_n >= _RELOAD_W_MIN_BLOCK, ROWS=cfg.rows, BLOCK_N=block_n, NUM_STAGES=stages,
            num_warps=cfg.num_warps,
        )  # fmt: skip
        if compute_dw:
            dw = torch.empty(n, dtype=dw_dtype, device=xh.device)
            _dw_sum_kernel[(cdiv(n, 64),)](part, dw, progs, n, BLOCK_P=32, BLOCK_C=64, num_warps=4)
            return dw
        return None

    key = ("rms_bwd", block_n, dy.dtype, xh.dtype, dh.dtype if dh is not None else None, dx_dtype, dr_dtype)
    key += (compute_dw, _rows_bucket(m))
    with device_guard(xh):
        dw = run(pick(key, bwd_candidates(n), run, xh.device))
    if dw is None:
        dw = torch.empty(0, dtype=dw_dtype, device=xh.device)
    return dx, dr, dw


# ----------------------------------------------------------------------------------------------------
# Custom ops + autograd (the torch.compile-visible boundary)
# ----------------------------------------------------------------------------------------------------
@torch.library.custom_op(
    "fastgrow::rms_norm_fwd",
    mutates_args=(),
    schema="(Tensor x, Tensor? weight, float eps, ScalarType? out_dtype) -> (Tensor, Tensor)",
)
def _rms_norm_fwd_op(x, weight, eps, out_dtype):
    _, y, rstd = _launch_fwd(x, None, weight, eps, out_dtype)
    return y, rstd


@_rms_norm_fwd_op.register_fake
def _(x, weight, eps, out_dtype):
    y = torch.empty_like(x, dtype=out_dtype or x.dtype, memory_format=torch.contiguous_format)
    return y, x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op(
    "fastgrow::add_rms_norm_fwd",
    mutates_args=(),
    schema="(Tensor x, Tensor residual, Tensor? weight, float eps, ScalarType? out_dtype) -> (Tensor, Tensor, Tensor)",
)
def _add_rms_norm_fwd_op(x, residual, weight, eps, out_dtype):
    return _launch_fwd(x, residual, weight, eps, out_dtype)


@_add_rms_norm_fwd_op.register_fake
def _(x, residual, weight, eps, out_dtype):
    h = torch.empty_like(x, dtype=_out_dtype(x, residual), memory_format=torch.contiguous_format)
    return h, torch.empty_like(h, dtype=out_dtype or h.dtype), x.new_empty(x.shape[:-1], dtype=torch.float32)


@torch.library.custom_op(
    "fastgrow::rms_norm_bwd",
    mutates_args=(),
    schema="(Tensor dy, Tensor x, Tensor? weight, Tensor rstd, Tensor? dh, bool compute_dw, "
    "ScalarType dx_dtype, ScalarType? dr_dtype) -> (Tensor, Tensor, Tensor)",
)
def _rms_norm_bwd_op(dy, x, weight, rstd, dh, compute_dw, dx_dtype, dr_dtype):
    dx, dr, dw = _launch_bwd(dy, x, weight, rstd, dh, compute_dw, dx_dtype, dr_dtype)
    return dx, (dr if dr is not None else x.new_empty(0)), dw  # ops cannot return None


@_rms_norm_bwd_op.register_fake
def _(dy, x, weight, rstd, dh, compute_dw, dx_dtype, dr_dtype):
    compute_dw = compute_dw and weight is not None
    dw_dtype = weight.dtype if weight is not None else x.dtype
    dx = torch.empty_like(x, dtype=dx_dtype, memory_format=torch.contiguous_format)
    dr = torch.empty_like(dx, dtype=dr_dtype) if dr_dtype is not None else x.new_empty(0)
    return dx, dr, x.new_empty((x.shape[-1] if compute_dw else 0,), dtype=dw_dtype)


def _rms_norm_setup(ctx, inputs, output):
    x, weight, _eps, _out_dtype = inputs
    _y, rstd = output
    ctx.save_for_backward(x, weight, rstd)
    ctx.mark_non_differentiable(rstd)


def _rms_norm_backward(ctx, dy, _drstd):
    x, weight, rstd = ctx.saved_tensors
    need_dw = weight is not None and ctx.needs_input_grad[1]
    dx, _, dw = torch.ops.fastgrow.rms_norm_bwd(dy, x, weight, rstd, None, need_dw, x.dtype, None)
    return dx, (dw if need_dw else None), None, None


_rms_norm_fwd_op.register_autograd(_rms_norm_backward, setup_context=_rms_norm_setup)


def _grad_dtypes(x_dtype: torch.dtype, r_dtype: torch.dtype) -> tuple[torch.dtype, torch.dtype | None]:
    # x and residual receive the same gradient. One dtype: one tensor serves both (autograd never
    # writes into a gradient it hands to two inputs). Two dtypes: the kernel stores it twice.
    return x_dtype, (None if r_dtype == x_dtype else r_dtype)


def _add_rms_norm_setup(ctx, inputs, output):
    x, residual, weight, _eps, _out_dtype = inputs
    h, _y, rstd = output
    ctx.save_for_backward(h, weight, rstd)
    ctx.mark_non_differentiable(rstd)
    ctx.grad_dtypes = _grad_dtypes(x.dtype, residual.dtype)


def _add_rms_norm_backward(ctx, dh, dy, _drstd):
    h, weight, rstd = ctx.saved_tensors
    need_dw = weight is not None and ctx.needs_input_grad[2]
    dx_dtype, dr_dtype = ctx.grad_dtypes
    dx, dr, dw = torch.ops.fastgrow.rms_norm_bwd(dy, h, weight, rstd, dh, need_dw, dx_dtype, dr_dtype)
    return dx, (dr if dr_dtype is not None else dx), (dw if need_dw else None), None, None


_add_rms_norm_fwd_op.register_autograd(_add_rms_norm_backward, setup_context=_add_rms_norm_setup)


class _RMSNormFn(torch.autograd.Function):
    """Eager twin of the custom ops above (same launchers). Outside torch.compile it skips the custom-op
    dispatch and its autograd wrapper, ~10-40 us of Python per call that shows at small shapes when
    the host, not the GPU, is the bottleneck. Returns y, or (h, y) with a residual."""

    @staticmethod
    def forward(ctx, x, residual, weight, eps, out_dtype):
        h, y, rstd = _launch_fwd(x, residual, weight, eps, out_dtype)
        # An unused output (e.g. the final norm's h) then arrives as None, not as a zero-filled tensor.
        ctx.set_materialize_grads(False)
        ctx.has_residual = h is not None
        ctx.grad_dtypes = _grad_dtypes(x.dtype, residual.dtype) if h is not None else (x.dtype, None)
        ctx.save_for_backward(h if h is not None else x, weight, rstd)
        return (h, y) if h is not None else y

    @staticmethod
    def backward(ctx, *grads):
        xh, weight, rstd = ctx.saved_tensors
        need_dw = weight is not None and ctx.needs_input_grad[2]
        dh, dy = grads if ctx.has_residual else (None, grads[0])
        if dy is None:  # only h was used: the gradient passes straight through to x and residual
            if dh is None:
                return None, None, None, None, None
            dx_dtype, dr_dtype = ctx.grad_dtypes
            return dh.to(dx_dtype), dh.to(dr_dtype or dx_dtype), None, None, None
        dx, dr, dw = _launch_bwd(dy, xh, weight, rstd, dh, need_dw, *ctx.grad_dtypes)
        dres = (dr if dr is not None else dx) if ctx.has_residual else None
        return dx, dres, (dw if need_dw else None), None, None


# ----------------------------------------------------------------------------------------------------
# Functional API
# ----------------------------------------------------------------------------------------------------
def _check_inputs(x: torch.Tensor, weight: torch.Tensor | None, residual: torch.Tensor | None = None) -> None:
    check_float("x", x)
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension (the normalised one), got a scalar")
    if residual is not None:
        check_float("residual", residual)
        check_same_device(x=x, residual=residual)
        if residual.shape != x.shape:
            raise ValueError(f"x {tuple(x.shape)} and residual {tuple(residual.shape)} must have one shape")
    if weight is not None:
        check_weight_dtype("weight", weight, _out_dtype(x, residual))
        check_same_device(x=x, weight=weight)
        if weight.shape != x.shape[-1:]:
            raise ValueError(f"weight shape {tuple(weight.shape)} must be ({x.shape[-1]},)")


def _needs_autograd(*tensors: torch.Tensor | None) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)


def _check_width(n: int) -> None:
    if n > MAX_WIDTH:
        raise ValueError(
            f"the Triton RMSNorm supports rows of at most {MAX_WIDTH} elements, got width {n} "
            "(use impl='ref' for wider rows)"
        )


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-6,
    *,
    impl: str = "auto",
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """RMS-normalise the last dim of `x` and scale by `weight` (None: no affine).

    Returns `out_dtype`; by default x.dtype, or the autocast dtype under autocast (statistics are fp32
    either way; producing the matmul's dtype here saves the cast kernel autocast would add after it).
    impl: "auto" (Triton on CUDA, and on CPU under TRITON_INTERPRET=1; else the reference),
    "triton" or "ref".
    """
    _check_inputs(x, weight)
    out_dtype = autocast_dtype(x, out_dtype)
    if not use_triton(x, impl) or x.numel() == 0:
        # Empty inputs take the reference path: it returns empty outputs and well-formed (zero) grads.
        return rms_norm_ref(x, weight, eps, out_dtype=out_dtype)
    _check_width(x.shape[-1])
    if torch.compiler.is_compiling():
        return torch.ops.fastgrow.rms_norm_fwd(x, weight, float(eps), out_dtype)[0]
    if _needs_autograd(x, weight):
        return _RMSNormFn.apply(x, None, weight, float(eps), out_dtype)
    return _launch_fwd(x, None, weight, float(eps), out_dtype)[1]  # inference: no autograd node, no saved tensors


def add_rms_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-6,
    *,
    impl: str = "auto",
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fused `h = x + residual; y = rms_norm(h, weight, eps)`. Returns (h, y), both differentiable.

    h has the promoted dtype of x and residual (torch's rule for `x + residual`); y has `out_dtype`, by
    default h's dtype, or the autocast dtype under autocast (as `rms_norm`).
    """
    _check_inputs(x, weight, residual)
    out_dtype = autocast_dtype(x, out_dtype)
    if not use_triton(x, impl) or x.numel() == 0:
        return add_rms_norm_ref(x, residual, weight, eps, out_dtype=out_dtype)
    _check_width(x.shape[-1])
    if torch.compiler.is_compiling():
        h, y, _rstd = torch.ops.fastgrow.add_rms_norm_fwd(x, residual, weight, float(eps), out_dtype)
        return h, y
    if _needs_autograd(x, residual, weight):
        return _RMSNormFn.apply(x, residual, weight, float(eps), out_dtype)
    h, y, _rstd = _launch_fwd(x, residual, weight, float(eps), out_dtype)
    return h, y


# ----------------------------------------------------------------------------------------------------
# Module
# ----------------------------------------------------------------------------------------------------
class RMSNorm(nn.Module):
    """Drop-in for torch.nn.RMSNorm over the last dim (same state_dict: `weight`, absent without affine)."""

    def __init__(
        self,
        dim: int,
        eps: float = 1e-6,
        device=None,
        dtype=None,
        *,
        elementwise_affine: bool = True,
        impl: str = "auto",
    ) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.impl = impl
        if elementwise_affine:
            self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            nn.init.ones_(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return rms_norm(x, self.weight, self.eps, impl=self.impl)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, elementwise_affine={self.weight is not None}"


# ----------------------------------------------------------------------------------------------------
# fp32 references (test oracle and CPU path)
# ----------------------------------------------------------------------------------------------------
def rms_norm_ref(
    x: torch.Tensor, weight: torch.Tensor | None, eps: float = 1e-6, *, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """fp32 torch reference; returns `out_dtype` (default x.dtype; no autocast resolution here)."""
    xf = x.float()
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.float()
    return y.to(out_dtype or x.dtype)


def add_rms_norm_ref(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None,
    eps: float = 1e-6,
    *,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """h = x + residual (torch's promoted dtype), y = rms_norm(h) in `out_dtype` (default h's); returns (h, y)."""
    h = x + residual
    return h, rms_norm_ref(h, weight, eps, out_dtype=out_dtype)
