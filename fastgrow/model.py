"""LLaMA-style decoder: pre-norm RMSNorm, RoPE, grouped-query attention, SwiGLU MLP, untied head.

Parameter layout (what checkpoints, growth and the HF export rely on):

    tok_embeddings.weight                  [vocab, dim]
    layers.{i}.attn_norm.weight            [dim]
    layers.{i}.attn.wqkv.weight            [(n_heads + 2 * n_kv_heads) * head_dim, dim]   rows: q | k | v
    layers.{i}.attn.wo.weight              [dim, n_heads * head_dim]
    layers.{i}.mlp_norm.weight             [dim]
    layers.{i}.mlp.w13.weight              [2 * ffn_dim, dim]                              rows: gate | up
    layers.{i}.mlp.w2.weight               [dim, ffn_dim]
    norm.weight                            [dim]
    output.weight                          [vocab, dim]

Q/K/V and gate/up are packed so each is one matmul; the q/k/v views and the packed SwiGLU input are
strided slices of that output, passed to the kernels without a copy. RoPE uses the rotate-half
convention (the one Hugging Face's Llama uses), so weights export without permutation.

All normalisation, attention, SwiGLU and the loss go through `fastgrow.kernels`. Two fusions shape the
forward: each block's last residual add (stream + MLP output) is done by the next block's first
`add_rms_norm` (or the final norm's), which reads both once and writes the sum and its norm, instead of
a separate add pass followed by a norm that re-reads the sum; and the loss is a chunked linear
cross-entropy, so the [tokens, vocab] logits never exist whole during training. Under autocast the
norms and SwiGLU emit the autocast dtype directly, so no cast kernel sits between them and the matmuls,
while the residual stream stays in the parameters' dtype (fp32).
"""

from __future__ import annotations

import math

import torch
from torch import nn

from fastgrow import kernels
from fastgrow.config import ModelConfig


def rope_tables(head_dim: int, max_seq_len: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [max_seq_len, head_dim] in fp32 (frequencies repeated for the two halves)."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
    t = torch.arange(max_seq_len, dtype=torch.float64)
    freqs = torch.outer(t, inv_freq)
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos().float(), emb.sin().float()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, seq, heads, head_dim); cos/sin: (seq, head_dim). Computed in fp32, returns x.dtype."""
    xf = x.float()
    half = xf.shape[-1] // 2
    rotated = torch.cat([-xf[..., half:], xf[..., :half]], dim=-1)
    c = cos[:, None, :]
    s = sin[:, None, :]
    return (xf * c + rotated * s).to(x.dtype)


def _kernel_impl(cfg: ModelConfig, x: torch.Tensor) -> str:
    # auto: our Triton kernels on CUDA, the fp32 torch reference on CPU (also under TRITON_INTERPRET,
    # where interpreted kernels would make every CPU forward pass minutes long).
    if cfg.kernel_impl == "auto":
        return "triton" if x.is_cuda else "ref"
    return cfg.kernel_impl


def _attn_backend(cfg: ModelConfig, x: torch.Tensor) -> str:
    # auto on CUDA: the kernel library's own choice (Triton for fp16/bf16 inside its envelope, SDPA for
    # fp32, whose exact-fp32 Triton tiles spill registers); SDPA on CPU, as for the norms above.
    if cfg.attn_backend == "auto":
        return "auto" if x.is_cuda else "sdpa"
    return cfg.attn_backend


def _loss_impl(cfg: ModelConfig, x: torch.Tensor) -> str:
    # The chunked cross-entropy always chunks; only its per-row math is Triton or torch.
    return "triton" if _kernel_impl(cfg, x) == "triton" else "torch"


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        hd = cfg.head_dim
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * hd, bias=False)
        self.wo = nn.Linear(cfg.n_heads * hd, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        cfg = self.cfg
        b, s, _ = x.shape
        h, hk, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        qkv = self.wqkv(x).view(b, s, h + 2 * hk, hd)
        q, k, v = qkv.split([h, hk, hk], dim=2)  # strided views, no copy
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        out = kernels.attention(q, k, v, causal=True, backend=_attn_backend(cfg, x))
        return self.wo(out.reshape(b, s, h * hd))


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.w13 = nn.Linear(cfg.dim, 2 * cfg.ffn_dim, bias=False)
        self.w2 = nn.Linear(cfg.ffn_dim, cfg.dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(kernels.swiglu(self.w13(x), impl=_kernel_impl(self.cfg, x)))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.attn_norm = kernels.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = Attention(cfg)
        self.mlp_norm = kernels.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, pending: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x: the residual stream; pending: the previous block's MLP output, not yet added to x (None for
        the first block). Returns (h, m) with the block's output stream = h + m, left unsummed so the next
        block's first norm (or the final norm) fuses that add."""
        impl = _kernel_impl(self.cfg, x)
        eps = self.cfg.norm_eps
        if pending is None:
            y = kernels.rms_norm(x, self.attn_norm.weight, eps, impl=impl)
        else:
            x, y = kernels.add_rms_norm(pending, x, self.attn_norm.weight, eps, impl=impl)
        a = self.attn(y, cos, sin)
        # h = x + a and its norm in one pass (the fused residual kernel reads h once).
        h, y = kernels.add_rms_norm(a, x, self.mlp_norm.weight, eps, impl=impl)
        return h, self.mlp(y)


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig, *, rope: tuple[torch.Tensor, torch.Tensor] | None = None) -> None:
        """rope: the (cos, sin) tables to register as they are, instead of computing them (growth hands
        over the old model's: the head dim, max_seq_len and theta never change)."""
        super().__init__()
        self.cfg = cfg
        self.tok_embeddings = nn.Embedding(cfg.vocab_size, cfg.dim)
        self.layers = nn.ModuleList([Block(cfg) for _ in range(cfg.n_layers)])
        self.norm = kernels.RMSNorm(cfg.dim, eps=cfg.norm_eps)
        self.output = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        cos, sin = rope if rope is not None else rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    # --- initialisation -------------------------------------------------------------------------
    def init_std(self, name: str) -> float:
        """Std of the LLaMA-style init for parameter `name` (0 for norm weights, which start at 1).

        Output projections of each residual branch (attn.wo, mlp.w2) get std / sqrt(2 * n_layers),
        as in GPT-2/OLMo, so the residual stream's variance does not grow with depth.
        """
        if name.endswith("norm.weight"):
            return 0.0
        if name.endswith("attn.wo.weight") or name.endswith("mlp.w2.weight"):
            return self.cfg.init_std / math.sqrt(2 * self.cfg.n_layers)
        return self.cfg.init_std

    @torch.no_grad()
    def reset_parameters(self) -> None:
        for name, p in self.named_parameters():
            std = self.init_std(name)
            if std == 0.0:
                p.fill_(1.0)
            else:
                nn.init.normal_(p, mean=0.0, std=std)

    # --- forward --------------------------------------------------------------------------------
    def forward(self, tokens: torch.Tensor, targets: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (batch, seq) -> logits (batch, seq, vocab), or the mean cross-entropy if targets."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be (batch, seq), got shape {tuple(tokens.shape)}")
        s = tokens.shape[1]
        if s > self.cfg.max_seq_len:
            raise ValueError(f"sequence length {s} exceeds model.max_seq_len {self.cfg.max_seq_len}")
        x = self.tok_embeddings(tokens)
        cos, sin = self.rope_cos[:s], self.rope_sin[:s]
        pending = None
        for layer in self.layers:
            x, pending = layer(x, cos, sin, pending)
        return self.head(x, pending, targets)

    def head(self, x: torch.Tensor, pending: torch.Tensor | None, targets: torch.Tensor | None) -> torch.Tensor:
        """The last block's output stream x + pending (pending None: no layers) through the final norm
        and the output layer: logits, or the mean cross-entropy against targets. A method of its own so
        that it compiles as one region (fastgrow.regional)."""
        impl, eps = _kernel_impl(self.cfg, x), self.cfg.norm_eps
        if pending is None:  # no layers
            x = kernels.rms_norm(x, self.norm.weight, eps, impl=impl)
        else:
            _, x = kernels.add_rms_norm(pending, x, self.norm.weight, eps, impl=impl)
        if targets is None:
            return self.output(x)
        # Mean cross-entropy of output(x) against targets (ignore_index -100), without whole logits.
        return kernels.linear_cross_entropy(x, self.output.weight, targets, impl=_loss_impl(self.cfg, x))

    def num_params(self, include_embeddings: bool = True) -> int:
        n = sum(p.numel() for p in self.parameters())
        if not include_embeddings:
            n -= self.tok_embeddings.weight.numel() + self.output.weight.numel()
        return n


def flops_per_token(cfg: ModelConfig, seq_len: int, include_attention: bool = True) -> float:
    """Training FLOPs per token: 6 * N (all parameters except the embedding lookup, which is a gather)
    plus, if asked, causal attention 6 * n_layers * seq_len * dim (QK^T and PV, forward + backward,
    halved for the causal mask: 12 * L * S * d / 2). This is the convention MFU uses throughout."""
    n = cfg.num_params(include_embeddings=True) - cfg.vocab_size * cfg.dim
    f = 6.0 * n
    if include_attention:
        f += 6.0 * cfg.n_layers * seq_len * cfg.n_heads * cfg.head_dim
    return f
