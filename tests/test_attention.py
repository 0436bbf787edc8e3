"""Tests of fastgrow.kernels.attention: the Triton kernels (interpreter on CPU, fp32/fp16) against an
fp64 reference, the other backends, validation, and `gpu`-marked bf16/long-sequence/determinism tests.

Tolerance rule (docs/architecture.md, section 8): max|ours - ref64| <= 2 * max|torch in the same dtype - ref64| + floor.
"""

from __future__ import annotations

import importlib
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from fastgrow.kernels._common import interpreter_enabled
from fastgrow.kernels.attention import attention, attention_ref
from kernel_rule import FLOOR

# the package re-exports the function `attention`, which shadows the submodule attribute
attn_mod = importlib.import_module("fastgrow.kernels.attention")
cfg_mod = importlib.import_module("fastgrow.kernels.attention_configs")  # the launch tables


def _make(b, sq, sk, h, hk, d, dtype, device="cpu", layout="contiguous"):
    """q (b, sq, h, d), k/v (b, sk, hk, d) in one of several memory layouts."""
    if layout == "contiguous":
        q = torch.randn(b, sq, h, d, dtype=dtype, device=device)
        k = torch.randn(b, sk, hk, d, dtype=dtype, device=device)
        v = torch.randn(b, sk, hk, d, dtype=dtype, device=device)
    elif layout == "packed":  # the model: views of one (b, s, h + 2hk, d) QKV projection
        assert sq == sk
        qkv = torch.randn(b, sq, h + 2 * hk, d, dtype=dtype, device=device)
        q, k, v = qkv.split([h, hk, hk], dim=2)
    elif layout == "odd":  # (b, h, s, d) storage seen as (b, s, h, d), and a head-dim stride of 2
        q = torch.randn(b, h, sq, d, dtype=dtype, device=device).transpose(1, 2)
        k = torch.randn(b, sk, hk, 2 * d, dtype=dtype, device=device)[..., ::2]
        v = torch.randn(b, hk, sk, d, dtype=dtype, device=device).transpose(1, 2)
    else:
        raise AssertionError(layout)
    return q, k, v


def _run(fn, q, k, v, do, dlse):
    """Forward + backward of fn; returns (out, lse, dq, dk, dv), all detached."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out, lse = fn(q, k, v)
    loss = (out.to(do.dtype) * do).sum()
    if dlse is not None:
        loss = loss + (torch.where(torch.isinf(lse), 0.0, lse).to(dlse.dtype) * dlse).sum()
    dq, dk, dv = torch.autograd.grad(loss, (q, k, v))
    return out.detach(), lse.detach(), dq, dk, dv


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def check_against_ref(q, k, v, causal, *, lse_grad=False, scale=None):
    """Triton forward/LSE/dq/dk/dv vs fp64 reference, with the same-dtype torch error as the yardstick."""
    dtype = q.dtype
    do = torch.randn(q.shape, dtype=torch.float64, device=q.device)
    dlse = torch.randn(q.shape[0], q.shape[2], q.shape[1], dtype=torch.float64, device=q.device) if lse_grad else None

    ours = _run(
        lambda q, k, v: attention(q, k, v, causal, scale, backend="triton", return_lse=True),
        q,
        k,
        v,
        do,
        dlse,
    )
    ref64 = _run(
        lambda q, k, v: attention_ref(q, k, v, causal, scale, return_lse=True, compute_dtype=torch.float64),
        *(t.double() for t in (q, k, v)),
        do,
        dlse,
    )
    same = _run(
        lambda q, k, v: attention_ref(q, k, v, causal, scale, return_lse=True, compute_dtype=dtype),
        q,
        k,
        v,
        do.to(dtype),
        dlse.to(dtype) if dlse is not None else None,
    )
    assert ours[0].dtype == dtype and ours[0].shape == q.shape
    assert ours[1].dtype == torch.float32 and ours[1].shape == (q.shape[0], q.shape[2], q.shape[1])
    assert ours[2].shape == q.shape and ours[3].shape == k.shape and ours[4].shape == v.shape
    _compare(ours, ref64, same, dtype)
    return ours


def _compare(ours, ref, same, dtype):
    """Each of out, lse, dq, dk, dv: finite, and max|ours - ref| <= 2 * max|same - ref| + floor."""
    for name, a, r, s in zip(("out", "lse", "dq", "dk", "dv"), ours, ref, same):
        if name == "lse":  # -inf on rows that see nothing: must match exactly there
            assert torch.equal(torch.isinf(a), torch.isinf(r)), "lse -inf pattern differs"
            a, r, s = (torch.where(torch.isinf(r), 0.0, t.double()) for t in (a, r, s))
        assert torch.isfinite(a).all(), f"{name} has non-finite values"
        err, tol = _max_err(a, r), 2 * _max_err(s, r) + FLOOR[dtype]
        assert err <= tol, f"{name}: max err {err:.3e} > tol {tol:.3e}"


# Covering subset of seq {1, 2, 17, 97, 129} x head_dim {16, 32, 64, 96, 128} x GQA {1, 2, 4} x causal x dtype:
# each value appears in several rows, with tiles of 32 query rows x 16 keys in the interpreter.
CASES = [
    # b, sq, sk, h, hk, d, causal, dtype
    (1, 1, 1, 2, 2, 32, True, torch.float32),
    (2, 2, 2, 4, 2, 64, False, torch.float16),
    (2, 17, 17, 4, 1, 32, True, torch.float16),
    (1, 17, 17, 4, 4, 128, False, torch.float32),
    (1, 97, 97, 4, 2, 64, True, torch.float32),
    (1, 97, 97, 2, 1, 32, False, torch.float16),
    (1, 129, 129, 2, 2, 128, True, torch.float16),
    (1, 129, 129, 4, 1, 32, True, torch.float32),
    (1, 40, 40, 2, 1, 96, True, torch.float32),
    (1, 33, 33, 2, 2, 96, False, torch.float16),
    (2, 29, 29, 4, 2, 16, True, torch.float32),  # head_dim 16: small test models (e.g. test_model_kernels)
    (1, 18, 18, 2, 1, 16, False, torch.float16),
]


@pytest.mark.parametrize("b,sq,sk,h,hk,d,causal,dtype", CASES)
def test_matches_fp64_reference(b, sq, sk, h, hk, d, causal, dtype):
    check_against_ref(*_make(b, sq, sk, h, hk, d, dtype), causal)


@pytest.mark.parametrize(
    "sq,sk,causal,dtype",
    # seqlen_k - seqlen_q = -30, 47, -2, 14, -17, 39 (and 12 non-causal): tiles cut the causal diagonal
    # at many offsets, including one key past a tile edge, which off-by-one loop bounds would get wrong.
    [
        (50, 20, True, torch.float32),
        (20, 67, True, torch.float16),
        (34, 32, True, torch.float32),
        (20, 34, True, torch.float32),
        (64, 47, True, torch.float16),
        (1, 40, True, torch.float32),
        (33, 45, False, torch.float32),
    ],
)
def test_unequal_lengths_bottom_right(sq, sk, causal, dtype):
    check_against_ref(*_make(2, sq, sk, 4, 2, 32, dtype), causal)


def test_fully_masked_rows_are_zero():
    # causal with sq > sk: query i sees keys j <= i - (sq - sk); the first sq - sk rows see nothing.
    q, k, v = _make(1, 40, 9, 2, 1, 32, torch.float32)
    out, lse, dq, dk, dv = check_against_ref(q, k, v, True)
    empty = 40 - 9
    assert torch.all(out[:, :empty] == 0) and torch.all(dq[:, :empty] == 0)
    assert torch.all(lse[:, :, :empty] == float("-inf")) and torch.isfinite(lse[:, :, empty:]).all()
    assert out[:, empty:].abs().sum() > 0


@pytest.mark.parametrize("layout", ["packed", "odd"])
def test_strided_inputs(layout):
    q, k, v = _make(2, 37, 37, 4, 2, 32, torch.float16 if layout == "packed" else torch.float32, layout=layout)
    assert not (q.is_contiguous() or k.is_contiguous() or v.is_contiguous())
    check_against_ref(q, k, v, True)


def test_lse_gradient_and_custom_scale():
    check_against_ref(*_make(1, 45, 45, 4, 2, 64, torch.float32), True, lse_grad=True, scale=0.3)


def test_backends_agree():
    q, k, v = _make(2, 23, 23, 4, 2, 32, torch.float32)
    ref = attention(q, k, v, backend="ref")
    for backend in ("triton", "sdpa", "auto"):
        torch.testing.assert_close(attention(q, k, v, backend=backend), ref, atol=1e-5, rtol=1e-5)
    # sdpa with bottom-right alignment and fully masked rows: zeros, no NaN, also in the backward.
    q, k, v = (t.requires_grad_() for t in _make(1, 30, 12, 2, 1, 32, torch.float32))
    out = attention(q, k, v, backend="sdpa")
    torch.testing.assert_close(out, attention_ref(q, k, v), atol=1e-5, rtol=1e-5)
    out.sum().backward()
    assert all(torch.isfinite(t.grad).all() for t in (q, k, v))
    assert torch.all(q.grad[:, :18] == 0)


def test_backward_is_deterministic():
    q, k, v = _make(1, 50, 50, 4, 1, 32, torch.float32)
    do = torch.randn(q.shape, dtype=torch.float64)
    first = _run(lambda q, k, v: attention(q, k, v, backend="triton", return_lse=True), q, k, v, do, None)
    second = _run(lambda q, k, v: attention(q, k, v, backend="triton", return_lse=True), q, k, v, do, None)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_other_tile_shapes(monkeypatch):
    # Square 16x16 tiles and BLOCK_M > BLOCK_N by 4x: the loop splits must hold for any table entry.
    c = cfg_mod._c
    for cfg in (
        cfg_mod._Cands(c((16, 16, 4, 1)), c((16, 16, 4, 1)), c((16, 16, 4, 1)), 16),
        cfg_mod._Cands(c((64, 16, 4, 1)), c((16, 64, 4, 1)), c((64, 16, 4, 1)), 64),
    ):
        monkeypatch.setattr(cfg_mod, "_INTERPRET_CANDS", cfg)
        check_against_ref(*_make(1, 70, 70, 2, 1, 32, torch.float32), True)
        check_against_ref(*_make(1, 70, 29, 2, 2, 32, torch.float32), True)


def test_model_attention_layer_triton_matches_ref():
    # The model's own path: packed wqkv projection, strided q/k/v views, RoPE, GQA, then attention.
    import dataclasses

    from fastgrow.config import ModelConfig
    from fastgrow.model import Attention, rope_tables

    cfg = ModelConfig(dim=64, n_heads=2, n_kv_heads=1, attn_backend="ref")
    layer = Attention(cfg)
    cos, sin = rope_tables(cfg.head_dim, 24, cfg.rope_theta)
    x = torch.randn(2, 24, cfg.dim)
    grads = {}
    for backend in ("ref", "triton"):
        layer.cfg = dataclasses.replace(cfg, attn_backend=backend)
        layer.zero_grad()
        out = layer(x, cos, sin)
        out.square().sum().backward()
        grads[backend] = (out.detach(), layer.wqkv.weight.grad.clone(), layer.wo.weight.grad.clone())
    for a, b in zip(grads["triton"], grads["ref"]):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_torch_compile_fullgraph():
    # The Triton path must trace without graph breaks (custom ops inside the autograd.Function) and give
    # the eager results, LSE gradient included.
    q, k, v = (t.requires_grad_() for t in _make(1, 20, 20, 2, 1, 32, torch.float32, layout="packed"))

    def loss(q, k, v):
        out, lse = attention(q, k, v, backend="triton", return_lse=True)
        return out.square().sum() + lse.sum()

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    eager = torch.autograd.grad(loss(q, k, v), (q, k, v))
    traced = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for a, b in zip(traced, eager):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_empty_batch():
    q, k, v = (t.requires_grad_() for t in _make(0, 5, 5, 2, 1, 32, torch.float32))
    out, lse = attention(q, k, v, backend="triton", return_lse=True)
    assert out.shape == q.shape and lse.shape == (0, 2, 5)
    out.sum().backward()
    assert q.grad.shape == q.shape


def test_validation_errors():
    q, k, v = _make(1, 8, 8, 4, 2, 32, torch.float32)
    with pytest.raises(ValueError, match="head_dim"):
        attention(*_make(1, 8, 8, 2, 2, 80, torch.float32), backend="triton")
    with pytest.raises(ValueError, match="divide"):
        attention(q, *_make(1, 8, 8, 3, 3, 32, torch.float32)[1:], backend="triton")
    with pytest.raises(ValueError, match="dtype"):
        attention(q, k.half(), v.half())
    with pytest.raises(ValueError, match="batch, seq, heads, head_dim"):
        attention(q[0], k, v)
    with pytest.raises(ValueError, match="same shape"):
        attention(q, k, v[:, :4])
    with pytest.raises(ValueError, match="same head_dim"):
        attention(q, k[..., :16], v[..., :16])
    with pytest.raises(ValueError, match="batch size"):
        attention(q, torch.cat([k, k]), torch.cat([v, v]))
    with pytest.raises(ValueError, match="one device"):
        attention(q, k.to("meta"), v)
    with pytest.raises(ValueError, match="float32, float16 or bfloat16"):
        attention(q.long(), k, v)
    with pytest.raises(ValueError, match="backend"):
        attention(q, k, v, backend="cudnn")
    with pytest.raises(ValueError, match="sequence length 0"):
        attention(q, k[:, :0], v[:, :0], backend="triton")
    with pytest.raises(ValueError, match="softmax_scale"):
        attention(q, k, v, softmax_scale=float("nan"))
    with pytest.raises(ValueError, match="return_lse"):
        attention(q, k, v, backend="sdpa", return_lse=True)
    if interpreter_enabled():
        with pytest.raises(ValueError, match="interpreter"):
            attention(q.bfloat16(), k.bfloat16(), v.bfloat16(), backend="triton")
    with pytest.raises(ValueError, match="flash_attn"):
        attention(q, k, v, backend="flash_attn")  # CPU fp32


def test_auto_falls_back_to_sdpa_outside_triton_envelope():
    q, k, v = _make(1, 9, 9, 2, 1, 80, torch.float32)  # head_dim 80: no Triton kernel
    torch.testing.assert_close(attention(q, k, v), attention_ref(q, k, v), atol=1e-5, rtol=1e-5)
    qb, kb, vb = (t.bfloat16() for t in _make(1, 9, 9, 2, 1, 32, torch.float32))
    torch.testing.assert_close(attention(qb, kb, vb), attention(qb, kb, vb, backend="sdpa"), atol=0, rtol=0)


# Compiles the real kernels for an H100 (sm_90a) without a GPU, in a child process with the interpreter
# off (tools/attention_sm90_report.py): catches what only the compiler rejects (constexpr misuse, type
# clashes between branches, shared memory overflow) and checks that the main loops stay software-
# pipelined and on Hopper wgmma. hd 96 covers the padded head dim with the hd-128 tiles.
@pytest.mark.slow
def test_kernels_compile_for_sm90():
    try:
        import triton.backends.nvidia  # noqa: F401
    except ImportError:
        pytest.skip("triton has no NVIDIA backend here")
    tool = Path(__file__).resolve().parents[1] / "tools" / "attention_sm90_report.py"
    env = dict(os.environ, TRITON_INTERPRET="0")
    res = subprocess.run(
        [sys.executable, str(tool), "--head-dims", "96", "--fallback-only"],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stderr[-3000:]
    lines = [line for line in res.stdout.splitlines() if line.startswith("hd")]
    assert len(lines) == 3, res.stdout
    for line in lines:
        assert "pipelined=True" in line and "wgmma=True" in line, line
        smem_kb = int(line.split(" KB smem")[0].rsplit(" ", 1)[1])
        assert smem_kb <= 227, line


# ----------------------------------------------------------------------------------------------------
# GPU tests (tools/gpu_check.sh). They need the compiled kernels, not the interpreter: run them with
# TRITON_INTERPRET=0 (tests/conftest.py defaults it to 1).
# ----------------------------------------------------------------------------------------------------
needs_compiled = pytest.mark.skipif(
    interpreter_enabled(), reason="GPU attention tests need TRITON_INTERPRET=0 (compiled kernels)"
)


def _gpu_check_vs_ref(q, k, v, causal):
    """bf16/fp16 on GPU: fp32 reference, same-dtype SDPA error as the yardstick."""
    dtype = q.dtype
    do = torch.randn(q.shape, dtype=torch.float32, device=q.device)
    ours = _run(lambda q, k, v: attention(q, k, v, causal, backend="triton", return_lse=True), q, k, v, do, None)
    ref = _run(
        lambda q, k, v: attention_ref(q, k, v, causal, return_lse=True),
        *(t.float() for t in (q, k, v)),
        do,
        None,
    )
    sdpa = _run(lambda q, k, v: (attention(q, k, v, causal, backend="sdpa"), ref[1]), q, k, v, do.to(dtype), None)
    _compare(ours, ref, sdpa, dtype)


@pytest.mark.gpu
@needs_compiled
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("seq,h,hk", [(4096, 8, 2), (8192, 4, 4)])
def test_gpu_bf16_long(seq, h, hk, d):
    _gpu_check_vs_ref(*_make(1, seq, seq, h, hk, d, torch.bfloat16, "cuda"), True)


@pytest.mark.gpu
@needs_compiled
@pytest.mark.parametrize(
    "b,sq,sk,h,hk,d,causal,dtype,layout",
    [
        (2, 1000, 1000, 8, 8, 96, True, torch.bfloat16, "contiguous"),
        (2, 1023, 1023, 8, 2, 128, True, torch.bfloat16, "packed"),
        (3, 257, 257, 4, 1, 64, False, torch.float16, "odd"),
        (2, 300, 1025, 4, 2, 128, True, torch.float16, "contiguous"),
        (2, 1025, 300, 4, 2, 32, True, torch.bfloat16, "contiguous"),
        (2, 1, 1, 4, 2, 64, True, torch.bfloat16, "contiguous"),
    ],
)
def test_gpu_shapes(b, sq, sk, h, hk, d, causal, dtype, layout):
    _gpu_check_vs_ref(*_make(b, sq, sk, h, hk, d, dtype, "cuda", layout), causal)


@pytest.mark.gpu
@needs_compiled
def test_gpu_fp32_exact_path():
    check_against_ref(*_make(2, 300, 300, 4, 2, 64, torch.float32, "cuda"), True)


@pytest.mark.gpu
@needs_compiled
def test_gpu_backward_deterministic_50_runs():
    q, k, v = (t.requires_grad_() for t in _make(2, 2048, 2048, 8, 2, 128, torch.bfloat16, "cuda"))
    out = attention(q, k, v, backend="triton")
    do = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
    for _ in range(49):
        again = torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
        assert all(torch.equal(a, b) for a, b in zip(first, again))


@pytest.mark.gpu
@needs_compiled
def test_gpu_matches_sdpa_mha_causal():
    q, k, v = _make(4, 2048, 2048, 16, 16, 64, torch.bfloat16, "cuda")
    out = attention(q, k, v, backend="triton")
    ref = attention(q, k, v, backend="sdpa")
    assert (out.float() - ref.float()).abs().max().item() < 2e-2
    assert math.isfinite(out.float().sum().item())


@pytest.mark.gpu
@needs_compiled
def test_gpu_lse_gradient_fp16():
    check_against_ref(*_make(2, 777, 777, 8, 2, 64, torch.float16, "cuda"), True, lse_grad=True)


@pytest.mark.gpu
@needs_compiled
def test_gpu_torch_compile_fullgraph_inductor():
    q, k, v = (t.requires_grad_() for t in _make(2, 512, 512, 8, 2, 128, torch.bfloat16, "cuda", "packed"))

    def loss(q, k, v):
        return attention(q, k, v, backend="triton").float().square().sum()

    compiled = torch.compile(loss, fullgraph=True)
    eager = torch.autograd.grad(loss(q, k, v), (q, k, v))
    traced = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    for a, b in zip(traced, eager):
        torch.testing.assert_close(a, b, atol=2e-2, rtol=2e-2)


def test_grid_limit_batch_times_heads():
    # batch * heads beyond CUDA's grid-y limit: auto falls back to SDPA, triton says why it cannot run.
    q = torch.randn(65536, 1, 1, 32)
    out = attention(q, q, q, causal=True)
    assert out.shape == q.shape
    with pytest.raises(ValueError, match="grid-y limit"):
        attention(q, q, q, causal=True, backend="triton")


def test_auto_backend_routing():
    # fp32 on CUDA goes to SDPA (the exact-fp32 tiles spill); 16-bit on CUDA inside the envelope to Triton.
    auto = attn_mod.auto_backend
    assert auto("cuda", torch.float32, 64, 16, True) == "sdpa"
    assert auto("cuda", torch.bfloat16, 64, 16, True) == "triton"
    assert auto("cuda", torch.float16, 128, 16, True) == "triton"
    assert auto("cuda", torch.bfloat16, 80, 16, True) == "sdpa"  # head dim outside the envelope
    assert auto("cuda", torch.bfloat16, 64, 70000, True) == "sdpa"  # grid-y limit
    assert auto("cpu", torch.float32, 64, 16, True) == "triton"  # the interpreter
    assert auto("cpu", torch.bfloat16, 64, 16, True) == "sdpa"
    assert auto("cpu", torch.float32, 64, 16, False) == "sdpa"


@pytest.mark.gpu
@needs_compiled
def test_gpu_fp32_auto_is_sdpa():
    q, k, v = _make(2, 300, 300, 4, 2, 64, torch.float32, "cuda")
    assert torch.equal(attention(q, k, v), attention(q, k, v, backend="sdpa"))


def test_gqa_split_choice():
    # Enough programs: no split. Too few: the smallest divisor of the group that fills the SMs, else all.
    split = attn_mod.gqa_split
    cuda = torch.device("cpu")  # persistent_programs() is 4 on CPU
    assert split(1, 1, 1, 1, cuda) == 1  # MHA never splits
    assert split(2, 2, 8, 1, cuda) == 1  # 4 programs already
    assert split(1, 1, 8, 1, cuda) == 4
    assert split(1, 1, 6, 1, cuda) == 6  # 4 does not divide 6: the next divisor that fills
    assert split(1, 1, 3, 1, cuda) == 3  # the whole group when nothing fills
    assert split(1, 2, 2, 1, cuda) == 2


@pytest.mark.parametrize("causal", [True, False])
def test_gqa_split_matches_unsplit(monkeypatch, causal):
    # MQA at batch 1: the dK/dV pass splits the 4-head group over programs (fp32 partials summed in a fixed
    # order). It must give the unsplit pass's gradients (to fp32 rounding) and stay deterministic.
    q, k, v = _make(1, 37, 37, 4, 1, 32, torch.float32)
    do = torch.randn(q.shape, dtype=torch.float64)
    fn = lambda q, k, v: attention(q, k, v, causal, backend="triton", return_lse=True)  # noqa: E731
    assert attn_mod.gqa_split(1, 1, 4, 2, q.device) == 2
    split = _run(fn, q, k, v, do, None)
    assert all(torch.equal(a, b) for a, b in zip(split, _run(fn, q, k, v, do, None)))
    monkeypatch.setattr(attn_mod, "persistent_programs", lambda device: 1)
    unsplit = _run(fn, q, k, v, do, None)
    for a, b in zip(split, unsplit):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    check_against_ref(q, k, v, causal)  # and against fp64 with the split on (default programs = 4)


def test_dkdv_int32_offset_guard():
    # A long KV sequence whose contiguous dK/dV (b, sk, hk, d) would overflow int32 offsets inside one
    # (batch, head) slice, while q and the (stride-0, expanded) k/v inputs themselves are fine.
    q = torch.randn(1, 1, 8, 128)
    k = torch.zeros(1, 1, 8, 128).expand(1, 2**21 + 1, 8, 128)
    with pytest.raises(ValueError, match="dK/dV"):
        attention(q, k, k, backend="triton")
    assert cfg_mod._offset_problem(q, k, k) is not None
    assert cfg_mod._offset_problem(q, k[:, :100], k[:, :100]) is None


@pytest.mark.parametrize("small_hd", [True, False])
def test_every_gpu_candidate_tile_shape_is_correct(monkeypatch, small_hd):
    # The tuner may pick any candidate of the GPU tables: run each one's tile shapes (warps/stages do not
    # change the interpreter's math) at a length that crosses several of its blocks, causal with GQA.
    cands = cfg_mod.GPU_CANDIDATES[(False, small_hd)]
    d = 64 if small_hd else 96  # 96: the padded head dim of the hd-128 tiles
    for i in range(max(len(cands.fwd), len(cands.dkdv), len(cands.dq))):
        pick = [c[min(i, len(c) - 1)] for c in (cands.fwd, cands.dkdv, cands.dq)]
        one = cfg_mod._Cands(*((p,) for p in pick), cands.pre_block_m)
        monkeypatch.setattr(cfg_mod, "_INTERPRET_CANDS", one)
        check_against_ref(*_make(1, 150, 150, 2, 1, d, torch.float32), True)


@pytest.mark.gpu
@needs_compiled
def test_gpu_mqa_group_split_matches_reference():
    # MQA at batch 1, 16 query heads on one KV head: the dK/dV pass splits the group across programs.
    q, k, v = _make(1, 2048, 2048, 16, 1, 128, torch.bfloat16, "cuda")
    assert attn_mod.gqa_split(1, 1, 16, 2048 // 128, q.device) > 1
    _gpu_check_vs_ref(q, k, v, True)
