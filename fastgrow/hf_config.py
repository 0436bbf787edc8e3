"""Hugging Face `config.json` of a LlamaForCausalLM <-> fastgrow's ModelConfig.

We write `rope_theta` at the top level (what transformers 4.x reads) *and*
`rope_parameters = {"rope_type": "default", "rope_theta": ...}` (what transformers 5.x reads), and
`torch_dtype` (read by both). On import every field that would change the function and that we do not
implement (biases, tied embeddings, RoPE scaling, partial rotary, head_dim != dim / heads, activations
other than SiLU, quantized weights, other architectures) is rejected with an HFConversionError (a
ValueError) naming it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastgrow.config import ConfigError, ModelConfig

HF_ARCHITECTURE = "LlamaForCausalLM"
# transformers' LlamaConfig defaults, used for fields a config.json leaves out.
_HF_DEFAULTS: dict[str, Any] = {
    "hidden_act": "silu",
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "attention_bias": False,
    "mlp_bias": False,
    "initializer_range": 0.02,
}


class HFConversionError(ValueError):
    """A Hugging Face config or state dict cannot be converted; the message names the field or key."""


def hf_config(
    cfg: ModelConfig,
    *,
    bos_id: int | None,
    eos_id: int | None,
    torch_dtype: str = "float32",
) -> dict[str, Any]:
    """The `config.json` of a LlamaForCausalLM with fastgrow model `cfg`'s architecture."""
    for name, tid in (("bos_id", bos_id), ("eos_id", eos_id)):
        if tid is not None and not (isinstance(tid, int) and 0 <= tid < cfg.vocab_size):
            raise ValueError(f"{name} must be None or a token id in [0, {cfg.vocab_size}), got {tid!r}")
    if torch_dtype not in ("float32", "bfloat16", "float16"):
        raise ValueError(f"torch_dtype must be float32, bfloat16 or float16, got {torch_dtype!r}")
    return {
        "architectures": [HF_ARCHITECTURE],
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "initializer_range": cfg.init_std,
        "rms_norm_eps": cfg.norm_eps,
        "rope_theta": float(cfg.rope_theta),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        "tie_word_embeddings": False,
        "attention_bias": False,
        "attention_dropout": 0.0,
        "mlp_bias": False,
        "pretraining_tp": 1,
        "use_cache": True,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,
        "torch_dtype": torch_dtype,
    }


def _as_dict(config: Mapping[str, Any] | Any) -> dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    if hasattr(config, "to_dict"):  # a transformers PretrainedConfig
        return dict(config.to_dict())
    raise HFConversionError(f"expected a config.json dict or a transformers config, got {type(config).__name__}")


def _positive_int(c: dict[str, Any], key: str) -> int:
    if key not in c or c[key] is None:
        raise HFConversionError(f"config.json: required field {key!r} is missing")
    v = c[key]
    if isinstance(v, bool) or not isinstance(v, int) or v <= 0:
        raise HFConversionError(f"config.json: {key} must be a positive integer, got {v!r}")
    return v


def _rope_theta(c: dict[str, Any]) -> float:
    """RoPE base from `rope_parameters` (transformers 5) or `rope_theta` (4.x); only plain RoPE."""
    top_theta = c.get("rope_theta")
    scaling = c.get("rope_scaling")
    params = c.get("rope_parameters")
    if scaling is not None and params is not None and scaling != params:
        raise HFConversionError("config.json: both rope_scaling and rope_parameters are set and differ")
    rp = params if params is not None else scaling
    theta = top_theta
    if rp is not None:
        if not isinstance(rp, Mapping):
            raise HFConversionError(f"config.json: rope_parameters must be a dict, got {rp!r}")
        field = "rope_parameters" if params is not None else "rope_scaling"
        rope_type = rp.get("rope_type", rp.get("type", "default"))
        if rope_type != "default":
            raise HFConversionError(
                f"config.json: {field}.rope_type={rope_type!r} is not supported (fastgrow implements only "
                "the default, unscaled RoPE)"
            )
        if "rope_theta" in rp and rp["rope_theta"] is not None:
            if top_theta is not None and float(top_theta) != float(rp["rope_theta"]):
                raise HFConversionError(
                    f"config.json: rope_theta ({top_theta}) and {field}.rope_theta ({rp['rope_theta']}) "
                    "disagree (transformers 4.x and 5.x would build different models)"
                )
            theta = rp["rope_theta"]
        prf = rp.get("partial_rotary_factor", 1.0)
        if prf is not None and float(prf) != 1.0:
            raise HFConversionError(f"config.json: {field}.partial_rotary_factor={prf} is not supported")
    if theta is None:
        theta = _HF_DEFAULTS["rope_theta"]
    if isinstance(theta, bool) or not isinstance(theta, (int, float)) or theta <= 0:
        raise HFConversionError(f"config.json: rope_theta must be a positive number, got {theta!r}")
    return float(theta)


def model_config_from_hf(config: Mapping[str, Any] | Any) -> ModelConfig:
    """The fastgrow ModelConfig of a LlamaForCausalLM `config.json` dict (or transformers config).

    Raises HFConversionError (a ValueError) naming the field for any variant fastgrow does not compute
    exactly the same way.
    """
    c = _as_dict(config)
    model_type = c.get("model_type")
    archs = c.get("architectures")
    if model_type is None and archs is None:
        raise HFConversionError("config.json: neither model_type nor architectures is set (need a llama model)")
    if model_type is not None and model_type != "llama":
        raise HFConversionError(f"config.json: model_type={model_type!r} is not supported (need 'llama')")
    if archs is not None and list(archs) != [HF_ARCHITECTURE]:
        raise HFConversionError(f"config.json: architectures={archs!r} is not supported (need [{HF_ARCHITECTURE!r}])")
    for key in ("attention_bias", "mlp_bias", "tie_word_embeddings"):
        v = c.get(key, _HF_DEFAULTS[key])
        if v:
            what = "biases" if key.endswith("bias") else "tied input/output embeddings"
            raise HFConversionError(f"config.json: {key}={v!r} is not supported (fastgrow has no {what})")
    act = c.get("hidden_act", _HF_DEFAULTS["hidden_act"])
    if act != "silu":
        raise HFConversionError(f"config.json: hidden_act={act!r} is not supported (fastgrow's MLP is SwiGLU/silu)")
    if c.get("quantization_config"):
        raise HFConversionError("config.json: quantization_config is set; only unquantized weights can be imported")
    prf = c.get("partial_rotary_factor")
    if prf is not None and float(prf) != 1.0:
        raise HFConversionError(f"config.json: partial_rotary_factor={prf} is not supported")

    dim = _positive_int(c, "hidden_size")
    n_heads = _positive_int(c, "num_attention_heads")
    n_kv = c.get("num_key_value_heads")
    n_kv = n_heads if n_kv is None else _positive_int(c, "num_key_value_heads")
    if dim % n_heads:
        raise HFConversionError(f"config.json: hidden_size ({dim}) is not divisible by num_attention_heads ({n_heads})")
    head_dim = c.get("head_dim")
    if head_dim is not None and head_dim != dim // n_heads:
        raise HFConversionError(
            f"config.json: head_dim={head_dim} is not supported (fastgrow needs head_dim = hidden_size / "
            f"num_attention_heads = {dim // n_heads})"
        )
    if n_heads % n_kv:
        raise HFConversionError(
            f"config.json: num_key_value_heads ({n_kv}) must divide num_attention_heads ({n_heads})"
        )
    eps = c.get("rms_norm_eps", _HF_DEFAULTS["rms_norm_eps"])
    init = c.get("initializer_range") or _HF_DEFAULTS["initializer_range"]
    max_pos = c.get("max_position_embeddings")
    max_pos = (
        _HF_DEFAULTS["max_position_embeddings"] if max_pos is None else _positive_int(c, "max_position_embeddings")
    )
    try:
        return ModelConfig(
            vocab_size=_positive_int(c, "vocab_size"),
            dim=dim,
            n_layers=_positive_int(c, "num_hidden_layers"),
            n_heads=n_heads,
            n_kv_heads=n_kv,
            ffn_dim=_positive_int(c, "intermediate_size"),
            max_seq_len=max_pos,
            rope_theta=_rope_theta(c),
            norm_eps=float(eps),
            init_std=float(init),
        )
    except ConfigError as e:
        raise HFConversionError(f"config.json: unsupported model ({e})") from None
