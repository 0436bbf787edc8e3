"""Hugging Face interchange: fastgrow checkpoints <-> `transformers.LlamaForCausalLM` folders.

`export_checkpoint` / `export_model` write a folder that `LlamaForCausalLM.from_pretrained` and
`AutoTokenizer.from_pretrained` load offline (config.json, generation_config.json, model.safetensors and
the tokenizer files); `import_checkpoint` turns such a folder into a fastgrow checkpoint at step 0. The
config mapping lives in fastgrow.hf_config, the weight mapping in fastgrow.hf_weights; their public
names are importable from here too.

Folder I/O is written into a temporary sibling directory and renamed into place, so a crash never
leaves a half-written folder under the final name.
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

from fastgrow.config import ModelConfig, RunConfig, TrainConfig
from fastgrow.errors import option_error
from fastgrow.fsutil import IOFailure, fsync_dir, fsync_file, io_cause, io_errors, is_io_error

# Re-exported: `fastgrow.hf` is the one import for conversion users.
from fastgrow.hf_config import HF_ARCHITECTURE, HFConversionError, hf_config, model_config_from_hf  # noqa: F401
from fastgrow.hf_weights import from_hf_state_dict, load_hf_weights, to_hf_state_dict  # noqa: F401

DEFAULT_SPECIAL_TOKEN = "<|endoftext|>"


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
    with io_errors("create a folder in", out.parent):
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
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, Exception) and is_io_error(e) and not isinstance(e, IOFailure):
            raise IOFailure(f"cannot write {out}: {io_cause(e)}", getattr(e, "errno", None)) from e
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

    from fastgrow.checkpoint import checkpoint_layout, read_state, resolve_checkpoint, verify_checkpoint

    ckpt = resolve_checkpoint(ckpt_path)
    layout = checkpoint_layout(verify_checkpoint(ckpt))
    meta = read_state(ckpt)
    # The architecture of the weights as saved (after growth it differs from the run's [model]).
    cfg = ModelConfig(**meta["model_config"])
    if layout == "dcp":  # written by several ranks under torchrun: DCP reassembles the full tensors
        from fastgrow.checkpoint_dcp import read_model_weights

        weights = read_model_weights(ckpt)
    else:
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
    from fastgrow.runlock import RunLock
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
    tok = d / "tokenizer.json" if (d / "tokenizer.json").is_file() else None
    with RunLock(out_run_dir):
        return save_checkpoint(state, out_run_dir, keep=run_cfg.train.keep_ckpts, tokenizer=tok)
