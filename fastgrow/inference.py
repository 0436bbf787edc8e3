"""Load a checkpoint's model for inference (generate, eval): weights only, no optimizer state.

`load_model(path, device)` takes a step directory or a run directory (its newest complete checkpoint),
verifies the checkpoint's checksums, and returns the model in eval mode with the run's config. Loading
the weights alone costs a third of what resuming costs (Adam keeps two more copies of every parameter).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from fastgrow.checkpoint import CheckpointError, load_checkpoint, resolve_checkpoint, verify_checkpoint
from fastgrow.config import ModelConfig, RunConfig
from fastgrow.errors import option_error
from fastgrow.model import Transformer

EOS_TOKEN = "<|endoftext|>"  # what `fastgrow prepare` trains its tokenizers with (fastgrow.data.EOS_TOKEN)


@dataclass
class LoadedModel:
    model: Transformer
    config: RunConfig  # the run's config, as saved in the checkpoint
    checkpoint: Path
    meta: dict[str, Any]  # the checkpoint's state.json

    @property
    def step(self) -> int:
        return int(self.meta["step"])


def load_model(path: str | Path, device: torch.device | str = "cpu") -> LoadedModel:
    """The model of a checkpoint (step dir, or a run dir's newest), on `device`, in eval mode."""
    from safetensors.torch import load_file

    ckpt = resolve_checkpoint(path)
    manifest = verify_checkpoint(ckpt)
    meta = json.loads((ckpt / "state.json").read_text())
    cfg = RunConfig.from_dict(meta["config"])
    dev = torch.device(device)
    weights_file = ckpt / "model.safetensors"
    if manifest.get("layout", "single") != "single" or not weights_file.is_file():
        # Another checkpoint layout (e.g. sharded): let the full loader assemble it.
        model = load_checkpoint(ckpt, dev, verify=False, restore_rng=False).model
    else:
        model_cfg = ModelConfig(
            **meta["model_config"], attn_backend=cfg.model.attn_backend, kernel_impl=cfg.model.kernel_impl
        )
        with torch.device("meta"):
            model = Transformer(model_cfg)  # no init: every parameter comes from the file
        model = model.to_empty(device=dev)
        weights = load_file(str(weights_file), device=str(dev))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise CheckpointError(f"{ckpt}: weights do not match the model (missing {missing}, extra {unexpected})")
        _reset_buffers(model)  # buffers (the RoPE tables) are not saved: recompute them
    model.eval()
    return LoadedModel(model=model, config=cfg, checkpoint=ckpt, meta=meta)


def _reset_buffers(model: Transformer) -> None:
    from fastgrow.model import rope_tables

    cfg = model.cfg
    cos, sin = rope_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta)
    model.rope_cos = cos.to(model.rope_cos.device)
    model.rope_sin = sin.to(model.rope_sin.device)


def find_tokenizer(loaded: LoadedModel, explicit: str | Path | None = None) -> Path:
    """The run's tokenizer.json: `explicit`, else the checkpoint's copy, else the one in data.data_dir."""
    if explicit is not None:
        p = Path(explicit)
        if not p.is_file():
            raise FileNotFoundError(f"tokenizer file not found: {p}")
        return p
    candidates = [loaded.checkpoint / "tokenizer.json"]
    data_meta = Path(loaded.config.data.data_dir) / "meta.json"
    if data_meta.is_file():
        name = json.loads(data_meta.read_text()).get("tokenizer", {}).get("file", "tokenizer.json")
        candidates.append(data_meta.parent / name)
    for c in candidates:
        if c.is_file():
            return c
    raise option_error(
        FileNotFoundError,
        lambda o: (
            f"no tokenizer for {loaded.checkpoint}: it holds no tokenizer.json and the run's data directory "
            f"{loaded.config.data.data_dir} has none; pass {o}"
        ),
        "tokenizer=PATH",
        "--tokenizer FILE",
    )
