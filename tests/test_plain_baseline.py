import torch

from bench.plain_llama import PlainLlama
from fastgrow.config import ModelConfig
from fastgrow.model import Transformer


def test_plain_pytorch_baseline_computes_the_same_function():
    cfg = ModelConfig(vocab_size=101, dim=48, n_layers=2, n_heads=6, n_kv_heads=3, ffn_dim=72, max_seq_len=32)
    ours = Transformer(cfg).eval()
    plain = PlainLlama(cfg).eval()
    plain.load_state_dict(ours.state_dict())
    x = torch.randint(0, 101, (2, 23))
    with torch.no_grad():
        torch.testing.assert_close(plain(x), ours(x), rtol=1e-4, atol=1e-4)
