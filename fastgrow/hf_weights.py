"""fastgrow weights <-> LlamaForCausalLM weights, and reading a Hugging Face model folder's tensors.

fastgrow's decoder *is* the LLaMA architecture (pre-norm RMSNorm, rotate-half RoPE, GQA, SwiGLU, untied
head, no biases), so conversion is renaming plus splitting/packing, never a permutation:

    fastgrow                          Hugging Face (LlamaForCausalLM)
    tok_embeddings.weight             model.embed_tokens.weight
    layers.i.attn_norm.weight         model.layers.i.input_layernorm.weight
    layers.i.attn.wqkv.weight  rows   q | k | v  ->  model.layers.i.self_attn.{q,k,v}_proj.weight
    layers.i.attn.wo.weight           model.layers.i.self_attn.o_proj.weight
    layers.i.mlp_norm.weight          model.layers.i.post_attention_layernorm.weight
    layers.i.mlp.w13.weight    rows   gate | up  ->  model.layers.i.mlp.{gate,up}_proj.weight
    layers.i.mlp.w2.weight            model.layers.i.mlp.down_proj.weight
    norm.weight                       model.norm.weight
    output.weight                     lm_head.weight

Both RoPE implementations rotate halves (HF's `rotate_half`), both RMSNorms compute
x * rsqrt(mean(x^2) + eps) in fp32 and then scale by the weight, so in fp32 the two models compute the
same function up to summation order.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from fastgrow.config import ModelConfig
from fastgrow.hf_config import HFConversionError, model_config_from_hf

# Keys some older transformers versions stored in the state dict; derived from the config, not weights.
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


def _fastgrow_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    hd, d = cfg.head_dim, cfg.dim
    shapes: dict[str, tuple[int, ...]] = {"tok_embeddings.weight": (cfg.vocab_size, d)}
    for i in range(cfg.n_layers):
        p = f"layers.{i}."
        shapes[p + "attn_norm.weight"] = (d,)
        shapes[p + "attn.wqkv.weight"] = ((cfg.n_heads + 2 * cfg.n_kv_heads) * hd, d)
        shapes[p + "attn.wo.weight"] = (d, cfg.n_heads * hd)
        shapes[p + "mlp_norm.weight"] = (d,)
        shapes[p + "mlp.w13.weight"] = (2 * cfg.ffn_dim, d)
        shapes[p + "mlp.w2.weight"] = (d, cfg.ffn_dim)
    shapes["norm.weight"] = (d,)
    shapes["output.weight"] = (cfg.vocab_size, d)
    return shapes


def _hf_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    hd, d, f = cfg.head_dim, cfg.dim, cfg.ffn_dim
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg.vocab_size, d)}
    for i in range(cfg.n_layers):
        p = f"model.layers.{i}."
        shapes[p + "input_layernorm.weight"] = (d,)
        shapes[p + "self_attn.q_proj.weight"] = (cfg.n_heads * hd, d)
        shapes[p + "self_attn.k_proj.weight"] = (cfg.n_kv_heads * hd, d)
        shapes[p + "self_attn.v_proj.weight"] = (cfg.n_kv_heads * hd, d)
        shapes[p + "self_attn.o_proj.weight"] = (d, cfg.n_heads * hd)
        shapes[p + "post_attention_layernorm.weight"] = (d,)
        shapes[p + "mlp.gate_proj.weight"] = (f, d)
        shapes[p + "mlp.up_proj.weight"] = (f, d)
        shapes[p + "mlp.down_proj.weight"] = (d, f)
    shapes["model.norm.weight"] = (d,)
    shapes["lm_head.weight"] = (cfg.vocab_size, d)
    return shapes


def _check_keys_and_shapes(sd: Mapping[str, torch.Tensor], expected: dict[str, tuple[int, ...]], what: str) -> None:
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected]
    if missing or unexpected:
        raise HFConversionError(
            f"{what} does not match the config: missing {missing[:8]}{' ...' if len(missing) > 8 else ''}, "
            f"unexpected {unexpected[:8]}{' ...' if len(unexpected) > 8 else ''}"
        )
    for k, shape in expected.items():
        t = sd[k]
        if not torch.is_tensor(t):
            raise HFConversionError(f"{what}: {k} is not a tensor ({type(t).__name__})")
        if tuple(t.shape) != shape:
            raise HFConversionError(f"{what}: {k} has shape {tuple(t.shape)}, expected {shape}")
        if not t.is_floating_point():
            raise HFConversionError(f"{what}: {k} has dtype {t.dtype}, expected a floating-point tensor")


def to_hf_state_dict(sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """fastgrow weights (model.state_dict() layout) -> LlamaForCausalLM weights, dtype unchanged.

    Split projections are fresh contiguous tensors (safetensors refuses tensors that share storage);
    the others are detached views of the inputs.
    """
    # torch.compile (`_orig_mod.`) and DDP (`module.`) wrappers prefix the names; accept those too.
    sd = {k.removeprefix("module.").removeprefix("_orig_mod."): v for k, v in sd.items()}
    _check_keys_and_shapes(sd, _fastgrow_shapes(cfg), "fastgrow state dict")
    hd = cfg.head_dim
    q_rows, kv_rows = cfg.n_heads * hd, cfg.n_kv_heads * hd
    out: dict[str, torch.Tensor] = {"model.embed_tokens.weight": sd["tok_embeddings.weight"].detach()}
    for i in range(cfg.n_layers):
        src, dst = f"layers.{i}.", f"model.layers.{i}."
        q, k, v = sd[src + "attn.wqkv.weight"].detach().split([q_rows, kv_rows, kv_rows], dim=0)
        gate, up = sd[src + "mlp.w13.weight"].detach().split([cfg.ffn_dim, cfg.ffn_dim], dim=0)
        out[dst + "input_layernorm.weight"] = sd[src + "attn_norm.weight"].detach()
        out[dst + "self_attn.q_proj.weight"] = q.clone()
        out[dst + "self_attn.k_proj.weight"] = k.clone()
        out[dst + "self_attn.v_proj.weight"] = v.clone()
        out[dst + "self_attn.o_proj.weight"] = sd[src + "attn.wo.weight"].detach()
        out[dst + "post_attention_layernorm.weight"] = sd[src + "mlp_norm.weight"].detach()
        out[dst + "mlp.gate_proj.weight"] = gate.clone()
        out[dst + "mlp.up_proj.weight"] = up.clone()
        out[dst + "mlp.down_proj.weight"] = sd[src + "mlp.w2.weight"].detach()
    out["model.norm.weight"] = sd["norm.weight"].detach()
    out["lm_head.weight"] = sd["output.weight"].detach()
    return out


def _cat(parts: list[torch.Tensor], name: str) -> torch.Tensor:
    dtypes = {p.dtype for p in parts}
    if len(dtypes) != 1:
        raise HFConversionError(f"HF state dict: the parts packed into {name} have different dtypes {dtypes}")
    return torch.cat(parts, dim=0)


def from_hf_state_dict(
    sd: Mapping[str, torch.Tensor], hf_cfg: Mapping[str, Any] | Any
) -> tuple[ModelConfig, dict[str, torch.Tensor]]:
    """LlamaForCausalLM weights + config.json -> (fastgrow ModelConfig, fastgrow state dict).

    Dtypes are kept; renamed tensors are detached views of the inputs, packed ones are new."""
    cfg = model_config_from_hf(hf_cfg)
    sd = {k: v for k, v in sd.items() if not k.endswith(_IGNORED_HF_SUFFIXES)}
    _check_keys_and_shapes(sd, _hf_shapes(cfg), "HF state dict")
    out: dict[str, torch.Tensor] = {"tok_embeddings.weight": sd["model.embed_tokens.weight"].detach()}
    for i in range(cfg.n_layers):
        src, dst = f"model.layers.{i}.", f"layers.{i}."
        a = src + "self_attn."
        out[dst + "attn_norm.weight"] = sd[src + "input_layernorm.weight"].detach()
        out[dst + "attn.wqkv.weight"] = _cat(
            [sd[a + "q_proj.weight"], sd[a + "k_proj.weight"], sd[a + "v_proj.weight"]],
            dst + "attn.wqkv.weight",
        ).detach()
        out[dst + "attn.wo.weight"] = sd[a + "o_proj.weight"].detach()
        out[dst + "mlp_norm.weight"] = sd[src + "post_attention_layernorm.weight"].detach()
        out[dst + "mlp.w13.weight"] = _cat(
            [sd[src + "mlp.gate_proj.weight"], sd[src + "mlp.up_proj.weight"]], dst + "mlp.w13.weight"
        ).detach()
        out[dst + "mlp.w2.weight"] = sd[src + "mlp.down_proj.weight"].detach()
    out["norm.weight"] = sd["model.norm.weight"].detach()
    out["output.weight"] = sd["lm_head.weight"].detach()
    return cfg, out


def load_hf_weights(hf_dir: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF model folder: model.safetensors, sharded safetensors (with its index), or
    pytorch_model.bin (loaded with weights_only=True)."""
    from safetensors.torch import load_file

    d = Path(hf_dir)
    single = d / "model.safetensors"
    index = d / "model.safetensors.index.json"
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        sd: dict[str, torch.Tensor] = {}
        for shard in shards:
            sd.update(load_file(str(d / shard)))
        return sd
    bins = [d / "pytorch_model.bin"] if (d / "pytorch_model.bin").is_file() else []
    bin_index = d / "pytorch_model.bin.index.json"
    if not bins and bin_index.is_file():
        bins = [d / s for s in sorted(set(json.loads(bin_index.read_text())["weight_map"].values()))]
    if bins:
        sd = {}
        for b in bins:
            sd.update(torch.load(b, map_location="cpu", weights_only=True))
        return sd
    raise FileNotFoundError(
        f"{d}: no weights found (model.safetensors, model.safetensors.index.json or pytorch_model.bin)"
    )
