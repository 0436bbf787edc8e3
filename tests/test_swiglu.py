"""SwiGLU (split and packed): Triton kernels (interpreter on CPU) against the fp32 reference.

Tolerance rule (docs/architecture.md, section 8): max|ours - ref32| <= 2 * max|torch in the same dtype - ref32| + floor.
The interpreter truncates fp32 -> bf16 (the GPU rounds to nearest); the bf16 floor covers one ulp.
"""

import pytest
import torch
import torch.nn.functional as F
from fastgrow.kernels import SwiGLU, swiglu, swiglu_ref
from kernel_rule import assert_rule


def make_input(shape, dtype, layout, scale=1.0):
    """A view of `shape` with the requested layout (never a fresh contiguous copy unless 'contig')."""
    *lead, n = shape
    if layout == "contig":
        t = torch.randn(shape)
    elif layout == "rowpad":
        t = torch.randn(*lead, n + 6)[..., 3 : 3 + n]
    elif layout == "colstride":
        t = torch.randn(*lead, 2 * n)[..., ::2]
    elif layout == "transposed":
        t = torch.randn(n, *lead).movedim(0, -1)
    else:
        raise AssertionError(layout)
    return (t * scale).to(dtype)


def grads(fn, inputs, upstream):
    leaves = [t.detach().requires_grad_(True) for t in inputs]  # detach keeps the strides (clone may not)
    out = fn(*leaves)
    out.backward(upstream)
    return out, [t.grad for t in leaves]


def lowp_split(g, u):
    return F.silu(g) * u


def ref32_split(g, u):
    return swiglu_ref(g.float(), u.float())


# (rows, F, dtype, packed, input layout, grad layout, input scale)
CASES = [
    (0, 129, torch.float32, True, "contig", "contig", 1.0),
    (1, 1, torch.float32, False, "contig", "contig", 1.0),
    (7, 7, torch.float16, True, "rowpad", "transposed", 1.0),
    (199, 7, torch.bfloat16, False, "colstride", "contig", 1.0),
    (199, 127, torch.float32, True, "contig", "colstride", 1.0),
    (7, 129, torch.bfloat16, True, "contig", "contig", 1.0),
    (199, 129, torch.float16, False, "transposed", "rowpad", 1.0),
    (7, 1000, torch.float32, False, "rowpad", "contig", 30.0),  # large |gate|: sigmoid saturates
    (1, 1000, torch.bfloat16, True, "rowpad", "contig", 1.0),
    (7, 3000, torch.float16, True, "contig", "contig", 1.0),
    (1, 3000, torch.bfloat16, False, "contig", "transposed", 1.0),
]


# exp(-gate) overflows to inf for very negative gates in the interpreter (numpy warns); sigmoid -> 0 is
# the correct limit, which the finiteness check in assert_rule confirms.
@pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")
@pytest.mark.parametrize(
    "case",
    CASES,
    ids=lambda c: f"{c[0]}x{c[1]}-{str(c[2])[6:]}-{'packed' if c[3] else 'split'}-{c[4]}-g{c[5]}",
)
def test_swiglu_matches_reference(case):
    m, f, dtype, packed, lx, lg, scale = case
    gout = make_input((m, f), dtype, lg)
    gout_before = gout.clone()
    if packed:
        x = make_input((m, 2 * f), dtype, lx, scale)
        x_before = x.clone()
        y, (dx,) = grads(lambda a: swiglu(a, impl="triton"), [x], gout)
        y32, (dx32,) = grads(lambda a: swiglu_ref(a.float()), [x], gout.float())
        ylp, (dxlp,) = grads(lambda a: lowp_split(*a.chunk(2, dim=-1)), [x], gout)
        assert dx.shape == x.shape and dx.dtype == dtype
        assert_rule("dx", dx, dx32, dxlp, dtype)
        assert torch.equal(x, x_before)
    else:
        g, u = make_input((m, f), dtype, lx, scale), make_input((m, f), dtype, lx)
        y, (dg, du) = grads(lambda a, b: swiglu(a, b, impl="triton"), [g, u], gout)
        y32, (dg32, du32) = grads(ref32_split, [g, u], gout.float())
        ylp, (dglp, dulp) = grads(lowp_split, [g, u], gout)
        assert_rule("dgate", dg, dg32, dglp, dtype)
        assert_rule("dup", du, du32, dulp, dtype)
    assert y.dtype == dtype and y.shape == (m, f)
    assert_rule("out", y, y32, ylp, dtype)
    assert torch.equal(gout, gout_before)


def test_packed_input_is_not_copied_and_matches_split():
    # A strided slice of a fused matmul output, 3-D: gate/up halves are read in place.
    base = torch.randn(2, 5, 2 * 97 + 8)
    x = base[..., 4 : 4 + 2 * 97]
    out_packed = swiglu(x, impl="triton")
    out_split = swiglu(x[..., :97], x[..., 97:], impl="triton")
    assert torch.equal(out_packed, out_split)
    assert out_packed.shape == (2, 5, 97)
    assert_rule("packed", out_packed, swiglu_ref(x), swiglu_ref(x), torch.float32)


def test_backward_is_deterministic_and_reuses_upstream_gradient():
    x = torch.randn(3, 33, 2 * 129, requires_grad=True)
    gout = torch.randn(3, 33, 129)
    before = gout.clone()
    runs = []
    for _ in range(2):
        swiglu(x, impl="triton").backward(gout)
        runs.append(x.grad.clone())
        x.grad = None
    assert torch.equal(runs[0], runs[1]) and torch.equal(gout, before)


def test_no_grad_and_partial_requires_grad():
    g, u = torch.randn(4, 64, requires_grad=True), torch.randn(4, 64)  # up frozen
    swiglu(g, u, impl="triton").sum().backward()
    assert u.grad is None and g.grad is not None
    _, (dg32, _) = grads(ref32_split, [g, u], torch.ones(4, 64))
    assert_rule("dgate", g.grad, dg32, dg32, torch.float32)
    with torch.no_grad():
        out = swiglu(g, u, impl="triton")
    assert not out.requires_grad


def test_empty_inputs():
    for shape in ((0, 64), (2, 0, 64)):
        x = torch.randn(shape, requires_grad=True)
        out = swiglu(x, impl="triton")
        assert out.shape == (*shape[:-1], 32)
        out.sum().backward()
        assert x.grad.shape == shape
        assert swiglu(x, x, impl="triton").shape == shape


def test_module_impl_ref_and_auto():
    x = torch.randn(3, 5, 48)
    assert torch.equal(SwiGLU()(x), swiglu(x, impl="triton"))
    assert torch.equal(swiglu(x, impl="ref"), swiglu_ref(x))
    g, u = x.chunk(2, -1)
    assert torch.equal(SwiGLU(impl="ref")(g, u), swiglu_ref(g, u))


def test_torch_compile_matches_eager():
    def f(x, g, u):
        return (swiglu(x, impl="triton") * swiglu(g, u, impl="triton")).sum()

    x, g, u = torch.randn(2, 3, 80), torch.randn(2, 3, 40), torch.randn(2, 3, 40)
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    out_c, grads_c = grads(compiled, [x, g, u], None)
    out_e, grads_e = grads(f, [x, g, u], None)
    assert torch.equal(out_c, out_e)
    for a, b in zip(grads_c, grads_e):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "op, args",
    [
        ("swiglu_fwd", lambda: (torch.randn(3, 5, 33), torch.randn(3, 5, 33), None)),
        ("swiglu_fwd", lambda: (torch.randn(3, 5, 33), torch.randn(3, 5, 33), torch.float16)),
        ("swiglu_packed_fwd", lambda: (torch.randn(4, 66)[:, 1:-1], None)),
        ("swiglu_packed_fwd", lambda: (torch.randn(4, 66)[:, 1:-1], torch.float16)),
    ],
)
def test_custom_op_registration(op, args):
    # Schema, fake (meta) kernel, autograd registration and AOT dispatch of the compile-facing ops.
    args = tuple(a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args())
    torch.library.opcheck(getattr(torch.ops.fastgrow, op).default, args)


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda: swiglu(torch.randn(2, 4).double()), "float32, float16 or bfloat16"),
        (lambda: swiglu(torch.ones(2, 4, dtype=torch.int64)), "float32, float16 or bfloat16"),
        (lambda: swiglu(torch.randn(2, 5)), "even last dim"),
        (lambda: swiglu(torch.randn(2, 4), torch.randn(2, 5)), "one shape"),
        (lambda: swiglu(torch.randn(2, 4), torch.randn(2, 4).half()), "one dtype"),
        (lambda: swiglu(torch.randn(2, 4), torch.randn(2, 4, device="meta")), "one device"),
        (lambda: swiglu(torch.tensor(1.0), torch.tensor(1.0)), "at least one dimension"),
        (lambda: swiglu(torch.randn(2, 4), impl="fast"), "impl must be"),
    ],
)
def test_bad_input_raises_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


# ----------------------------------------------------------------------------------------------------
# GPU tier (tools/gpu_check.sh): bf16, the model's ffn widths, many rows, determinism.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("f", [1024, 2816, 5632, 11008, 16384])
def test_gpu_swiglu_packed_bf16(f):
    dtype = torch.bfloat16
    x = torch.randn(4096, 2 * f, device="cuda", dtype=dtype)
    gout = torch.randn(4096, f, device="cuda", dtype=dtype)
    y, (dx,) = grads(lambda a: swiglu(a), [x], gout)
    y32, (dx32,) = grads(lambda a: swiglu_ref(a.float()), [x], gout.float())
    ylp, (dxlp,) = grads(lambda a: lowp_split(*a.chunk(2, dim=-1)), [x], gout)
    assert_rule("out", y, y32, ylp, dtype)
    assert_rule("dx", dx, dx32, dxlp, dtype)
    _, (dx2,) = grads(lambda a: swiglu(a), [x], gout)
    assert torch.equal(dx, dx2)


@pytest.mark.gpu
def test_gpu_swiglu_split_strided_bf16():
    dtype = torch.bfloat16
    base = torch.randn(4096, 2 * 5632 + 64, device="cuda", dtype=dtype)
    g, u = base[:, :5632], base[:, 5632 + 64 :]
    gout = torch.randn(5632, 4096, device="cuda", dtype=dtype).t()
    y, (dg, du) = grads(lambda a, b: swiglu(a, b), [g, u], gout)
    y32, (dg32, du32) = grads(ref32_split, [g, u], gout.float())
    ylp, (dglp, dulp) = grads(lowp_split, [g, u], gout)
    assert_rule("out", y, y32, ylp, dtype)
    assert_rule("dgate", dg, dg32, dglp, dtype)
    assert_rule("dup", du, du32, dulp, dtype)


@pytest.mark.gpu
def test_gpu_torch_compile_inductor():
    x = torch.randn(4, 256, 2 * 2816, device="cuda", dtype=torch.bfloat16)
    f = torch.compile(lambda a: swiglu(a) * 2, fullgraph=True)
    yc, gc = grads(f, [x], torch.ones(4, 256, 2816, device="cuda", dtype=torch.bfloat16))
    ye, ge = grads(lambda a: swiglu(a) * 2, [x], torch.ones(4, 256, 2816, device="cuda", dtype=torch.bfloat16))
    assert torch.equal(yc, ye) and torch.equal(gc[0], ge[0])


@pytest.mark.gpu
def test_gpu_int64_offsets():
    # > 2^31 elements in the packed input: offsets in int64. Check the last rows against the oracle.
    f = 4096
    m = 2**31 // (2 * f) + 64
    x = torch.randn(m, 2 * f, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    out = swiglu(x)
    gout = torch.randn_like(out)
    out.backward(gout)
    tail = slice(m - 64, m)
    y32, (dx32,) = grads(lambda a: swiglu_ref(a.float()), [x[tail]], gout[tail].float())
    ylp, (dxlp,) = grads(lambda a: lowp_split(*a.chunk(2, dim=-1)), [x[tail]], gout[tail])
    assert_rule("out tail", out[tail], y32, ylp, torch.bfloat16)
    assert_rule("dx tail", x.grad[tail], dx32, dxlp, torch.bfloat16)


@pytest.mark.parametrize("impl", ["triton", "ref"])
@pytest.mark.parametrize("packed", [True, False])
def test_autocast_output_dtype(impl, packed):
    # Under autocast the output is the autocast dtype (fp32 math inside); gradients keep the input dtype.
    x = torch.randn(3, 7, 2 * 48, requires_grad=True)
    g = torch.randn(3, 7, 48)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = swiglu(x, impl=impl) if packed else swiglu(*x.chunk(2, dim=-1), impl=impl)
    assert out.dtype == torch.bfloat16
    ref = swiglu_ref(x.detach())
    torch.testing.assert_close(out.float(), ref, rtol=2**-7, atol=1e-6)
    out.backward(g.bfloat16())
    assert x.grad.dtype == torch.float32
    xr = x.detach().clone().requires_grad_()
    swiglu_ref(xr).backward(g.bfloat16().float())
    torch.testing.assert_close(x.grad, xr.grad, rtol=1e-5, atol=1e-6)
