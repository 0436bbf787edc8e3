"""Hugging Face interchange: fastgrow checkpoints <-> `transformers.LlamaForCausalLM` folders.

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

Config: we write `rope_theta` at the top level (what transformers 4.x reads) *and*
`rope_parameters = {"rope_type": "default", "rope_theta": ...}` (what transformers 5.x reads), and
`torch_dtype` (read by both). On import every field that would change the function and that we do not
implement (biases, tied embeddings, RoPE scaling, partial rotary, head_dim != dim / heads, activations
other than SiLU, quantized weights, other architectures) is rejected with a ValueError naming it.

Folder I/O (`export_checkpoint`, `import_checkpoint`) is written into a temporary sibling directory and
renamed into place, so a crash never leaves a half-written folder under the final name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from fastgrow.config import ConfigError, ModelConfig, RunConfig, TrainConfig
from fastgrow.errors import option_error
from fastgrow.fsutil import fsync_dir, fsync_file

HF_ARCHITECTURE = "LlamaForCausalLM"
DEFAULT_SPECIAL_TOKEN = "<|endoftext|>"
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
# Keys some older transformers versions stored in the state dict; derived from the config, not weights.
_IGNORED_HF_SUFFIXES = ("rotary_emb.inv_freq",)


class HFConversionError(ValueError):
    """A Hugging Face config or state dict cannot be converted; the message names the field or key."""


# --- config ---------------------------------------------------------------------------------------------


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


# --- state dicts ----------------------------------------------------------------------------------------


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


# --- tokenizer files -------------------------------------------------------------------------------------


def _default_special_token(tok: Any, src: Path) -> str:
    if tok.token_to_id(DEFAULT_SPECIAL_TOKEN) is not None:
        return DEFAULT_SPECIAL_TOKEN
    specials = sorted(t.content for t in tok.get_added_tokens_decoder().values() if t.special)
    if len(specials) != 1:
        raise ValueError(
            f"{src}: no {DEFAULT_SPECIAL_TOKEN!r} token and {len(specials)} special tokens {specials[:8]}; "
            "name the EOS token to use (special_token=...)"
        )
    return specials[0]


def write_tokenizer_files(
    tokenizer_json: str | Path,
    out_dir: str | Path,
    *,
    model_max_length: int,
    special_token: str | None = None,
    vocab_size: int | None = None,
) -> dict[str, int]:
    """Copy a `tokenizers` tokenizer.json into `out_dir` with the files `AutoTokenizer` needs.

    Writes tokenizer.json (byte-for-byte), tokenizer_config.json (PreTrainedTokenizerFast, loaded
    offline without any hub lookup) and special_tokens_map.json. As in GPT-2, the one special token
    (`<|endoftext|>`, the document separator fastgrow's data preparation inserts) serves as bos, eos and
    unk; byte-level BPE never produces unk.

    special_token: None picks `<|endoftext|>` if the vocabulary has it, else the tokenizer's only
    special added token (a tokenizer.json handed to `fastgrow prepare` may use another EOS).
    vocab_size: the model's; a tokenizer with more ids than the model embeds is rejected.
    Returns {"bos_token_id": id, "eos_token_id": id}.
    """
    from tokenizers import Tokenizer  # imported here: only conversion needs it

    src = Path(tokenizer_json)
    if not src.is_file():
        raise FileNotFoundError(f"tokenizer file not found: {src}")
    try:
        tok = Tokenizer.from_file(str(src))
    except Exception as e:  # tokenizers raises a bare Exception for malformed files
        raise ValueError(f"{src}: not a valid tokenizers tokenizer.json ({e})") from None
    if special_token is None:
        special_token = _default_special_token(tok, src)
    special_id = tok.token_to_id(special_token)
    if special_id is None:
        raise ValueError(f"{src}: special token {special_token!r} is not in the tokenizer's vocabulary")
    n_ids = tok.get_vocab_size(with_added_tokens=True)
    if vocab_size is not None and n_ids > vocab_size:
        raise ValueError(f"{src}: the tokenizer has {n_ids} ids but the model's vocabulary has only {vocab_size}")
    if not (isinstance(model_max_length, int) and model_max_length > 0):
        raise ValueError(f"model_max_length must be a positive integer, got {model_max_length!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(src, out / "tokenizer.json")
    specials = {"bos_token": special_token, "eos_token": special_token, "unk_token": special_token}
    _write_json(
        out / "tokenizer_config.json",
        {
            "tokenizer_class": "PreTrainedTokenizerFast",
            **specials,
            "model_max_length": model_max_length,
            "clean_up_tokenization_spaces": False,
            "add_bos_token": False,
            "add_eos_token": False,
        },
    )
    _write_json(out / "special_tokens_map.json", specials)
    return {"bos_token_id": special_id, "eos_token_id": special_id}


# --- folders ---------------------------------------------------------------------------------------------


def _write_json(path: Path, obj: Any) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.write("\n")


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _exists(out: Path) -> FileExistsError:
    return option_error(
        FileExistsError, lambda o: f"{out} already exists; pass {o} to replace it", "overwrite=True", "--overwrite"
    )


def _publish(tmp: Path, out: Path, overwrite: bool) -> None:
    """fsync the finished temp dir and rename it to `out`; an existing `out` is replaced only with
    overwrite (moved aside first, removed after the rename, so `out` is always whole)."""
    for f in tmp.iterdir():
        fsync_file(f)
    # mkdtemp makes the folder private (0700); an exported model is meant to be read by other tools/users.
    os.chmod(tmp, 0o755)
    if out.exists():
        if not overwrite:
            raise _exists(out)
        old = out.with_name(f".{out.name}.old-{os.getpid()}")
        os.replace(out, old)
        os.replace(tmp, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, out)
    fsync_dir(out.parent)  # make the rename itself durable


def export_model(
    state_dict: Mapping[str, torch.Tensor],
    cfg: ModelConfig,
    out_dir: str | Path,
    *,
    tokenizer: str | Path | None = None,
    special_token: str | None = None,
    torch_dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """Write fastgrow weights as a LlamaForCausalLM folder (config.json, generation_config.json,
    model.safetensors, and the tokenizer files when `tokenizer` is a tokenizer.json), atomically.

    special_token: the tokenizer's EOS (also bos/unk), see `write_tokenizer_files`.
    torch_dtype: cast the weights ("float32", "bfloat16", "float16"); None keeps their dtype.
    """
    from safetensors.torch import save_file

    if torch_dtype is not None and torch_dtype not in _DTYPES:
        raise ValueError(f"torch_dtype must be one of {sorted(_DTYPES)} or None, got {torch_dtype!r}")
    out = Path(out_dir)
    if out.exists() and not overwrite:
        raise _exists(out)
    hf_sd = to_hf_state_dict(state_dict, cfg)
    if torch_dtype is not None:
        hf_sd = {k: v.to(_DTYPES[torch_dtype]) for k, v in hf_sd.items()}
    dtypes = {v.dtype for v in hf_sd.values()}
    dtype_name = {v: k for k, v in _DTYPES.items()}.get(next(iter(dtypes))) if len(dtypes) == 1 else None
    if dtype_name is None:
        raise ValueError(f"weights must share one dtype of {sorted(_DTYPES)} to export, got {dtypes}")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        ids: dict[str, int | None] = {"bos_token_id": None, "eos_token_id": None}
        if tokenizer is not None:
            ids.update(
                write_tokenizer_files(
                    tokenizer,
                    tmp,
                    model_max_length=cfg.max_seq_len,
                    special_token=special_token,
                    vocab_size=cfg.vocab_size,
                )
            )
        config = hf_config(cfg, bos_id=ids["bos_token_id"], eos_id=ids["eos_token_id"], torch_dtype=dtype_name)
        _write_json(tmp / "config.json", config)
        _write_json(
            tmp / "generation_config.json",
            {"bos_token_id": ids["bos_token_id"], "eos_token_id": ids["eos_token_id"], "do_sample": False},
        )
        save_file(
            {k: v.contiguous().cpu() for k, v in hf_sd.items()},
            str(tmp / "model.safetensors"),
            metadata={"format": "pt"},
        )
        _publish(tmp, out, overwrite)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def export_checkpoint(
    ckpt_path: str | Path,
    out_dir: str | Path,
    *,
    special_token: str | None = None,
    torch_dtype: str | None = None,
    overwrite: bool = False,
) -> Path:
    """`fastgrow export CKPT OUT_DIR`: a checkpoint (a step dir, or a run dir = its newest complete
    checkpoint) -> a LlamaForCausalLM folder, with the tokenizer if the checkpoint holds tokenizer.json."""
    from safetensors.torch import load_file

    from fastgrow.checkpoint import resolve_checkpoint, verify_checkpoint

    ckpt = resolve_checkpoint(ckpt_path)
    verify_checkpoint(ckpt)
    meta = json.loads((ckpt / "state.json").read_text())
    # The architecture of the weights as saved (after growth it differs from the run's [model]).
    cfg = ModelConfig(**meta["model_config"])
    weights = load_file(str(ckpt / "model.safetensors"))
    tok = ckpt / "tokenizer.json"
    return export_model(
        weights,
        cfg,
        out_dir,
        tokenizer=tok if tok.is_file() else None,
        special_token=special_token,
        torch_dtype=torch_dtype,
        overwrite=overwrite,
    )


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


def import_checkpoint(
    hf_dir: str | Path,
    out_run_dir: str | Path,
    *,
    train_config: TrainConfig | None = None,
    run_config: RunConfig | None = None,
) -> Path:
    """`fastgrow import HF_DIR OUT_CKPT`: a local LlamaForCausalLM folder -> a fastgrow checkpoint at
    step 0 in run dir `out_run_dir`: the weights, a fresh AdamW and schedule, the folder's tokenizer.json.

    The checkpoint's run config is `run_config` (default RunConfig()) with its [model] architecture
    replaced by the imported one (attn_backend / kernel_impl kept) and its [train] replaced by
    `train_config` when given; with neither, train.out_dir is `out_run_dir`. `fastgrow train --resume`
    checks its config against this one, so pass the config the run will continue with.
    Returns the checkpoint's step directory."""
    from fastgrow.checkpoint import latest_checkpoint, save_checkpoint
    from fastgrow.state import build_state

    d = Path(hf_dir)
    cfg_path = d / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{d}: no config.json (not a Hugging Face model folder)")
    if latest_checkpoint(out_run_dir) is not None:
        raise FileExistsError(f"{out_run_dir} already holds checkpoints; import into a new run directory")
    try:
        hf_cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as e:
        raise HFConversionError(f"{cfg_path}: invalid JSON ({e})") from None
    model_config_from_hf(hf_cfg)  # reject an unsupported config before reading gigabytes of weights
    model_cfg, sd = from_hf_state_dict(load_hf_weights(d), hf_cfg)
    base = run_config if run_config is not None else RunConfig(train=TrainConfig(out_dir=str(out_run_dir)))
    model_cfg = replace(model_cfg, attn_backend=base.model.attn_backend, kernel_impl=base.model.kernel_impl)
    run_cfg = replace(base, model=model_cfg, train=train_config if train_config is not None else base.train)
    state = build_state(run_cfg, device="cpu")
    state.model.load_state_dict(sd, strict=True)  # copies (and casts to the model's fp32) in place
    tok = d / "tokenizer.json"
    return save_checkpoint(state, out_run_dir, keep=run_cfg.train.keep_ckpts, tokenizer=tok if tok.is_file() else None)
