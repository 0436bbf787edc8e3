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

from fastgrow.checkpoint import (
    CheckpointError,
    checkpoint_layout,
    checkpoint_model_config,
    read_state,
    resolve_checkpoint,
    verify_checkpoint,
)
from fastgrow.config import RunConfig
from fastgrow.data import EOS_TOKEN  # what `fastgrow prepare` trains its tokenizers with
from fastgrow.errors import option_error
from fastgrow.model import Transformer
from fastgrow.sharding import init_buffers

__all__ = ["EOS_TOKEN", "LoadedModel", "find_tokenizer", "load_model"]


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
    ckpt = resolve_checkpoint(path)
    manifest = verify_checkpoint(ckpt)
    meta = read_state(ckpt)
    cfg = RunConfig.from_dict(meta["config"])
    dev = torch.device(device)
    if checkpoint_layout(manifest) == "dcp":  # sharded: assembled whole in this process (no optimizer)
        from fastgrow.checkpoint_dcp import read_model_weights

        weights = {n: t.to(dev) for n, t in read_model_weights(ckpt).items()}
    else:
        from safetensors.torch import load_file

        weights = load_file(str(ckpt / "model.safetensors"), device=str(dev))
    with torch.device("meta"):
        model = Transformer(checkpoint_model_config(meta, cfg))  # no init: every parameter comes from the file
    model = model.to_empty(device=dev)
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: weights do not match the model (missing {missing}, extra {unexpected})")
    init_buffers(model)  # buffers (the RoPE tables) are not saved: recompute them
    model.eval()
    return LoadedModel(model=model, config=cfg, checkpoint=ckpt, meta=meta)


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
