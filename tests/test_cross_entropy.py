"""Tests of fastgrow.kernels.cross_entropy: the chunked linear cross-entropy (Triton row kernel under the
interpreter, and its torch twin) against F.cross_entropy on the whole upcast logits (fp64 where the
tolerance must be tight), forward and backward, odd shapes, ignore_index, empty input, torch.compile,
autocast, and the model's loss."""

import pytest
import torch
import torch.nn.functional as F
from fastgrow.kernels.cross_entropy import chunk_rows, linear_cross_entropy, linear_cross_entropy_ref


def _ref64(x, w, t, ignore_index=-100, reduction="mean"):
    """Independent oracle: fp64 logits through F.cross_entropy, and its autograd gradients."""
    x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    loss = F.cross_entropy(
        (x64 @ w64.t()).reshape(-1, w.shape[0]), t.reshape(-1), ignore_index=ignore_index, reduction=reduction
    )
    loss.backward()
    return loss.detach(), x64.grad, w64.grad


def _ours(x, w, t, **kw):
    x, w = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    loss = linear_cross_entropy(x, w, t, **kw)
    loss.backward()
    return loss.detach(), x.grad, w.grad


def _close(ours, ref, tol=1e-5):
    for a, b in zip(ours, ref):
        assert a.shape == b.shape
        torch.testing.assert_close(a.double(), b, rtol=tol, atol=tol)


CASES = [
    # n rows, vocab, dim, chunk rows
    (1, 1, 3, None),
    (7, 5, 4, 3),
    (33, 17, 16, 8),
    (64, 100, 32, 64),
    (130, 300, 8, 17),  # one 512-wide block, 212 lanes masked
    (5, 4099, 4, 2),  # past the 4096-lane block cap: the online max/sum rescales across blocks
]


@pytest.mark.parametrize("impl", ["triton", "torch"])
@pytest.mark.parametrize("n,v,d,chunk", CASES)
def test_matches_fp64_reference(n, v, d, chunk, impl):
    x, w = torch.randn(n, d), torch.randn(v, d)
    t = torch.randint(0, v, (n,))
    _close(_ours(x, w, t, chunk_size=chunk, impl=impl), _ref64(x, w, t))


@pytest.mark.parametrize("impl", ["triton", "torch"])
def test_ignore_index_and_sum_reduction(impl):
    x, w = torch.randn(2, 19, 8) * 3, torch.randn(37, 8)
    t = torch.randint(0, 37, (2, 19))
    t[0, ::3] = -100
    t[1, -5:] = -100
    _close(_ours(x, w, t, chunk_size=5, impl=impl), _ref64(x, w, t))
    _close(_ours(x, w, t, chunk_size=5, impl=impl, reduction="sum"), _ref64(x, w, t, reduction="sum"))
    t2 = torch.where(t == -100, 7, t)  # 7 is now the ignored class (also where it occurs naturally)
    _close(_ours(x, w, t2, ignore_index=7, impl=impl), _ref64(x, w, t2, ignore_index=7))


def test_all_targets_ignored_gives_nan_mean_and_zero_grads():
    x, w = torch.randn(6, 4), torch.randn(9, 4)
    t = torch.full((6,), -100)
    loss, gx, gw = _ours(x, w, t, chunk_size=4)
    ref = F.cross_entropy(x @ w.t(), t)
    assert torch.isnan(loss) and torch.isnan(ref)
    loss_sum, gx, gw = _ours(x, w, t, reduction="sum")
    assert loss_sum.item() == 0 and torch.all(gx == 0) and torch.all(gw == 0)


def test_empty_input():
    x, w = torch.randn(0, 8, requires_grad=True), torch.randn(11, 8, requires_grad=True)
    t = torch.zeros(0, dtype=torch.long)
    loss = linear_cross_entropy(x, w, t)
    assert torch.isnan(loss)  # F.cross_entropy's mean over nothing
    assert linear_cross_entropy(x, w, t, reduction="sum").item() == 0
    linear_cross_entropy(x, w, t, reduction="sum").backward()
    assert x.grad.shape == x.shape and torch.all(w.grad == 0)


def test_extreme_logits_stay_finite():
    # Logits of +-1e4: a naive exp overflows; the online max keeps lse exact.
    x = torch.tensor([[100.0, 0.0], [-100.0, 50.0]])
    w = torch.tensor([[100.0, 0.0], [-100.0, 0.0], [0.0, 100.0]])
    t = torch.tensor([1, 2])
    ours = _ours(x, w, t)
    assert all(torch.isfinite(a).all() for a in ours)
    _close(ours, _ref64(x, w, t))


def test_double_backward_of_retained_graph_is_not_rescaled():
    x, w = torch.randn(9, 6, requires_grad=True), torch.randn(13, 6, requires_grad=True)
    t = torch.randint(0, 13, (9,))
    loss = linear_cross_entropy(x, w, t, chunk_size=4) * 3.0  # upstream gradient 3
    g1 = torch.autograd.grad(loss, (x, w), retain_graph=True)
    g2 = torch.autograd.grad(loss, (x, w))
    _, rx, rw = _ref64(x, w, t)
    for a, b, r in zip(g1, g2, (rx, rw)):
        assert torch.equal(a, b)
        torch.testing.assert_close(a.double(), 3 * r, rtol=1e-5, atol=1e-5)


def test_only_weight_or_only_input_requires_grad_and_no_grad():
    x, w = torch.randn(10, 5), torch.randn(7, 5)
    t = torch.randint(0, 7, (10,))
    _, rx, rw = _ref64(x, w, t)
    wg = w.clone().requires_grad_()
    linear_cross_entropy(x, wg, t).backward()
    torch.testing.assert_close(wg.grad.double(), rw, rtol=1e-5, atol=1e-5)
    xg = x.clone().requires_grad_()
    linear_cross_entropy(xg, w, t).backward()
    torch.testing.assert_close(xg.grad.double(), rx, rtol=1e-5, atol=1e-5)
    with torch.no_grad():
        loss = linear_cross_entropy(xg, wg, t)
    assert not loss.requires_grad
    torch.testing.assert_close(loss.double(), _ref64(x, w, t)[0], rtol=1e-6, atol=1e-6)


def test_strided_input_and_int32_targets():
    base = torch.randn(12, 2, 10)
    x = base[:, 1, :]  # rows with stride 20
    w = torch.randn(23, 10)
    t = torch.randint(0, 23, (12,), dtype=torch.int32)
    _close(_ours(x, w, t, chunk_size=5), _ref64(x, w, t.long()))


def test_half_precision_inputs_use_their_dtype_for_the_matmul():
    x, w = torch.randn(20, 16).half(), (torch.randn(50, 16) * 0.5).half()
    t = torch.randint(0, 50, (20,))
    loss, gx, gw = _ours(x, w, t, chunk_size=8)
    assert gx.dtype == torch.float16 and gw.dtype == torch.float16 and loss.dtype == torch.float32
    ref = _ref64(x, w, t)
    torch.testing.assert_close(loss.double(), ref[0], rtol=2e-3, atol=2e-3)
    torch.testing.assert_close(gx.double(), ref[1], rtol=2e-2, atol=2e-3)
    torch.testing.assert_close(gw.double(), ref[2], rtol=2e-2, atol=2e-3)


def test_autocast_runs_the_matmul_in_the_autocast_dtype():
    x, w = torch.randn(24, 32), torch.randn(40, 32) * 0.3
    t = torch.randint(0, 40, (24,))
    xb = x.detach().requires_grad_()
    wb = w.detach().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = linear_cross_entropy(xb, wb, t, chunk_size=10, impl="torch")
        unfused = F.cross_entropy((xb @ wb.t()).float(), t)  # the model's old loss under autocast
    loss.backward()
    assert xb.grad.dtype == torch.float32 and wb.grad.dtype == torch.float32
    # Same bf16 logits as the unfused autocast loss, so the losses agree to fp32 rounding of the lse.
    torch.testing.assert_close(loss, unfused, rtol=1e-5, atol=1e-5)
    ref = _ref64(x, w, t)
    torch.testing.assert_close(xb.grad.double(), ref[1], rtol=5e-2, atol=5e-3)
    torch.testing.assert_close(wb.grad.double(), ref[2], rtol=5e-2, atol=5e-3)


def test_torch_compile_matches_eager():
    x, w = torch.randn(3, 11, 16), torch.randn(29, 16)
    t = torch.randint(0, 29, (3, 11))

    def f(x, w):
        return linear_cross_entropy(x, w, t, chunk_size=8) * 2

    eager = _ours(x, w, t, chunk_size=8)
    xc, wc = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = torch.compile(f, fullgraph=True, backend="aot_eager")(xc, wc)
    loss.backward()
    torch.testing.assert_close(loss / 2, eager[0])
    torch.testing.assert_close(xc.grad / 2, eager[1])
    torch.testing.assert_close(wc.grad / 2, eager[2])


def test_bad_inputs():
    x, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    with pytest.raises(ValueError, match=r"targets must be in \[0, 10\)"):
        linear_cross_entropy(x, w, torch.tensor([0, 1, 10, 2]))
    with pytest.raises(ValueError, match="do not match"):
        linear_cross_entropy(x, w[:, :4], t)
    with pytest.raises(ValueError, match="leading shape"):
        linear_cross_entropy(x, w, t[:3])
    with pytest.raises(ValueError, match="int64/int32"):
        linear_cross_entropy(x, w, t.float())
    with pytest.raises(ValueError, match="reduction"):
        linear_cross_entropy(x, w, t, reduction="none")
    with pytest.raises(ValueError, match="chunk_size"):
        linear_cross_entropy(x, w, t, chunk_size=0)
    with pytest.raises(ValueError, match="impl"):
        linear_cross_entropy(x, w, t, impl="cuda")


def test_reference_is_the_unchunked_loss():
    x, w = torch.randn(6, 5), torch.randn(8, 5)
    t = torch.randint(0, 8, (6,))
    torch.testing.assert_close(linear_cross_entropy_ref(x, w, t), F.cross_entropy(x @ w.t(), t))
    torch.testing.assert_close(linear_cross_entropy(x, w, t, impl="ref"), F.cross_entropy(x @ w.t(), t))


def test_chunk_rows_bounds_the_chunk():
    assert chunk_rows(16384, 32000) == 2048  # 2**26 / 32000 = 2097, cut to a multiple of 64
    assert chunk_rows(100, 32000) == 100
    assert chunk_rows(10, 1 << 30) == 1
    assert chunk_rows(1 << 20, 50) * 50 <= 1 << 26


def test_model_loss_equals_unfused_cross_entropy():
    # The model's loss (chunked) against F.cross_entropy of its own full logits, forward and backward.
    from fastgrow.config import ModelConfig
    from fastgrow.model import Transformer

    cfg = ModelConfig(vocab_size=67, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=32)
    m = Transformer(cfg)
    x, y = torch.randint(0, 67, (2, 21)), torch.randint(0, 67, (2, 21))
    loss = m(x, y)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in m.named_parameters()}
    m.zero_grad()
    unfused = F.cross_entropy(m(x).float().view(-1, 67), y.view(-1))
    unfused.backward()
    torch.testing.assert_close(loss, unfused, rtol=1e-6, atol=1e-6)
    for n, p in m.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, rtol=1e-5, atol=1e-6, msg=n)


@pytest.mark.gpu
@pytest.mark.parametrize("n,v,d", [(4096, 32000, 1024), (1000, 50257, 256)])
def test_gpu_bf16_autocast_matches_unfused(n, v, d):
    # The model's case on a GPU: bf16 autocast, several chunks, the Triton row kernel compiled.
    torch.manual_seed(0)
    x = torch.randn(n, d, device="cuda", requires_grad=True)
    w = (torch.randn(v, d, device="cuda") * d**-0.5).requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda")
    t[::7] = -100
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = linear_cross_entropy(x, w, t, chunk_size=1024)
    loss.backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    with torch.autocast("cuda", dtype=torch.bfloat16):
        unfused = F.cross_entropy((x @ w.t()).float(), t)
    unfused.backward()
    torch.testing.assert_close(loss, unfused, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(gx, x.grad, rtol=2e-2, atol=1e-5)
    torch.testing.assert_close(gw, w.grad, rtol=2e-2, atol=1e-5)


@pytest.mark.gpu
def test_gpu_peak_memory_is_below_the_unfused_loss():
    # 16384 tokens x vocab 32000 (the 410M preset's batch): the unfused loss allocates several [N, V]
    # tensors (2 GB each in fp32); the chunked one at most one bf16 chunk plus dx and dW.
    n, v, d = 16384, 32000, 1024
    x = torch.randn(n, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    w = (torch.randn(v, d, device="cuda") * d**-0.5).requires_grad_()
    t = torch.randint(0, v, (n,), device="cuda")
    peaks = {}
    for name in ("unfused", "chunked"):
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            if name == "chunked":
                loss = linear_cross_entropy(x, w, t)
            else:
                loss = F.cross_entropy((x @ w.t()).float(), t)
        loss.backward()
        x.grad = w.grad = None
        peaks[name] = (torch.cuda.max_memory_allocated() - base) / 2**30
    assert peaks["chunked"] < 1.0 < 4.0 < peaks["unfused"], peaks
