"""`fastgrow eval RUN_OR_CKPT`: a checkpoint's loss and perplexity on held-out tokens.

The batches are the ones training validates on: `BatchLoader.val_batches(n)` over the held-out split
(the last `data.val_fraction` of the token stream) of the run's data, with the run's seq_len and batch
size; with n = train.eval_batches (the default) the result equals the run's last logged `val_loss` at that
checkpoint. `data_dir` evaluates another prepared folder's held-out split instead; it must have been
tokenized with the run's tokenizer (checked when both tokenizer files are known).

perplexity = exp(val_loss), val_loss being the mean next-token cross-entropy in nats over the `tokens`
evaluated (every batch has the same number of tokens, so the mean of batch means is the token mean).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from fastgrow.config import ConfigError


def perplexity(loss: float) -> float:
    """exp(loss); inf where that overflows a float (a loss above ~709 nats)."""
    try:
        return math.exp(loss)
    except OverflowError:
        return float("inf")


def evaluate_checkpoint(
    path: str | Path,
    *,
    data_dir: str | Path | None = None,
    batches: int | None = None,
    device: str = "auto",
) -> dict[str, Any]:
    """Validation loss of the checkpoint at `path` (a step dir or a run dir); see the module docstring."""
    from fastgrow.fsutil import sha256_file
    from fastgrow.inference import load_model
    from fastgrow.loader import BatchLoader, TokenData
    from fastgrow.state import resolve_device
    from fastgrow.train_base import evaluate

    if batches is not None and batches < 1:
        raise ValueError(f"batches must be >= 1, got {batches}")
    dev = resolve_device(device, what="device")
    loaded = load_model(path, dev)
    cfg = loaded.config
    data = TokenData.open(data_dir if data_dir is not None else cfg.data.data_dir)
    vocab = loaded.model.cfg.vocab_size
    if data.vocab_size > vocab:
        raise ConfigError(
            f"{data.data_dir} was tokenized with {data.vocab_size} ids but the model has {vocab}: another tokenizer"
        )
    ckpt_tok = loaded.checkpoint / "tokenizer.json"
    known = data_dir is not None and ckpt_tok.is_file() and data.tokenizer_path.is_file()
    if known and sha256_file(ckpt_tok) != sha256_file(data.tokenizer_path):
        raise ConfigError(
            f"{data.data_dir} was tokenized with another tokenizer than the checkpoint's ({ckpt_tok}); "
            f"prepare it with that tokenizer (fastgrow prepare ... --tokenizer {ckpt_tok})"
        )
    n = batches if batches is not None else cfg.train.eval_batches
    loader = BatchLoader.for_run(data, cfg, "val")
    val_loss = evaluate(loaded.model, loader.val_batches(n), cfg)  # what a run validates with
    return {
        "val_loss": val_loss,
        "perplexity": perplexity(val_loss),
        "tokens": n * cfg.data.batch_size * cfg.data.seq_len,
        "checkpoint": str(loaded.checkpoint),
        "step": loaded.step,
        "data_dir": str(data.data_dir),
        "batches": n,
        "seq_len": cfg.data.seq_len,
        "batch_size": cfg.data.batch_size,
    }
