"""The model on our Triton kernels (under the interpreter on CPU) computes what the reference path does,
forward and backward: the wiring of rms_norm / add_rms_norm / swiglu / attention inside model.py."""

import dataclasses

import pytest
import torch

from fastgrow.config import ModelConfig
from fastgrow.model import Transformer

BASE = ModelConfig(vocab_size=61, dim=32, n_layers=2, n_heads=2, n_kv_heads=1, ffn_dim=48, max_seq_len=32)


@pytest.mark.parametrize("attn_backend", ["sdpa", "triton"])
def test_triton_model_matches_reference_model(attn_backend):
    ref = Transformer(dataclasses.replace(BASE, kernel_impl="ref", attn_backend="ref"))
    tri = Transformer(dataclasses.replace(BASE, kernel_impl="triton", attn_backend=attn_backend))
    tri.load_state_dict(ref.state_dict())
    x = torch.randint(0, 61, (2, 13))
    y = torch.randint(0, 61, (2, 13))
    loss_ref = ref(x, y)
    loss_tri = tri(x, y)
    torch.testing.assert_close(loss_tri, loss_ref, rtol=1e-5, atol=1e-5)
    loss_ref.backward()
    loss_tri.backward()
    for (name, p_ref), p_tri in zip(ref.named_parameters(), tri.parameters()):
        torch.testing.assert_close(p_tri.grad, p_ref.grad, rtol=1e-4, atol=1e-5, msg=name)


def _unfused_forward(m: Transformer, tokens: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """The model's forward as it was before the residual-add and loss fusions: every block returns the
    summed stream, each norm is separate, and the loss upcasts the whole logits (the oracle)."""
    import torch.nn.functional as F
    from fastgrow.kernels import add_rms_norm_ref, rms_norm_ref

    cfg, eps = m.cfg, m.cfg.norm_eps
    x = m.tok_embeddings(tokens)
    s = tokens.shape[1]
    cos, sin = m.rope_cos[:s], m.rope_sin[:s]
    for layer in m.layers:
        a = layer.attn(rms_norm_ref(x, layer.attn_norm.weight, eps), cos, sin)
        h, y = add_rms_norm_ref(a, x, layer.mlp_norm.weight, eps)
        x = h + layer.mlp(y)
    logits = m.output(rms_norm_ref(x, m.norm.weight, eps))
    return F.cross_entropy(logits.float().view(-1, cfg.vocab_size), targets.reshape(-1))


def test_fused_residual_and_loss_compute_the_unfused_function():
    # Reference path: the fused wiring computes the same function; the logits are bit-identical (the
    # fused add is the same fp32 addition), the chunked loss equal to fp32 rounding, gradients too.
    cfg = dataclasses.replace(BASE, n_layers=3, kernel_impl="ref", attn_backend="ref")
    m = Transformer(cfg)
    x, y = torch.randint(0, 61, (2, 13)), torch.randint(0, 61, (2, 13))
    fused = m(x, y)
    fused.backward()
    g_fused = [p.grad.clone() for p in m.parameters()]
    m.zero_grad()
    unfused = _unfused_forward(m, x, y)
    unfused.backward()
    torch.testing.assert_close(fused, unfused, rtol=1e-6, atol=1e-6)
    for (name, p), g in zip(m.named_parameters(), g_fused):
        torch.testing.assert_close(g, p.grad, rtol=1e-5, atol=1e-6, msg=name)


def test_autocast_forward_matches_unfused_autocast_forward():
    # Under autocast the norms now emit bf16 themselves, which the matmuls would have cast to anyway:
    # same bf16 matmul inputs, so the loss matches the unfused autocast forward to fp32 rounding.
    cfg = dataclasses.replace(BASE, kernel_impl="ref", attn_backend="ref")
    m = Transformer(cfg)
    x, y = torch.randint(0, 61, (2, 13)), torch.randint(0, 61, (2, 13))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fused = m(x, y)
        unfused = _unfused_forward(m, x, y)
        y_norm = m.layers[0].attn_norm(m.tok_embeddings(x))
    assert y_norm.dtype == torch.bfloat16  # no fp32 activation for autocast to cast
    torch.testing.assert_close(fused, unfused, rtol=1e-5, atol=1e-5)
