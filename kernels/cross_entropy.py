"""Linear cross-entropy: the loss of `logits = x @ weight^T` against integer targets, computed in row chunks,
so the [N, V] logits never exist for the whole batch (neither in the matmul dtype nor upcast to fp32).

    loss = mean over rows i with t_i != ignore_index of  lse_i - logit_{i, t_i},   lse_i = log sum_v exp(logit_iv)

(`reduction="sum"`: the sum instead of the mean; the mean over zero rows is NaN, as in F.cross_entropy.)

One pass over row chunks does the forward and the gradient, which need the same logits:

    z   = x_c @ W^T                      [chunk, V] in the compute dtype (the autocast dtype under autocast)
    g   = (softmax(z) - onehot(t)) / n   fp32 math, written over z in place (rows of ignored targets: 0;
                                         n = the number of counted rows for "mean", 1 for "sum")
    dx_c = g @ W ;   dW += g^T @ x_c     (dW accumulated in fp32)

The loss's own backward then only multiplies dx and dW by grad_output (exact when it is 1, the usual
case: the gradients are then rounded as the unfused loss's are, scaled before the matmuls). Memory: one logits chunk
(`chunk_rows x V`, ~2**26 elements by default: 128 MB in bf16 at vocab 32000) plus dx [N, D] and an fp32
dW [V, D], instead of the bf16 logits, their fp32 upcast, the saved log-softmax and the fp32 and bf16
gradients of the unfused loss (each [N, V]; ~1.0 + 2.1 + 2.1 + 2.1 + 1.0 GB at 16384 tokens x 32000). FLOPs are
those of the unfused head (one forward and two backward matmuls); nothing is recomputed. The gradients
are computed in the forward only when autograd will need them (grad mode on and x or weight requiring
grad); under no_grad (evaluation) only the loss is computed.

Per-chunk row math: a Triton kernel (one program per row: an online max/sum-exp pass over the vocab, then
a pass writing the gradient in place; 3 passes over the chunk in the compute dtype) on CUDA and under
TRITON_INTERPRET=1, else the same math in torch. Targets outside [0, V) other than ignore_index are an
error (a ValueError on CPU, a device-side assert on CUDA, which does not synchronise).

torch.compile: the chunk loop is one custom op (`fastgrow::linear_cross_entropy_fwd`) with a fake
implementation, so a compiled model keeps it as one opaque node; eager calls use an autograd.Function
over the same launcher.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ._common import autocast_dtype, check_float, check_same_device, device_guard, next_pow2, use_triton

NEG_BIG = tl.constexpr(-1.0e30)
REDUCTIONS = ("mean", "sum")
# Rows per chunk: about this many logits per chunk (2**26: 128 MB in bf16, enough rows per matmul,
# 2048 at vocab 32000, to keep the GEMMs efficient, against the GBs of a whole [N, V] tensor).
_CHUNK_ELEMENTS = 1 << 26


# ----------------------------------------------------------------------------------------------------
# Triton kernel: loss and in-place gradient of one chunk of logits
# ----------------------------------------------------------------------------------------------------
@triton.jit
def _ce_rows_kernel(
    Z, stride_zm, T, LOSS, SCALE, V, ignore_index,
    COMPUTE_GRAD: tl.constexpr, BLOCK_V: tl.constexpr,
):  # fmt: skip
    # One program per row. Pass 1: per-lane running max and sum of exp over the vocab (one reduction at
    # the end instead of one per block). Pass 2: g = (exp(z - lse) - [v == t]) * scale, stored over z.
    row = tl.program_id(0).to(tl.int64)
    base = Z + row * stride_zm
    t = tl.load(T + row)
    ignored = (t == ignore_index) | (t < 0) | (t >= V)  # out-of-range targets are rejected by the caller
    t_safe = tl.where(ignored, 0, t)
    offs = tl.arange(0, BLOCK_V)
    m = tl.full([BLOCK_V], NEG_BIG, dtype=tl.float32)
    s = tl.zeros([BLOCK_V], dtype=tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + offs
        z = tl.load(base + cols, mask=cols < V, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m, z)
        s = s * tl.exp(m - m_new) + tl.exp(z - m_new)
        m = m_new
    m_row = tl.max(m, axis=0)
    lse = m_row + tl.log(tl.sum(s * tl.exp(m - m_row), axis=0))
    z_t = tl.load(base + t_safe).to(tl.float32)
    tl.store(LOSS + row, tl.where(ignored, 0.0, lse - z_t))
    if COMPUTE_GRAD:
        keep = tl.where(ignored, 0.0, tl.load(SCALE))
        for v0 in range(0, V, BLOCK_V):
            cols = v0 + offs
            z = tl.load(base + cols, mask=cols < V, other=0.0).to(tl.float32)
            # exp * scale - [v == t] * scale: the rounding of log-softmax's own backward
            g = tl.exp(z - lse) * keep - tl.where(cols == t_safe, keep, 0.0)
            tl.store(base + cols, g.to(Z.dtype.element_ty), mask=cols < V)


def _rows_triton(z: torch.Tensor, t: torch.Tensor, ignore_index: int, grad: bool, scale: torch.Tensor) -> torch.Tensor:
    rows, v = z.shape
    loss = torch.empty(rows, dtype=torch.float32, device=z.device)
    block_v = min(4096, max(16, next_pow2(v)))
    with device_guard(z):
        _ce_rows_kernel[(rows,)](
            z, z.stride(0), t, loss, scale, v, ignore_index,
            COMPUTE_GRAD=grad, BLOCK_V=block_v, num_warps=8 if block_v >= 2048 else 4,
        )  # fmt: skip
    return loss


def _rows_torch(z: torch.Tensor, t: torch.Tensor, ignore_index: int, grad: bool, scale: torch.Tensor) -> torch.Tensor:
    """The kernel's math in torch (fp32), for CPU tensors without the interpreter: log_softmax and the
    very formula of its backward (so fp32 results round as F.cross_entropy's do, chunk for chunk)."""
    logp = torch.log_softmax(z.float(), dim=1)
    valid = t != ignore_index
    t_safe = torch.where(valid, t, 0)
    loss = torch.where(valid, -logp.gather(1, t_safe[:, None])[:, 0], 0.0)
    if grad:
        keep = (valid * scale)[:, None]
        g = logp.exp_().mul_(keep)
        g.scatter_add_(1, t_safe[:, None], -keep)
        z.copy_(g)
    return loss


# ----------------------------------------------------------------------------------------------------
# Launcher: the chunk loop
# ----------------------------------------------------------------------------------------------------
def chunk_rows(n_rows: int, vocab: int) -> int:
    """Rows per chunk for `n_rows` rows over a vocabulary of `vocab`."""
    rows = max(1, _CHUNK_ELEMENTS // max(vocab, 1))
    if rows >= 64:
        rows -= rows % 64  # whole GEMM tiles
    return max(1, min(n_rows, rows))


def _check_targets(t: torch.Tensor, vocab: int, ignore_index: int) -> None:
    bad = ((t < 0) | (t >= vocab)) & (t != ignore_index)
    if t.is_cuda:
        torch._assert_async(~bad.any(), "linear_cross_entropy: a target is outside [0, vocab) and not ignore_index")
    elif bad.any():
        raise ValueError(f"targets must be in [0, {vocab}) or ignore_index ({ignore_index}), got {t[bad][0].item()}")


def _launch(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    ignore_index: int,
    compute_dtype: torch.dtype,
    need_dx: bool,
    need_dw: bool,
    chunk: int,
    triton_rows: bool,
    mean: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns (loss: fp32 scalar, dx: [N, D] in x's dtype or empty, dW: fp32 [V, D] or empty), the
    gradients being those of the returned (reduced) loss."""
    _check_targets(targets, weight.shape[0], ignore_index)
    with torch.autocast(x.device.type, enabled=False):  # dtypes are explicit below
        return _chunk_loop(x, weight, targets, ignore_index, compute_dtype, need_dx, need_dw, chunk, triton_rows, mean)


def _chunk_loop(x, weight, targets, ignore_index, compute_dtype, need_dx, need_dw, chunk, triton_rows, mean):
    n, d = x.shape
    vocab = weight.shape[0]
    n_valid = (targets != ignore_index).sum().to(torch.float32)
    # d(loss)/d(logit) scale: 1/n for the mean (1/max(n, 1): zero gradients, not NaN, when every target is
    # ignored; the loss itself is then NaN as in F.cross_entropy), 1 for the sum. A tensor: no host sync.
    scale = 1.0 / n_valid.clamp(min=1.0) if mean else torch.ones((), dtype=torch.float32, device=x.device)
    w = weight.to(compute_dtype)
    rows = _rows_triton if triton_rows else _rows_torch
    grad = need_dx or need_dw
    loss = torch.empty(n, dtype=torch.float32, device=x.device)
    dx = torch.empty((n, d) if need_dx else (0,), dtype=x.dtype, device=x.device)
    dw = torch.empty((vocab, d) if need_dw else (0,), dtype=torch.float32, device=x.device)
    for s in range(0, n, chunk):
        e = min(n, s + chunk)
        xc = x[s:e].to(compute_dtype)
        z = xc @ w.t()  # [rows, V], contiguous
        loss[s:e] = rows(z, targets[s:e], ignore_index, grad, scale)
        if need_dx:
            if dx.dtype == compute_dtype:
                torch.mm(z, w, out=dx[s:e])
            else:
                dx[s:e] = z @ w
        if need_dw:
            if s == 0 and compute_dtype == torch.float32:
                torch.mm(z.t(), xc, out=dw)
            elif s == 0:
                dw.copy_(z.t() @ xc)
            elif compute_dtype == torch.float32:
                dw.addmm_(z.t(), xc)
            else:
                dw.add_(z.t() @ xc)  # fp32 accumulator; each chunk's product in the compute dtype
    total = loss.sum()
    return (total / n_valid if mean else total), dx, dw


def _compute_dtype(x: torch.Tensor, weight: torch.Tensor) -> torch.dtype:
    # What the unfused `x @ weight.T` would run in: the autocast dtype under autocast, else the promotion.
    return autocast_dtype(x, None) or torch.promote_types(x.dtype, weight.dtype)


# ----------------------------------------------------------------------------------------------------
# Custom op (torch.compile boundary) and eager autograd.Function
# ----------------------------------------------------------------------------------------------------
@torch.library.custom_op(
    "fastgrow::linear_cross_entropy_fwd",
    mutates_args=(),
    schema="(Tensor x, Tensor weight, Tensor targets, int ignore_index, ScalarType compute_dtype, bool need_dx, "
    "bool need_dw, int chunk, bool triton_rows, bool mean) -> (Tensor, Tensor, Tensor)",
)
def _lce_fwd_op(x, weight, targets, ignore_index, compute_dtype, need_dx, need_dw, chunk, triton_rows, mean):
    with device_guard(x):
        return _launch(x, weight, targets, ignore_index, compute_dtype, need_dx, need_dw, chunk, triton_rows, mean)


@_lce_fwd_op.register_fake
def _(x, weight, targets, ignore_index, compute_dtype, need_dx, need_dw, chunk, triton_rows, mean):
    dx = x.new_empty(tuple(x.shape) if need_dx else (0,))
    dw = x.new_empty((weight.shape[0], x.shape[1]) if need_dw else (0,), dtype=torch.float32)
    return x.new_empty((), dtype=torch.float32), dx, dw


def _scaled_grads(ctx, g_loss: torch.Tensor, dx: torch.Tensor, dw: torch.Tensor):
    x_dtype, w_dtype = ctx.dtypes
    gx = (dx * g_loss).to(x_dtype) if ctx.needs_input_grad[0] else None
    gw = (dw * g_loss).to(w_dtype) if ctx.needs_input_grad[1] else None
    return gx, gw


# The op's backward only multiplies the gradients computed in the forward by the upstream gradient.
def _lce_setup(ctx, inputs, output):
    _loss, dx, dw = output
    ctx.save_for_backward(dx, dw)
    ctx.mark_non_differentiable(dx, dw)
    ctx.dtypes = (inputs[0].dtype, inputs[1].dtype)


def _lce_backward(ctx, g_loss, _gdx, _gdw):
    return (*_scaled_grads(ctx, g_loss, *ctx.saved_tensors), None, None, None, None, None, None, None, None)


_lce_fwd_op.register_autograd(_lce_backward, setup_context=_lce_setup)


class _LinearCEFn(torch.autograd.Function):
    """Eager twin of the custom op (same launcher, no custom-op dispatch); returns the reduced loss."""

    @staticmethod
    def forward(ctx, x, weight, targets, ignore_index, compute_dtype, need_dx, need_dw, chunk, triton_rows, mean):
        with device_guard(x):
            loss, dx, dw = _launch(
                x, weight, targets, ignore_index, compute_dtype, need_dx, need_dw, chunk, triton_rows, mean
            )
        ctx.save_for_backward(dx, dw)
        ctx.dtypes = (x.dtype, weight.dtype)
        return loss

    @staticmethod
    def backward(ctx, g_loss):
        return (*_scaled_grads(ctx, g_loss, *ctx.saved_tensors), None, None, None, None, None, None, None, None)


# ----------------------------------------------------------------------------------------------------
# Functional API and the fp32 reference
# ----------------------------------------------------------------------------------------------------
def _check_inputs(x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reduction: str) -> None:
    check_float("x", x)
    check_float("weight", weight)
    if not isinstance(targets, torch.Tensor) or targets.dtype not in (torch.int64, torch.int32):
        got = targets.dtype if isinstance(targets, torch.Tensor) else type(targets).__name__
        raise ValueError(f"targets must be an int64/int32 tensor, got {got}")
    check_same_device(x=x, weight=weight, targets=targets)
    if weight.dim() != 2 or x.dim() < 1 or x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x [..., D] and weight [V, D] do not match: {tuple(x.shape)} and {tuple(weight.shape)}")
    if targets.shape != x.shape[:-1]:
        raise ValueError(f"targets shape {tuple(targets.shape)} must be x's leading shape {tuple(x.shape[:-1])}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    targets: torch.Tensor,
    *,
    ignore_index: int = -100,
    reduction: str = "mean",
    chunk_size: int | None = None,
    impl: str = "auto",
) -> torch.Tensor:
    """`F.cross_entropy(x @ weight.T, targets, ignore_index=..., reduction=...)` without the whole logits.

    x [..., D], weight [V, D] (a bias-free head), targets x's leading shape (int64/int32). Returns an fp32
    scalar. chunk_size: rows per chunk (default ~2**26 / V). impl: "auto" (Triton row kernel on CUDA and
    under TRITON_INTERPRET=1, torch otherwise; the chunking is the same), "triton", "torch" or "ref"
    (the unchunked fp32 reference).
    """
    _check_inputs(x, weight, targets, reduction)
    if impl == "ref":
        return linear_cross_entropy_ref(x, weight, targets, ignore_index=ignore_index, reduction=reduction)
    if impl not in ("auto", "triton", "torch"):
        raise ValueError(f"impl must be 'auto', 'triton', 'torch' or 'ref', got {impl!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    x2 = x.reshape(-1, x.shape[-1])
    t = targets.reshape(-1).long()
    if x2.shape[0] == 0 or weight.shape[0] == 0:
        # Nothing to chunk: the reference gives F.cross_entropy's answer (NaN mean, 0 sum) and zero grads.
        return linear_cross_entropy_ref(x, weight, targets, ignore_index=ignore_index, reduction=reduction)
    triton_rows = impl != "torch" and use_triton(x2, "auto" if impl == "auto" else "triton")
    chunk = chunk_size or chunk_rows(x2.shape[0], weight.shape[0])
    cdtype = _compute_dtype(x, weight)
    grad_on = torch.is_grad_enabled()
    need_dx = grad_on and x.requires_grad
    need_dw = grad_on and weight.requires_grad
    mean = reduction == "mean"
    if torch.compiler.is_compiling():
        loss, _dx, _dw = torch.ops.fastgrow.linear_cross_entropy_fwd(
            x2, weight, t, int(ignore_index), cdtype, need_dx, need_dw, int(chunk), triton_rows, mean
        )
        return loss
    return _LinearCEFn.apply(x2, weight, t, int(ignore_index), cdtype, need_dx, need_dw, chunk, triton_rows, mean)


def linear_cross_entropy_ref(
    x: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, ignore_index: int = -100, reduction: str = "mean"
) -> torch.Tensor:
    """fp32 reference: the whole logits, upcast, through F.cross_entropy. Returns an fp32 scalar."""
    logits = x.float() @ weight.float().t()
    return F.cross_entropy(
        logits.reshape(-1, weight.shape[0]), targets.reshape(-1).long(), ignore_index=ignore_index, reduction=reduction
    )
