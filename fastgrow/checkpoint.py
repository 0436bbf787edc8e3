"""Crash-safe checkpoints of a whole TrainState.

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
        manifest.json          written LAST: every file with its size and sha256

A checkpoint is written into `step-N.tmp-<random>`, each file fsynced, the manifest last, then the
directory is renamed to `step-N` and the parent fsynced. Only directories named `step-N` (no `.tmp-`)
that hold a manifest count as complete, so a process killed mid-write leaves the previous checkpoint
as the newest complete one. The newest `keep` complete checkpoints are kept.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fastgrow import __version__
from fastgrow.config import ConfigError, ModelConfig, RunConfig, growth_from_legacy
from fastgrow.fsutil import fsync_dir, fsync_file, sha256_file, write_json_durable
from fastgrow.model import Transformer
from fastgrow.optim import LRSchedule, build_optimizer
from fastgrow.state import TrainState

FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step-(\d+)$")
MANIFEST = "manifest.json"

# Run-config fields that may change between a run and its resume: they affect logging, speed or where
# things are, not the optimisation trajectory.
RESUME_MUTABLE = {
    "model.attn_backend",
    "model.kernel_impl",
    "data.data_dir",
    "train.device",
    "train.max_steps",  # extends/shortens a run: the schedule's horizon follows it (see load_checkpoint)
    "train.compile",
    "train.out_dir",
    "train.log_every",
    "train.eval_every",
    "train.eval_batches",
    "train.ckpt_every",
    "train.keep_ckpts",
    "train.max_bad_steps",
    "train.progress",
    "train.tensorboard",
    "train.wandb",
    "train.wandb_project",
}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names the file."""


# --- small file helpers ------------------------------------------------------------------------------


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


# --- listing ---------------------------------------------------------------------------------------------


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `run_dir` (named step-N, with a manifest), oldest first."""
    d = Path(run_dir)
    if not d.is_dir():
        return []
    found = []
    for child in d.iterdir():
        m = _STEP_RE.match(child.name)
        if m and child.is_dir() and (child / MANIFEST).is_file():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


# --- save ------------------------------------------------------------------------------------------------


def save_checkpoint(
    state: TrainState, run_dir: str | Path, keep: int = 2, *, tokenizer: str | Path | None = None
) -> Path:
    """Write `state` as `run_dir/step-<step>` atomically; keep the newest `keep` (>= 2) checkpoints."""
    if keep < 2:
        raise ValueError(f"keep must be >= 2 so a crash during a write leaves a good checkpoint, got {keep}")
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    final = run / f"step-{state.step:08d}"
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=run))
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a checkpoint should be as readable as any dir
        weights = {n: t.detach().contiguous() for n, t in state.model.state_dict().items()}
        save_file(weights, str(tmp / "model.safetensors"))
        save_file(optimizer_tensors(state), str(tmp / "optimizer.safetensors"))
        if state.learn is not None:
            save_file(state.learn.state_tensors(), str(tmp / "learn.safetensors"))
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
        }
        if state.learn is not None:
            meta["learn"] = state.learn.state_meta()
        write_json_durable(tmp / "state.json", meta)
        if tokenizer is not None and Path(tokenizer).is_file():
            shutil.copyfile(tokenizer, tmp / "tokenizer.json")
        files = {}
        for f in sorted(tmp.iterdir()):
            fsync_file(f)
            files[f.name] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
        write_json_durable(tmp / MANIFEST, {"format_version": FORMAT_VERSION, "step": state.step, "files": files})
        fsync_dir(tmp)
        if final.exists():  # an earlier checkpoint of the same step (e.g. re-saved after a resume)
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(run)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _prune(run, keep)
    return final


def _prune(run: Path, keep: int) -> None:
    ckpts = list_checkpoints(run)
    for old in ckpts[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    # Leftovers of writes that were killed: never complete, safe to remove once a newer one exists.
    for child in run.iterdir():
        if ".tmp-" in child.name and child.is_dir() and _STEP_RE.match(child.name.split(".tmp-")[0]):
            shutil.rmtree(child, ignore_errors=True)


# --- load ------------------------------------------------------------------------------------------------


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory as given, or the newest complete checkpoint of a run directory."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path not found: {p}")
    if (p / MANIFEST).is_file():
        return p
    if _STEP_RE.match(p.name) or ".tmp-" in p.name:
        raise CheckpointError(f"{p} is an incomplete checkpoint (no {MANIFEST}); it was not fully written")
    latest = latest_checkpoint(p)
    if latest is None:
        raise FileNotFoundError(f"no complete checkpoint (step-N/{MANIFEST}) in {p}")
    return latest


def verify_checkpoint(ckpt: Path) -> dict[str, Any]:
    """Check every file of the manifest (size and sha256); return the manifest."""
    try:
        manifest = json.loads((ckpt / MANIFEST).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{ckpt / MANIFEST}: unreadable manifest ({e})") from None
    for name, info in manifest.get("files", {}).items():
        f = ckpt / name
        if not f.is_file():
            raise CheckpointError(f"{f}: listed in the manifest but missing")
        if f.stat().st_size != info["bytes"] or sha256_file(f) != info["sha256"]:
            raise CheckpointError(f"{f}: checksum mismatch (the checkpoint is corrupt)")
    return manifest


def read_meta(path: str | Path) -> dict[str, Any]:
    ckpt = resolve_checkpoint(path)
    return json.loads((ckpt / "state.json").read_text())


def config_differences(saved: dict[str, Any], current: RunConfig) -> list[str]:
    """`section.key: checkpoint X vs now Y` for every field that differs and may not change on resume
    (growth stages as `growth[N].key`; an older checkpoint's single [growth] table is read as its stage)."""
    now = _stages_as_sections(current.to_dict())
    saved = _stages_as_sections({**saved, "growth": _saved_stages(saved)})
    diffs = []
    for section in sorted(set(saved) | set(now)):
        a, b = saved.get(section, {}), now.get(section, {})
        for key in sorted(set(a) | set(b)):
            name = f"{section}.{key}"
            if name in RESUME_MUTABLE:
                continue
            if a.get(key) != b.get(key):
                diffs.append(f"{name}: checkpoint {a.get(key)!r} vs now {b.get(key)!r}")
    return diffs


def _saved_stages(saved_cfg: dict[str, Any]) -> list[dict[str, Any]]:
    """The growth stages of a checkpoint's run config (a list; older checkpoints hold one table)."""
    g = saved_cfg.get("growth", [])
    try:  # normalised: every field present, as RunConfig.to_dict writes them now
        return RunConfig.from_dict({"growth": g}).to_dict()["growth"]
    except ConfigError:  # let the comparison name what differs
        return growth_from_legacy(g) if isinstance(g, dict) else list(g)


def _stages_as_sections(d: dict[str, Any]) -> dict[str, Any]:
    """growth: [s0, s1] -> sections "growth[0]", "growth[1]" (so differences name the stage)."""
    out = {k: v for k, v in d.items() if k != "growth"}
    for i, stage in enumerate(d.get("growth", [])):
        out[f"growth[{i}]"] = stage
    return out


def load_checkpoint(
    path: str | Path,
    device: torch.device | str = "cpu",
    *,
    config: RunConfig | None = None,
    verify: bool = True,
    restore_rng: bool = True,
) -> TrainState:
    """Load a TrainState. With `config`, the checkpoint's run config must agree (else ConfigError)
    and the returned state carries `config` (its mutable fields, such as logging, may differ)."""
    ckpt = resolve_checkpoint(path)
    if verify:
        verify_checkpoint(ckpt)
    meta = json.loads((ckpt / "state.json").read_text())
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{ckpt}: unsupported checkpoint format {meta.get('format_version')!r}")
    saved_cfg = meta["config"]
    if config is not None:
        diffs = config_differences(saved_cfg, config)
        auto = any(g.get("at_tokens") == "auto" for g in _saved_stages(saved_cfg))
        if auto and not meta["growth_history"] and saved_cfg["train"]["max_steps"] != config.train.max_steps:
            # "auto" growth timing is computed from the run's token budget: it would move.
            diffs.append(
                f"train.max_steps: checkpoint {saved_cfg['train']['max_steps']} vs now {config.train.max_steps} "
                '(cannot change before an at_tokens = "auto" growth event, whose timing depends on it)'
            )
        if diffs:
            raise ConfigError(f"resume config mismatch with {ckpt}: " + "; ".join(diffs))
        run_cfg = config
    else:
        run_cfg = RunConfig.from_dict(saved_cfg)
    model_cfg = ModelConfig(
        **meta["model_config"], attn_backend=run_cfg.model.attn_backend, kernel_impl=run_cfg.model.kernel_impl
    )
    dev = torch.device(device)
    model = Transformer(model_cfg).to(dev)
    weights = load_file(str(ckpt / "model.safetensors"), device=str(dev))
    missing, unexpected = model.load_state_dict(weights, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{ckpt}: weights do not match the model (missing {missing}, unexpected {unexpected})")
    optimizer = build_optimizer(model, run_cfg.train)
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
    opt_path = ckpt / "optimizer.safetensors"
    if opt_path.is_file():
        load_optimizer_tensors(state, load_file(str(opt_path), device=str(dev)))
    if meta.get("learn") is not None:
        from fastgrow.grow_learn import LearnPhase

        learn_path = ckpt / "learn.safetensors"
        if not learn_path.is_file():
            raise CheckpointError(f"{learn_path}: missing, but state.json records a G_learn phase in progress")
        state.learn = LearnPhase.restore(state, meta["learn"], load_file(str(learn_path), device=str(dev)))
    if restore_rng and "rng" in meta:
        _set_rng_state(meta["rng"])
    return state
