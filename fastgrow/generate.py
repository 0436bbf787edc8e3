"""Sampling from a trained model with a KV cache: `fastgrow generate RUN_OR_CKPT --prompt TEXT`.

Decoding runs the prompt through the model once (prefill), then feeds one token per step; each layer's
keys and values are kept in a `KVCache`, so a step costs one token's matmuls plus attention over the
cache, and n new tokens cost O(n) matmul work instead of the O(n^2) of re-running the whole sequence.

`forward_cached` walks the same modules as `Transformer.forward` (same weights, same kernels: RMSNorm,
the fused residual add + norm, SwiGLU, `fastgrow.kernels.attention`), with RoPE at the tokens' absolute
positions and attention over the cached keys (bottom-right causal alignment, so a chunk of new tokens
sees the whole cache and itself causally). tests/test_generate.py checks it against the uncached
full-sequence logits.

Sampling: temperature 0 is greedy; otherwise softmax(logits / temperature), optionally restricted to the
top_k logits, drawn from a torch.Generator seeded by `seed` (the same seed gives the same text on the same
device). Generation stops at the tokenizer's end-of-text token unless `stop_at_eos=False`.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from fastgrow import kernels
from fastgrow.config import ModelConfig
from fastgrow.model import Transformer, _attn_backend, _kernel_impl, apply_rope


class KVCache:
    """Keys and values of every layer, [n_layers, batch, max_len, n_kv_heads, head_dim], filled up to `length`."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int) -> None:
        if max_len > cfg.max_seq_len:
            raise ValueError(f"a cache of {max_len} positions exceeds the model's max_seq_len {cfg.max_seq_len}")
        self.shape = (cfg.n_layers, batch, max_len, cfg.n_kv_heads, cfg.head_dim)
        self.max_len = max_len
        self.length = 0
        # Allocated at the first write, in the keys' dtype and device (bf16 under autocast on CUDA).
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    def write(self, layer: int, start: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store layer `layer`'s keys/values for positions start.. and return all of them up to there."""
        if self.k is None:
            self.k = torch.empty(self.shape, device=k.device, dtype=k.dtype)
            self.v = torch.empty(self.shape, device=v.device, dtype=v.dtype)
        end = start + k.shape[1]
        self.k[layer, :, start:end] = k
        self.v[layer, :, start:end] = v
        return self.k[layer, :, :end], self.v[layer, :, :end]


@torch.no_grad()
def forward_cached(model: Transformer, tokens: torch.Tensor, cache: KVCache, last_only: bool = False) -> torch.Tensor:
    """Logits (batch, s, vocab) of `tokens` (batch, s) placed after the `cache.length` cached positions;
    appends their keys/values to the cache. last_only: the logits of the last position only (batch, 1,
    vocab), what decoding needs (a prompt's other positions would cost an s x vocab output matmul)."""
    cfg = model.cfg
    b, s = tokens.shape
    start, end = cache.length, cache.length + s
    if end > cache.max_len:
        raise ValueError(f"{end} positions exceed the cache's {cache.max_len}")
    x = model.tok_embeddings(tokens)
    impl, backend = _kernel_impl(cfg, x), _attn_backend(cfg, x)
    cos, sin = model.rope_cos[start:end], model.rope_sin[start:end]
    h, hk, hd, eps = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim, cfg.norm_eps
    for i, layer in enumerate(model.layers):
        a_in = kernels.rms_norm(x, layer.attn_norm.weight, eps, impl=impl)
        q, k, v = layer.attn.wqkv(a_in).view(b, s, h + 2 * hk, hd).split([h, hk, hk], dim=2)
        keys, values = cache.write(i, start, apply_rope(k, cos, sin), v)
        q = apply_rope(q, cos, sin)
        out = kernels.attention(q, keys, values, causal=True, backend=backend)
        a = layer.attn.wo(out.reshape(b, s, h * hd))
        hidden, y = kernels.add_rms_norm(a, x, layer.mlp_norm.weight, eps, impl=impl)
        x = hidden + layer.mlp(y)
    cache.length = end
    if last_only:
        x = x[:, -1:]
    x = kernels.rms_norm(x, model.norm.weight, eps, impl=impl)
    return model.output(x)


def sample_next(
    logits: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None
) -> torch.Tensor:
    """One token id per row of `logits` (batch, vocab)."""
    if temperature == 0:
        return logits.argmax(dim=-1)
    logits = logits.float() / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


def generate_ids(
    model: Transformer,
    prompt: list[int],
    max_new_tokens: int,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    seed: int | None = None,
    eos_id: int | None = None,
    num_samples: int = 1,
    autocast=None,
) -> list[list[int]]:
    """New token ids (prompt excluded) for each of `num_samples` samples; a sample ends at `eos_id`
    (not included) or after `max_new_tokens`."""
    cfg = model.cfg
    if not prompt:
        raise ValueError("the prompt is empty (and the tokenizer has no end-of-text token to start from)")
    if max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    total = len(prompt) + max_new_tokens
    if total > cfg.max_seq_len:
        raise ValueError(
            f"the prompt ({len(prompt)} tokens) plus {max_new_tokens} new tokens is {total} positions, more than "
            f"the model's max_seq_len {cfg.max_seq_len}; shorten the prompt or ask for fewer tokens"
        )
    device = next(model.parameters()).device
    generator = None
    if seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    with torch.no_grad(), autocast if autocast is not None else contextlib.nullcontext():
        tokens = torch.tensor([prompt] * num_samples, dtype=torch.long, device=device)
        cache = KVCache(cfg, num_samples, total)
        logits = forward_cached(model, tokens, cache, last_only=True)[:, -1]
        out = torch.empty((num_samples, max_new_tokens), dtype=torch.long, device=device)
        done = torch.zeros(num_samples, dtype=torch.bool, device=device)
        n = 0
        for n in range(1, max_new_tokens + 1):
            nxt = sample_next(logits, temperature, top_k, generator)
            if eos_id is not None:
                nxt = nxt.masked_fill(done, eos_id)
                done |= nxt == eos_id
            out[:, n - 1] = nxt
            if (eos_id is not None and bool(done.all())) or n == max_new_tokens:
                break
            logits = forward_cached(model, nxt[:, None], cache)[:, -1]
    rows = out[:, :n].tolist()
    if eos_id is not None:
        rows = [r[: r.index(eos_id)] if eos_id in r else r for r in rows]
    return rows


@dataclass
class Generation:
    texts: list[str]
    prompt_tokens: int
    new_tokens: list[int]
    seconds: float
    checkpoint: Path


def generate_text(
    path: str | Path,
    prompt: str,
    max_new_tokens: int = 100,
    *,
    temperature: float = 0.8,
    top_k: int | None = 200,
    seed: int | None = None,
    num_samples: int = 1,
    device: str = "auto",
    tokenizer: str | Path | None = None,
    stop_at_eos: bool = True,
) -> Generation:
    """Load the checkpoint at `path` (a step dir or a run dir) and continue `prompt` with its tokenizer.

    The prompt is encoded after the end-of-text token (when the tokenizer has one), as a document start
    looks in the training stream. Returns the prompt plus each sample's continuation, decoded."""
    from tokenizers import Tokenizer

    from fastgrow.inference import EOS_TOKEN, find_tokenizer, load_model
    from fastgrow.state import resolve_device
    from fastgrow.train_base import autocast  # the run's compute dtype policy, the same as in training

    dev = resolve_device(device, what="device")
    loaded = load_model(path, dev)
    tok = Tokenizer.from_file(str(find_tokenizer(loaded, tokenizer)))
    eos_id = tok.token_to_id(EOS_TOKEN)
    ids = ([eos_id] if eos_id is not None else []) + tok.encode(prompt, add_special_tokens=False).ids
    if ids and max(ids) >= loaded.model.cfg.vocab_size:
        vocab = loaded.model.cfg.vocab_size
        raise ValueError(f"the tokenizer produced id {max(ids)} but the model's vocabulary has only {vocab} ids")
    t0 = time.perf_counter()
    rows = generate_ids(
        loaded.model,
        ids,
        max_new_tokens,
        temperature=temperature,
        top_k=top_k,
        seed=seed,
        eos_id=eos_id if stop_at_eos else None,
        num_samples=num_samples,
        autocast=autocast(loaded.config, dev),
    )
    seconds = time.perf_counter() - t0
    # Decode prompt and continuation together: a character's bytes may straddle the two.
    texts = [tok.decode(ids + r, skip_special_tokens=True) for r in rows]
    return Generation(texts, len(ids), [len(r) for r in rows], seconds, loaded.checkpoint)
