"""RMSNorm and fused residual RMSNorm: Triton kernels (interpreter on CPU) against the fp32 reference.

Tolerance rule (docs/architecture.md, section 8): max|ours - ref32| <= 2 * max|torch in the same dtype - ref32| + floor.
Note: the Triton interpreter converts fp32 -> bf16 by truncation, not round-to-nearest (GPU rounds), so
bf16 outputs here may sit one bf16 ulp away from torch's; the rule's bf16 floor covers that.
"""

import pytest
import torch
from fastgrow.kernels import RMSNorm, add_rms_norm, add_rms_norm_ref, rms_norm, rms_norm_ref
from fastgrow.kernels.rmsnorm import MAX_WIDTH
from kernel_rule import assert_rule

EPS = 1e-6


def naive_lowp(x, w, eps=EPS):
    """RMSNorm computed by torch entirely in the input dtype (the 'torch same dtype' yardstick)."""
    y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)
    return y * w.to(x.dtype) if w is not None else y


def make_input(shape, dtype, layout):
    """A tensor of `shape` laid out as requested: a strided view of a larger tensor unless 'contig'."""
    *lead, n = shape
    if layout == "contig":
        return torch.randn(shape, dtype=dtype)
    if layout == "rowpad":  # rows further apart than their width
        return torch.randn(*lead, n + 5, dtype=dtype)[..., :n]
    if layout == "colstride":  # every other element of a wider row
        return torch.randn(*lead, 2 * n, dtype=dtype)[..., ::2]
    if layout == "transposed":  # last dim not unit-stride at all
        return torch.randn(n, *lead, dtype=dtype).movedim(0, -1)
    raise AssertionError(layout)


def grads(fn, inputs, upstream):
    """Run fn(*inputs) -> tensor or tuple, backprop `upstream` (same structure), return (outs, grads)."""
    # detach (not clone): a clone of a non-dense view comes back contiguous, losing the layout under test
    leaves = [t.detach().requires_grad_(t.requires_grad) if t is not None else None for t in inputs]
    outs = fn(*leaves)
    outs = outs if isinstance(outs, tuple) else (outs,)
    torch.autograd.backward(outs, upstream)
    return outs, [t.grad if t is not None and t.requires_grad else None for t in leaves]


def ref32_fn(x, w):
    return rms_norm_ref(x.float(), w.float() if w is not None else None, EPS)


# (rows, width, x dtype, weight: "same" | "fp32" | None, layout of x, layout of grad_output)
CASES = [
    (0, 127, torch.float32, "same", "contig", "contig"),
    (1, 1, torch.float32, "same", "contig", "contig"),
    (7, 7, torch.float16, "same", "rowpad", "contig"),
    (199, 7, torch.bfloat16, None, "contig", "transposed"),
    (199, 127, torch.bfloat16, "same", "colstride", "contig"),
    (7, 129, torch.float16, "fp32", "transposed", "rowpad"),
    (199, 129, torch.float32, "same", "contig", "colstride"),
    (7, 1000, torch.bfloat16, "fp32", "rowpad", "contig"),
    (199, 1000, torch.float32, "same", "contig", "contig"),
    (1, 3000, torch.bfloat16, "same", "contig", "contig"),
    (7, 3000, torch.float16, None, "colstride", "rowpad"),
    (3, 9000, torch.float32, "same", "contig", "contig"),  # >= 8192: w re-read per row in the backward
]


def _case_id(c):
    m, n, dt, w, lx, lg = c
    return f"{m}x{n}-{str(dt)[6:]}-w{w}-{lx}-g{lg}"


def _weight(n, dtype, kind):
    if kind is None:
        return None
    wd = dtype if kind == "same" else torch.float32
    return (1 + 0.5 * torch.randn(n)).to(wd).requires_grad_(True)


@pytest.mark.parametrize("case", CASES, ids=_case_id)
def test_rms_norm_matches_reference(case):
    m, n, dtype, wkind, lx, lg = case
    x = make_input((m, n), dtype, lx).requires_grad_(True)
    w = _weight(n, dtype, wkind)
    g = make_input((m, n), dtype, lg)
    g_before = g.clone()
    x_before = x.detach().clone()

    (y,), (dx, dw) = grads(lambda a, b: rms_norm(a, b, EPS, impl="triton"), [x, w], [g])
    (y32,), (dx32, dw32) = grads(ref32_fn, [x, w], [g.float()])
    (ylp,), (dxlp, dwlp) = grads(naive_lowp, [x, w], [g])

    assert y.dtype == dtype and y.shape == x.shape
    assert_rule("y", y, y32, ylp, dtype)
    assert_rule("dx", dx, dx32, dxlp, dtype)
    if w is not None:
        assert dw.dtype == w.dtype
        assert_rule("dw", dw, dw32, dwlp.to(dw.dtype), dtype)
    # Never writes into grad_output or the saved input.
    assert torch.equal(g, g_before) and torch.equal(x.detach(), x_before)


# (rows, width, x dtype, residual dtype (None: x's), weight kind, which outputs feed the loss)
ADD_CASES = [
    (0, 129, torch.float32, None, "same", "both"),
    (1, 7, torch.float16, None, "fp32", "both"),
    (199, 127, torch.float32, None, "same", "both"),
    (7, 1000, torch.bfloat16, None, "same", "both"),
    (7, 129, torch.float16, None, None, "y"),
    (199, 7, torch.bfloat16, None, "same", "h"),
    (7, 3000, torch.float32, None, "fp32", "both"),
    # autocast: bf16 block output + fp32 residual stream -> fp32 h and y, grads in each input's dtype
    (7, 129, torch.bfloat16, torch.float32, "fp32", "both"),
    (1, 1000, torch.float16, torch.bfloat16, "fp32", "both"),  # promotes to fp32 as well
]


def _add_id(c):
    r = f"+{str(c[3])[6:]}" if c[3] else ""
    return f"{c[0]}x{c[1]}-{str(c[2])[6:]}{r}-w{c[4]}-{c[5]}"


@pytest.mark.parametrize("case", ADD_CASES, ids=_add_id)
def test_add_rms_norm_matches_reference(case):
    m, n, xdtype, rdtype, wkind, use = case
    rdtype = rdtype or xdtype
    dtype = torch.promote_types(xdtype, rdtype)  # h and y
    x = make_input((2, m, n), xdtype, "rowpad").requires_grad_(True)  # 3-D, strided rows
    r = make_input((2, m, n), rdtype, "contig").requires_grad_(True)
    w = _weight(n, dtype, wkind)
    gh, gy = torch.randn(2, m, n, dtype=dtype), make_input((2, m, n), dtype, "transposed")

    def loss_of(fn):
        def run(a, b, c):
            h, y = fn(a, b, c)
            parts = {"both": (h, y), "y": (y,), "h": (h,)}[use]
            return sum(
                (p.float() * q.float()).sum() for p, q in zip(parts, {"both": (gh, gy), "y": (gy,), "h": (gh,)}[use])
            )

        return run

    def ours(a, b, c):
        return add_rms_norm(a, b, c, EPS, impl="triton")

    def ref32(a, b, c):
        # h is rounded to its dtype (the value the kernel normalises), then everything in fp32.
        h = (a.float() + b.float()).to(dtype).float()
        return h, rms_norm_ref(h, c.float() if c is not None else None, EPS)

    def lowp(a, b, c):
        h = a + b
        return h, naive_lowp(h, c)

    h, y = ours(x, r, w)
    h32, y32 = ref32(x, r, w)
    hlp, ylp = lowp(x, r, w)
    assert h.dtype == dtype and y.dtype == dtype
    assert_rule("h", h, h32, hlp, dtype)
    assert_rule("y", y, y32, ylp, dtype)

    _, (dx, dr, dw) = grads(lambda *a: loss_of(ours)(*a), [x, r, w], [torch.tensor(1.0)])
    _, (dx32, dr32, dw32) = grads(lambda *a: loss_of(ref32)(*a), [x, r, w], [torch.tensor(1.0)])
    _, (dxlp, drlp, dwlp) = grads(lambda *a: loss_of(lowp)(*a), [x, r, w], [torch.tensor(1.0)])
    assert dx.dtype == xdtype and dr.dtype == rdtype
    assert_rule("dx", dx, dx32, dxlp, xdtype)
    assert_rule("dresidual", dr, dr32, drlp, rdtype)
    if xdtype == rdtype:
        assert torch.equal(dx, dr)
    if w is not None and use == "h":  # y unused: torch leaves dw None, ours computes exact zeros
        assert dw is None or not dw.any()
    elif w is not None:
        assert_rule("dw", dw, dw32, dwlp.to(dw.dtype), dtype)


def test_add_rms_norm_h_is_exact_sum():
    # fp16/fp32 casts are exact-rounding in the interpreter: h must equal torch's x + residual bitwise.
    for dtype in (torch.float32, torch.float16):
        x, r = torch.randn(5, 97, dtype=dtype), torch.randn(5, 97, dtype=dtype)
        h, y = add_rms_norm(x, r, None, impl="triton")
        assert torch.equal(h, x + r)


def test_backward_is_deterministic_and_reuses_upstream_gradient():
    x = torch.randn(199, 129, requires_grad=True)
    r = torch.randn(199, 129, requires_grad=True)
    w = torch.randn(129, requires_grad=True)
    gy, gh = torch.randn(199, 129), torch.randn(199, 129)
    gy_before = gy.clone()
    results = []
    for _ in range(2):  # the same upstream gradient tensors drive both passes
        h, y = add_rms_norm(x, r, w, impl="triton")
        z = rms_norm(y, w, impl="triton")
        torch.autograd.backward((h, y, z), (gh, gy, gy))
        results.append([t.grad.clone() for t in (x, r, w)])
        for t in (x, r, w):
            t.grad = None
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert torch.equal(gy, gy_before)


def test_frozen_weight_no_grad_and_none_weight():
    x = torch.randn(7, 127, requires_grad=True)
    w = torch.randn(127)  # frozen: requires_grad False
    y = rms_norm(x, w, impl="triton")
    y.backward(torch.ones_like(y))
    assert w.grad is None and x.grad is not None
    (y32,), (dx32, _) = grads(ref32_fn, [x, w], [torch.ones(7, 127)])
    assert_rule("dx", x.grad, dx32, dx32, torch.float32)
    with torch.no_grad():
        y2 = rms_norm(x, w, impl="triton")
        h3, y3 = add_rms_norm(x, x, w, impl="triton")
    assert not y2.requires_grad and not y3.requires_grad and not h3.requires_grad
    assert torch.equal(y2, y.detach())
    assert_rule("y-no-affine", rms_norm(x, None, impl="triton"), ref32_fn(x, None), ref32_fn(x, None), torch.float32)


def test_empty_inputs():
    for shape in ((0, 64), (3, 0, 64)):
        x = torch.randn(shape, requires_grad=True)
        w = torch.randn(64, requires_grad=True)
        y = rms_norm(x, w, impl="triton")
        h, y2 = add_rms_norm(x, x, w, impl="triton")
        assert y.shape == shape and h.shape == shape and y2.shape == shape
        (y.sum() + y2.sum()).backward()
        assert x.grad.shape == shape and torch.equal(w.grad, torch.zeros(64))


def test_strided_layouts_reach_the_kernel_without_a_copy():
    from fastgrow.kernels._common import as_rows

    x = make_input((2, 7, 33), torch.float32, "rowpad")  # padded rows: a view, no copy
    assert not x.is_contiguous()
    x2 = as_rows(x)
    assert x2.shape == (14, 33) and x2.data_ptr() == x.data_ptr() and x2._base is not None
    # A column stride other than 1 is copied to unit stride: uncoalesced loads, and int32 column offsets
    # could overflow on large tensors.
    for layout in ("colstride", "transposed"):
        x = make_input((2, 7, 33), torch.float32, layout)
        x2 = as_rows(x)
        assert x2.shape == (14, 33) and x2.stride() == (33, 1) and torch.equal(x2, x.reshape(14, 33))


def test_non_contiguous_weight_is_read_correctly():
    x = torch.randn(5, 64)
    for w in (torch.full((1,), 2.0).expand(64), torch.randn(128)[::2]):
        torch.testing.assert_close(rms_norm(x, w, EPS, impl="triton"), rms_norm_ref(x, w, EPS))


def test_one_dim_and_non_collapsible_inputs():
    # 1-D input (one row), and [seq, batch, dim] from a transpose, whose rows one stride cannot describe
    # (the launcher falls back to a copy); expanded (stride-0) upstream gradients from .sum().
    w = torch.randn(33, requires_grad=True)
    for x in (torch.randn(33), torch.randn(5, 3, 33).transpose(0, 1)):
        x.requires_grad_(True)
        (y,), (dx, dw) = grads(lambda a, b: rms_norm(a, b, EPS, impl="triton"), [x, w], [torch.ones(x.shape)])
        (y32,), (dx32, dw32) = grads(ref32_fn, [x, w], [torch.ones(x.shape)])
        for name, a, b in (("y", y, y32), ("dx", dx, dx32), ("dw", dw, dw32)):
            assert_rule(name, a, b, b, torch.float32)
        rms_norm(x, w, impl="triton").sum().backward()


def test_impl_ref_and_auto_paths():
    x, w = torch.randn(3, 5, 33), torch.randn(33)
    assert torch.equal(rms_norm(x, w, impl="ref"), rms_norm_ref(x, w))
    h, y = add_rms_norm(x, x, w, impl="ref")
    h2, y2 = add_rms_norm_ref(x, x, w)
    assert torch.equal(h, h2) and torch.equal(y, y2)
    # auto == triton under the interpreter (the conftest sets TRITON_INTERPRET=1)
    assert torch.equal(rms_norm(x, w), rms_norm(x, w, impl="triton"))


def test_module_state_dict_matches_torch():
    ours = RMSNorm(48, eps=1e-5)
    theirs = torch.nn.RMSNorm(48, eps=1e-5)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    with torch.no_grad():
        theirs.weight.copy_(torch.randn(48))
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(4, 48)
    assert_rule("module", ours(x), theirs(x), theirs(x), torch.float32)
    assert RMSNorm(8, elementwise_affine=False).state_dict().keys() == set()
    assert RMSNorm(8, dtype=torch.bfloat16).weight.dtype == torch.bfloat16


@pytest.mark.parametrize("xdtype", [torch.float32, torch.bfloat16])  # bf16: autocast-style mixed dtypes
def test_torch_compile_matches_eager(xdtype):
    # Compiled graphs call the custom ops; eager calls the autograd.Function: same numbers, bitwise.
    def f(x, r, w):
        h, y = add_rms_norm(x, r, w, impl="triton")
        return h.float().sum() + (rms_norm(y, w, impl="triton") * y).float().sum()

    x, r, w = torch.randn(2, 3, 40, dtype=xdtype), torch.randn(2, 3, 40), torch.randn(40)
    for t in (x, r, w):
        t.requires_grad_()
    compiled = torch.compile(f, backend="aot_eager", fullgraph=True)
    (out_c,), grads_c = grads(lambda *a: compiled(*a), [x, r, w], [None])
    (out_e,), grads_e = grads(lambda *a: f(*a), [x, r, w], [None])
    assert torch.equal(out_c, out_e)
    for a, b, t in zip(grads_c, grads_e, (x, r, w)):
        assert a.dtype == t.dtype and torch.equal(a, b)


@pytest.mark.parametrize("p, n", [(1, 7), (100, 129)])  # 100 partial rows: several BLOCK_P iterations
def test_dw_partial_reduction_kernel(p, n):
    from fastgrow.kernels.rmsnorm import _dw_sum_kernel

    part = torch.randn(p, n)
    for dtype in (torch.float32, torch.bfloat16):
        dw = torch.empty(n, dtype=dtype)
        _dw_sum_kernel[(-(-n // 64),)](part, dw, p, n, BLOCK_P=32, BLOCK_C=64)
        ref = part.double().sum(0)
        assert_rule("dw", dw, ref, ref.to(dtype), dtype)


def test_max_width_row():
    x = torch.randn(2, MAX_WIDTH, requires_grad=True)
    w = torch.randn(MAX_WIDTH, requires_grad=True)
    g = torch.randn(2, MAX_WIDTH)
    (y,), (dx, dw) = grads(lambda a, b: rms_norm(a, b, EPS, impl="triton"), [x, w], [g])
    (y32,), (dx32, dw32) = grads(ref32_fn, [x, w], [g])
    for name, a, b in (("y", y, y32), ("dx", dx, dx32), ("dw", dw, dw32)):
        assert_rule(name, a, b, b, torch.float32)


@pytest.mark.parametrize(
    "op, args",
    [
        ("rms_norm_fwd", lambda: (torch.randn(3, 5, 33), torch.randn(33), 1e-6, None)),
        ("rms_norm_fwd", lambda: (torch.randn(4, 33), None, 1e-5, torch.float16)),
        ("add_rms_norm_fwd", lambda: (torch.randn(4, 33), torch.randn(4, 33), torch.randn(33), 1e-6, None)),
        ("add_rms_norm_fwd", lambda: (torch.randn(4, 33).half(), torch.randn(4, 33), None, 1e-6, torch.float16)),
    ],
)
def test_custom_op_registration(op, args):
    # Schema, fake (meta) kernel, autograd registration and AOT dispatch of the compile-facing ops.
    args = [a.requires_grad_() if isinstance(a, torch.Tensor) else a for a in args()]
    torch.library.opcheck(getattr(torch.ops.fastgrow, op).default, tuple(args))


@pytest.mark.parametrize(
    "bad, match",
    [
        (lambda: rms_norm(torch.randn(2, 4).double(), None), "float32, float16 or bfloat16"),
        (lambda: rms_norm(torch.ones(2, 4, dtype=torch.int32), None), "float32, float16 or bfloat16"),
        (lambda: rms_norm(torch.randn(2, 4), torch.randn(5)), "weight shape"),
        (
            lambda: rms_norm(torch.randn(2, 4, dtype=torch.float16), torch.randn(4).bfloat16()),
            "weight must be",
        ),
        (lambda: rms_norm(torch.randn(2, 4), torch.randn(4, device="meta")), "one device"),
        (lambda: rms_norm(torch.tensor(1.0), None), "at least one dimension"),
        (lambda: rms_norm(torch.randn(1, MAX_WIDTH + 1), None, impl="triton"), "at most 65536"),
        (lambda: rms_norm(torch.randn(2, 4), None, impl="cuda"), "impl must be"),
        (lambda: add_rms_norm(torch.randn(2, 4), torch.randn(2, 5), None), "residual"),
        (
            lambda: add_rms_norm(torch.randn(2, 4).half(), torch.randn(2, 4).half(), torch.randn(4).bfloat16()),
            "weight",
        ),
        (lambda: add_rms_norm(torch.randn(2, 4), torch.randn(2, 4, device="meta"), None), "one device"),
    ],
)
def test_bad_input_raises_value_error(bad, match):
    with pytest.raises(ValueError, match=match):
        bad()


def test_triton_impl_without_interpreter_is_an_error(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(ValueError, match="TRITON_INTERPRET"):
        rms_norm(torch.randn(2, 4), None, impl="triton")
    x = torch.randn(2, 4)
    assert torch.equal(rms_norm(x, None), rms_norm_ref(x, None))  # auto -> the reference on CPU


# ----------------------------------------------------------------------------------------------------
# GPU tier (tools/gpu_check.sh): bf16 at the model's widths, many rows, determinism.
# ----------------------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("n", [1024, 4096, 8192, 16384, 65536])
@pytest.mark.parametrize("wdtype", [torch.bfloat16, torch.float32])
def test_gpu_rms_norm_bf16(n, wdtype):
    m = 4096 if n <= 16384 else 257
    dtype = torch.bfloat16
    x = torch.randn(m, n, device="cuda", dtype=dtype, requires_grad=True)
    w = (1 + 0.5 * torch.randn(n, device="cuda")).to(wdtype).requires_grad_(True)
    g = torch.randn(m, n, device="cuda", dtype=dtype)
    (y,), (dx, dw) = grads(lambda a, b: rms_norm(a, b, EPS), [x, w], [g])
    (y32,), (dx32, dw32) = grads(ref32_fn, [x, w], [g.float()])
    (ylp,), (dxlp, dwlp) = grads(naive_lowp, [x, w], [g])
    assert_rule("y", y, y32, ylp, dtype)
    assert_rule("dx", dx, dx32, dxlp, dtype)
    assert_rule("dw", dw, dw32, dwlp.to(dw.dtype), dtype)
    _, (dx2, dw2) = grads(lambda a, b: rms_norm(a, b, EPS), [x, w], [g])
    assert torch.equal(dx, dx2) and torch.equal(dw, dw2)  # bit-identical backward


@pytest.mark.gpu
@pytest.mark.parametrize("n", [2048, 4096])
def test_gpu_add_rms_norm_bf16(n):
    dtype = torch.bfloat16
    x, r = (torch.randn(2, 2048, n, device="cuda", dtype=dtype, requires_grad=True) for _ in range(2))
    w = torch.randn(n, device="cuda", dtype=dtype, requires_grad=True)
    gh, gy = torch.randn_like(x), torch.randn_like(x)
    (h, y), (dx, dr, dw) = grads(lambda a, b, c: add_rms_norm(a, b, c, EPS), [x, r, w], [gh, gy])

    def ref32(a, b, c):
        hh = (a.float() + b.float()).to(dtype).float()
        return hh, rms_norm_ref(hh, c.float(), EPS)

    (h32, y32), (dx32, _, dw32) = grads(ref32, [x, r, w], [gh.float(), gy.float()])
    (hlp, ylp), (dxlp, _, dwlp) = grads(lambda a, b, c: (a + b, naive_lowp(a + b, c)), [x, r, w], [gh, gy])
    assert torch.equal(h, x.detach() + r.detach())
    assert_rule("y", y, y32, ylp, dtype)
    assert_rule("dx", dx, dx32, dxlp, dtype)
    assert_rule("dw", dw, dw32, dwlp, dtype)
    _, (dx2, _, dw2) = grads(lambda a, b, c: add_rms_norm(a, b, c, EPS), [x, r, w], [gh, gy])
    assert torch.equal(dx, dx2) and torch.equal(dw, dw2)


@pytest.mark.gpu
def test_gpu_torch_compile_inductor():
    x = torch.randn(4, 256, 1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(1024, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    f = torch.compile(lambda a, b: rms_norm(a, b) * 2, fullgraph=True)
    (yc,), gc = grads(f, [x, w], [torch.ones_like(x)])
    (ye,), ge = grads(lambda a, b: rms_norm(a, b) * 2, [x, w], [torch.ones_like(x)])
    assert torch.equal(yc, ye)
    assert torch.equal(gc[0], ge[0]) and torch.equal(gc[1], ge[1])


@pytest.mark.gpu
def test_gpu_int64_offsets():
    # > 2^31 elements: row offsets must be computed in int64. Check the last rows against the oracle.
    n = 4096
    m = 2**31 // n + 64
    x = torch.randn(m, n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = torch.randn(n, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    y = rms_norm(x, w, EPS)
    g = torch.randn_like(y)
    y.backward(g)
    tail = slice(m - 64, m)
    (y32,), (dx32, _) = grads(ref32_fn, [x[tail].detach(), w], [g[tail].float()])
    (ylp,), (dxlp, _) = grads(naive_lowp, [x[tail].detach(), w], [g[tail]])
    assert_rule("y tail", y[tail], y32, ylp, torch.bfloat16)
    assert_rule("dx tail", x.grad[tail], dx32, dxlp, torch.bfloat16)


# ----------------------------------------------------------------------------------------------------
# Output dtype: under autocast y is the autocast dtype (no separate cast kernel before the next matmul)
# ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_autocast_output_dtype(impl):
    x = torch.randn(5, 3, 40, requires_grad=True)
    w = torch.randn(40, requires_grad=True)
    g = torch.randn(5, 3, 40)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = rms_norm(x, w, EPS, impl=impl)
    assert y.dtype == torch.bfloat16
    # Oracle: the fp32 reference rounded to bf16 once (the interpreter truncates: allow one bf16 ulp).
    ref = rms_norm_ref(x.detach(), w.detach(), EPS)
    torch.testing.assert_close(y.float(), ref, rtol=2**-7, atol=1e-6)
    y.backward(g.bfloat16())
    (_,), (dx32, dw32) = grads(ref32_fn, [x, w], [g.bfloat16().float()])
    assert x.grad.dtype == torch.float32 and w.grad.dtype == torch.float32
    torch.testing.assert_close(x.grad, dx32, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(w.grad, dw32, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("impl", ["triton", "ref"])
def test_autocast_add_rms_norm_keeps_fp32_stream(impl):
    # The model's case: a bf16 branch output added to the fp32 residual stream. h stays fp32 (the stream),
    # y is bf16 (the next matmul's input); explicit out_dtype works the same without autocast.
    a = torch.randn(4, 24).bfloat16()
    r = torch.randn(4, 24)
    w = torch.randn(24)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h, y = add_rms_norm(a, r, w, EPS, impl=impl)
    h2, y2 = add_rms_norm(a, r, w, EPS, impl=impl, out_dtype=torch.bfloat16)
    assert h.dtype == torch.float32 and y.dtype == torch.bfloat16
    assert torch.equal(h, h2) and torch.equal(y, y2)
    torch.testing.assert_close(h, a.float() + r, rtol=0, atol=0)
    torch.testing.assert_close(y.float(), rms_norm_ref(a.float() + r, w, EPS), rtol=2**-7, atol=1e-6)


def test_unused_h_or_y_gets_no_zero_gradient():
    # The model's final norm uses only y of add_rms_norm; a branch may use only h. Both must backprop.
    x, r, w = torch.randn(3, 32), torch.randn(3, 32), torch.randn(32)
    for use in ("y", "h"):
        leaves = [t.clone().requires_grad_() for t in (x, r, w)]
        h, y = add_rms_norm(*leaves, EPS, impl="triton")
        (y if use == "y" else h).square().sum().backward()
        ref_leaves = [t.clone().requires_grad_() for t in (x, r, w)]
        hr, yr = add_rms_norm_ref(*ref_leaves, EPS)
        (yr if use == "y" else hr).square().sum().backward()
        for a, b in zip(leaves, ref_leaves):
            if b.grad is None:
                assert a.grad is None or torch.all(a.grad == 0)
            else:
                torch.testing.assert_close(a.grad, b.grad, rtol=1e-4, atol=1e-5)
