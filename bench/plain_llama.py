"""The same LLaMA architecture written in plain PyTorch: torch.nn.RMSNorm, eager SwiGLU, SDPA.

The baseline the end-to-end benchmark compares fastgrow's kernels against. It has fastgrow's parameter
layout, so `PlainLlama(cfg).load_state_dict(Transformer(cfg).state_dict())` works and both compute the
same function (tests/test_plain_baseline.py checks it on CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from fastgrow.config import ModelConfig
from fastgrow.model import apply_rope, rope_tables


class _Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.attn_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = nn.Module()
        self.attn.wqkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * hd, bias=False)
        self.attn.wo = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)
        self.mlp_norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = nn.Module()
        self.mlp.w13 = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=False)
        self.mlp.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        b, s, _ = x.shape
        qkv = self.attn.wqkv(self.attn_norm(x)).view(b, s, c.n_heads + 2 * c.n_kv_heads, c.head_dim)
        q, k, v = qkv.split([c.n_heads, c.n_kv_heads, c.n_kv_heads], dim=2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        o = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            is_causal=True,
            enable_gqa=c.n_heads != c.n_kv_heads,
        )
        x = x + self.attn.wo(o.transpose(1, 2).reshape(b, s, -1))
        gate, up = self.mlp.w13(self.mlp_norm(x)).chunk(2, dim=-1)
        return x + self.mlp.w2(F.silu(gate) * up)


class PlainLlama(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList([_Block(cfg) for _ in range(cfg.n_layers)])
        self.norm = nn.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        s = tokens.shape[1]
        x = self.tok_embeddings(tokens)
        for layer in self.layers:
            x = layer(x, self.rope_cos[:s], self.rope_sin[:s])
        logits = self.output(self.norm(x))
        if targets is None:
            return logits
        return F.cross_entropy(logits.float().view(-1, logits.shape[-1]), targets.reshape(-1))
