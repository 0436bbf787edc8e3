import torch

from fastgrow.config import ModelConfig
from fastgrow.model import Transformer, apply_rope, flops_per_token, rope_tables

CFG = ModelConfig(vocab_size=97, dim=48, n_layers=2, n_heads=6, n_kv_heads=2, ffn_dim=80, max_seq_len=32)


def test_forward_shapes_and_loss():
    m = Transformer(CFG)
    x = torch.randint(0, 97, (3, 17))
    assert m(x).shape == (3, 17, 97)
    loss = m(x, x)
    assert loss.ndim == 0 and abs(loss.item() - torch.log(torch.tensor(97.0)).item()) < 0.5


def test_causal_future_tokens_do_not_change_the_past():
    m = Transformer(CFG).eval()
    x = torch.randint(0, 97, (2, 20))
    y = x.clone()
    y[:, 12:] = torch.randint(0, 97, (2, 8))
    with torch.no_grad():
        torch.testing.assert_close(m(x)[:, :12], m(y)[:, :12], rtol=0, atol=1e-5)


def test_sdpa_and_reference_attention_backends_agree():
    m = Transformer(CFG).eval()
    x = torch.randint(0, 97, (2, 19))
    with torch.no_grad():
        a = m(x)
        m_ref = Transformer(ModelConfig(**{**CFG.__dict__, "attn_backend": "ref"})).eval()
        m_ref.load_state_dict(m.state_dict())
        torch.testing.assert_close(a, m_ref(x), rtol=1e-4, atol=1e-4)


def test_rope_is_relative():
    # <rope(q, i), rope(k, j)> depends on i - j only.
    cos, sin = rope_tables(16, 64, 10000.0)
    q = torch.randn(1, 1, 1, 16).expand(1, 64, 1, 16)
    k = torch.randn(1, 1, 1, 16).expand(1, 64, 1, 16)
    rq, rk = apply_rope(q, cos, sin)[0, :, 0], apply_rope(k, cos, sin)[0, :, 0]
    dots = rq @ rk.T
    torch.testing.assert_close(dots[10, 3], dots[40, 33], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dots[5, 5], dots[50, 50], rtol=1e-5, atol=1e-5)


def test_init_scales_output_projections_by_depth():
    m = Transformer(ModelConfig(vocab_size=64, dim=64, n_layers=8, n_heads=4, n_kv_heads=4, ffn_dim=128))
    assert m.init_std("layers.0.attn.wo.weight") == 0.02 / 4
    assert m.init_std("layers.3.attn.wqkv.weight") == 0.02
    assert m.init_std("norm.weight") == 0.0
    assert torch.all(m.layers[0].attn_norm.weight == 1)
    assert abs(m.layers[0].mlp.w2.weight.std().item() - 0.005) < 0.001


def test_flops_per_token_convention():
    f6n = flops_per_token(CFG, 32, include_attention=False)
    f = flops_per_token(CFG, 32, include_attention=True)
    assert f6n == 6 * (CFG.num_params() - CFG.vocab_size * CFG.dim)
    assert f - f6n == 6 * CFG.n_layers * 32 * CFG.dim


def test_training_reduces_loss():
    torch.manual_seed(0)
    m = Transformer(CFG)
    opt = torch.optim.AdamW(m.parameters(), lr=3e-3)
    x = torch.randint(0, 97, (4, 16))
    first = None
    for _ in range(30):
        loss = m(x, x.roll(-1, 1))
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.5 * first
