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
