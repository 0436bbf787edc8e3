"""Crash-safe checkpoints of a whole TrainState, in the one-process ("single") layout.

Layout of a run directory:

    run_dir/
      step-00000100/
        model.safetensors      weights by parameter name
        optimizer.safetensors  AdamW moments and step by parameter name ("exp_avg/<name>", ...)
        state.json             step, tokens, data cursor, RNG states, schedule, growth history, the run
                               config (what a resume must agree with) and the current model architecture
        tokenizer.json         copy of the run's tokenizer, when known (for export)
        learn.safetensors      only while G_learn trains its maps: the maps and their Adam state
                               (state.json "learn" holds the phase's settings and progress)
        manifest.json          written LAST: the layout ("single") and every file with its size and sha256

This module turns a TrainState into those files and back (`save_checkpoint`, `load_checkpoint`, which
reads every layout into one process). The pieces it is built from are shared with the sharded layout of
distributed runs (fastgrow.checkpoint_dcp):

- fastgrow.checkpoint_dirs: the write protocol (temp folder, manifest last, rename), listing, rename-first
  deletion and pruning;
- fastgrow.checkpoint_format: the layouts, the manifest and strict verification (CheckpointError);
- fastgrow.checkpoint_config: which run-config fields a resume may change.

Their public names are importable from here too.
"""

from __future__ import annotations

import base64
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fastgrow import __version__

# Re-exported: `fastgrow.checkpoint` is the one import for checkpoint users.
from fastgrow.checkpoint_config import RESUME_MUTABLE, config_differences, resume_config  # noqa: F401
from fastgrow.checkpoint_dirs import (  # noqa: F401
    checkpoint_dir,
    checkpoint_io_failure,
    clean_leftovers,
    commit_checkpoint,
    latest_checkpoint,
    list_checkpoints,
    new_checkpoint_dir,
    prune_checkpoints,
    remove_checkpoint,
    resolve_checkpoint,
    step_dirs,
    step_of,
)
from fastgrow.checkpoint_format import (  # noqa: F401
    FORMAT_VERSION,
    LAYOUTS,
    MANIFEST,
    STATE,
    CheckpointError,
    Layout,
    check_listing,
    checkpoint_layout,
    read_manifest,
    read_state,
    verify_checkpoint,
    verify_file,
)
from fastgrow.config import ModelConfig, RunConfig
from fastgrow.fsutil import write_json_durable
from fastgrow.model import Transformer
from fastgrow.optim import LRSchedule, build_optimizer
from fastgrow.state import TrainState

# --- state <-> tensors ---------------------------------------------------------------------------------


def _param_names(model: torch.nn.Module) -> dict[int, str]:
    return {id(p): n for n, p in model.named_parameters()}


def optimizer_tensors(state: TrainState) -> dict[str, torch.Tensor]:
    """AdamW state keyed `exp_avg/<param>`, `exp_avg_sq/<param>`, `step/<param>` (params with state only)."""
    names = _param_names(state.model)
    out: dict[str, torch.Tensor] = {}
    for group in state.optimizer.param_groups:
        for p in group["params"]:
            st = state.optimizer.state.get(p)
            if not st:
                continue
            n = names[id(p)]
            for key in ("exp_avg", "exp_avg_sq"):
                out[f"{key}/{n}"] = st[key].detach().contiguous()
            step = st["step"]
            out[f"step/{n}"] = (step if torch.is_tensor(step) else torch.tensor(float(step))).detach().reshape(1)
    return out


def load_optimizer_tensors(state: TrainState, tensors: dict[str, torch.Tensor]) -> None:
    """Fill `state.optimizer` (freshly built over state.model) from `optimizer_tensors` output."""
    opt = state.optimizer
    sd = opt.state_dict()
    index_to_name = {}
    names = _param_names(state.model)
    i = 0
    for group in opt.param_groups:
        for p in group["params"]:
            index_to_name[i] = names[id(p)]
            i += 1
    new_state = {}
    for idx, n in index_to_name.items():
        if f"exp_avg/{n}" not in tensors:
            continue
        new_state[idx] = {
            "step": tensors[f"step/{n}"].reshape(()).float(),
            "exp_avg": tensors[f"exp_avg/{n}"],
            "exp_avg_sq": tensors[f"exp_avg_sq/{n}"],
        }
    sd["state"] = new_state
    opt.load_state_dict(sd)


def _rng_state() -> dict[str, Any]:
    out = {"torch": base64.b64encode(torch.get_rng_state().numpy().tobytes()).decode()}
    if torch.cuda.is_available():
        out["cuda"] = [base64.b64encode(s.numpy().tobytes()).decode() for s in torch.cuda.get_rng_state_all()]
    return out


def _set_rng_state(d: dict[str, Any]) -> None:
    def dec(s: str) -> torch.Tensor:
        return torch.frombuffer(bytearray(base64.b64decode(s)), dtype=torch.uint8)

    torch.set_rng_state(dec(d["torch"]))
    if "cuda" in d and torch.cuda.is_available() and len(d["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all([dec(s) for s in d["cuda"]])


# --- save ------------------------------------------------------------------------------------------------


def save_checkpoint(
    state: TrainState,
    run_dir: str | Path,
    keep: int = 2,
    *,
    tokenizer: str | Path | None = None,
    metrics_records: int | None = None,
) -> Path:
    """Write `state` as `run_dir/step-<step>` atomically; keep the newest `keep` (>= 2) checkpoints.

    metrics_records: how many records metrics.jsonl held at this step; a resume from this checkpoint cuts
    the log back to them (the steps after it are re-logged). An I/O failure (disk full, read-only file
    system, ...) raises IOFailure naming the checkpoint, the cause and the newest complete checkpoint;
    nothing of the failed write remains."""
    final = checkpoint_dir(run_dir, state.step, keep)
    run = final.parent
    tmp: Path | None = None
    try:
        run.mkdir(parents=True, exist_ok=True)
        tmp = new_checkpoint_dir(final)
        weights = {n: t.detach().contiguous() for n, t in state.model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"))
        save_file(optimizer_tensors(state), str(tmp / "optimizer.safetensors"))
        if state.learn is not None:
            save_file(state.learn.state_tensors(), str(tmp / "learn.safetensors"))
        write_checkpoint_meta(tmp, state, tokenizer, metrics_records=metrics_records)
        commit_checkpoint(tmp, final, state.step, "single")
    except BaseException as e:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        raise checkpoint_io_failure(e, final) from e
    prune_checkpoints(run, keep)
    return final


def write_checkpoint_meta(
    tmp: Path,
    state: TrainState,
    tokenizer: str | Path | None,
    extra: dict[str, Any] | None = None,
    *,
    metrics_records: int | None = None,
) -> None:
    """state.json (everything but tensors) and the tokenizer copy, in every layout."""
    meta = {
        "format_version": FORMAT_VERSION,
        "fastgrow_version": __version__,
        "step": state.step,
        "tokens": state.tokens,
        "bad_steps": state.bad_steps,
        "cursor": state.cursor,
        "schedule": state.schedule.state_dict(),
        "growth_history": state.growth_history,
        "config": state.config.to_dict(),
        "model_config": state.model.cfg.architecture(),
        "rng": _rng_state(),
        **(extra or {}),
    }
    if state.learn is not None:
        meta["learn"] = state.learn.state_meta()
    if metrics_records is not None:
        meta["metrics_records"] = metrics_records
    write_json_durable(tmp / STATE, meta)
    if tokenizer is not None and Path(tokenizer).is_file():
        shutil.copyfile(tokenizer, tmp / "tokenizer.json")


def read_meta(path: str | Path) -> dict[str, Any]:
    return read_state(resolve_checkpoint(path))


def load_checkpoint(
    path: str | Path,
    device: torch.device | str = "cpu",
    *,
    config: RunConfig | None = None,
    verify: bool = True,
    restore_rng: bool = True,
) -> TrainState:
    """Load a TrainState (any layout, into one process). With `config`, the checkpoint's run config must
    agree (else ConfigError) and the returned state carries `config` (its mutable fields, such as
    logging, may differ)."""
    ckpt = resolve_checkpoint(path)
    manifest = verify_checkpoint(ckpt) if verify else read_manifest(ckpt)
    meta = read_state(ckpt)
    run_cfg = resume_config(meta, config, ckpt)
    dev = torch.device(device)
    model = Transformer(checkpoint_model_config(meta, run_cfg)).to(dev)
    optimizer = build_optimizer(model, run_cfg.train)
    state = state_from_meta(meta, run_cfg, model, optimizer)
    if checkpoint_layout(manifest) == "dcp":
        from fastgrow.checkpoint_dcp import load_dcp_tensors

        load_dcp_tensors(state, ckpt, meta)
    else:
        weights = load_file(str(ckpt / "model.safetensors"), device=str(dev))
        missing, unexpected = model.load_state_dict(weights, strict=False)
        if missing or unexpected:
            raise CheckpointError(
                f"{ckpt}: weights do not match the model (missing {missing}, unexpected {unexpected})"
            )
        load_optimizer_tensors(state, load_file(str(ckpt / "optimizer.safetensors"), device=str(dev)))
    if meta.get("learn") is not None:
        from fastgrow.grow_learn import LearnPhase

        learn_path = ckpt / "learn.safetensors"
        if not learn_path.is_file():
            raise CheckpointError(f"{learn_path}: missing, but state.json records a G_learn phase in progress")
        state.learn = LearnPhase.restore(state, meta["learn"], load_file(str(learn_path), device=str(dev)))
    if restore_rng:
        restore_rng_state(meta)
    return state


def checkpoint_model_config(meta: dict[str, Any], run_cfg: RunConfig) -> ModelConfig:
    """The live architecture the checkpoint holds (grown or not), with the run's kernel choices."""
    return ModelConfig(
        **meta["model_config"], attn_backend=run_cfg.model.attn_backend, kernel_impl=run_cfg.model.kernel_impl
    )


def state_from_meta(
    meta: dict[str, Any], run_cfg: RunConfig, model: Transformer, optimizer: torch.optim.AdamW
) -> TrainState:
    """A TrainState around `model`/`optimizer` with the counters, cursor, schedule and history of state.json."""
    state = TrainState(
        config=run_cfg,
        model=model,
        optimizer=optimizer,
        schedule=LRSchedule.from_state_dict(meta["schedule"]),
        step=meta["step"],
        tokens=meta["tokens"],
        cursor=meta["cursor"],
        growth_history=meta["growth_history"],
        bad_steps=meta.get("bad_steps", 0),
    )
    if state.schedule.total_steps != run_cfg.train.max_steps:
        # A resume with a new train.max_steps re-targets the decay to the new end of the run.
        state.schedule.total_steps = run_cfg.train.max_steps
    return state


def restore_rng_state(meta: dict[str, Any]) -> None:
    if "rng" in meta:
        _set_rng_state(meta["rng"])
