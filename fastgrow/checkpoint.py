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
        manifest.json          written LAST: the layout ("single") and every file with its size and sha256

A checkpoint is written into `step-N.tmp-<random>`, each file fsynced, the manifest last, then the
directory is renamed to `step-N` and the parent fsynced. Only directories named `step-N` (no `.tmp-`)
that hold a manifest count as complete, so a process killed mid-write leaves the previous checkpoint
as the newest complete one. The newest `keep` complete checkpoints are kept.

Deleting is the same protocol backwards: a checkpoint is first renamed to `step-N.del-<random>` (and the
parent fsynced), then removed, so a process killed while pruning never leaves a `step-N` that looks
complete but is not. `.del-` and `.tmp-` leftovers are never listed; `clean_leftovers` (run by the lock
holder) removes them.

Verification (`verify_checkpoint`) is strict: the manifest's layout names the files its loader reads
(`LAYOUTS`); each must be listed, present, of the listed size and sha256, and inside the folder. The
sharded layout of distributed runs registers itself in `LAYOUTS` the same way. Manifests written before
layouts existed have no "layout" key and are read as "single".
"""

from __future__ import annotations

import base64
import json
import os
import re
import secrets
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from fastgrow import __version__
from fastgrow.config import ConfigError, ModelConfig, RunConfig, growth_from_legacy
from fastgrow.fsutil import (
    IOFailure,
    contained_path,
    fsync_dir,
    fsync_file,
    io_cause,
    io_errors,
    is_io_error,
    sha256_file,
    write_json_durable,
)
from fastgrow.model import Transformer
from fastgrow.optim import LRSchedule, build_optimizer
from fastgrow.state import TrainState

FORMAT_VERSION = 1
_STEP_RE = re.compile(r"^step-(\d+)$")
# Leftovers: a write that was killed (`step-N.tmp-*`) or a delete that was killed (`step-N.del-*`).
_LEFTOVER_RE = re.compile(r"^step-\d+\.(tmp|del)-")
MANIFEST = "manifest.json"
STATE = "state.json"
# Keys of state.json that load_checkpoint reads (the others are optional or informational).
STATE_KEYS = ("format_version", "step", "tokens", "cursor", "schedule", "growth_history", "config", "model_config")


@dataclass(frozen=True)
class Layout:
    """The files a checkpoint layout's loader reads. Every `required` file must be listed in the manifest;
    an `optional` file is read when present, so when present it must be listed too; names matching
    `pattern` (e.g. per-rank shards) may be listed as well. Anything else listed is an error."""

    name: str
    required: tuple[str, ...]
    optional: tuple[str, ...] = ()
    pattern: str | None = None

    def allows(self, name: str) -> bool:
        return name in self.required or name in self.optional or bool(self.pattern and re.fullmatch(self.pattern, name))


# The single-process layout, and the sharded layout of distributed runs (fastgrow.checkpoint_dcp: DCP's
# index and one data file per rank; checkpoint_dcp.check_listing also requires every file under dcp/).
LAYOUTS: dict[str, Layout] = {
    "single": Layout(
        "single", ("model.safetensors", "optimizer.safetensors", STATE), ("tokenizer.json", "learn.safetensors")
    ),
    "dcp": Layout("dcp", (STATE, "dcp/.metadata"), ("tokenizer.json",), pattern=r"dcp/__\d+_\d+\.distcp"),
}
DEFAULT_LAYOUT = "single"  # manifests written before the "layout" key existed

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
    "train.parallel",  # a checkpoint resumes at any world size, sharded or not
    "train.dist_timeout",
}


class CheckpointError(RuntimeError):
    """A checkpoint is missing, incomplete or corrupt; the message names the file."""


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


def step_dirs(run_dir: str | Path) -> list[Path]:
    """Every `step-N` directory of `run_dir`, complete or not, oldest first (leftovers excluded)."""
    d = Path(run_dir)
    if not d.is_dir():
        return []
    found = []
    for child in d.iterdir():
        m = _STEP_RE.match(child.name)
        if m and child.is_dir():
            found.append((int(m.group(1)), child))
    return [p for _, p in sorted(found)]


def list_checkpoints(run_dir: str | Path) -> list[Path]:
    """Complete checkpoints in `run_dir` (named step-N, with a manifest), oldest first."""
    return [p for p in step_dirs(run_dir) if (p / MANIFEST).is_file()]


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    ckpts = list_checkpoints(run_dir)
    return ckpts[-1] if ckpts else None


def step_of(ckpt: str | Path) -> int:
    m = _STEP_RE.match(Path(ckpt).name)
    if not m:
        raise ValueError(f"{ckpt} is not a checkpoint folder name (step-N)")
    return int(m.group(1))


def clean_leftovers(run_dir: str | Path) -> list[str]:
    """Remove the `step-N.tmp-*` / `step-N.del-*` folders of killed writes and deletes; return their names.
    Only the holder of the run's lock may call this: another process's write in progress is a `.tmp-`."""
    d = Path(run_dir)
    if not d.is_dir():
        return []
    gone = []
    for child in d.iterdir():
        if _LEFTOVER_RE.match(child.name) and child.is_dir() and not child.is_symlink():
            shutil.rmtree(child, ignore_errors=True)
            gone.append(child.name)
    return sorted(gone)


def remove_checkpoint(ckpt: Path) -> None:
    """Delete a checkpoint folder so that no crash can leave it looking complete: rename it to a `.del-`
    name first (made durable), then remove it."""
    doomed = ckpt.with_name(f"{ckpt.name}.del-{secrets.token_hex(4)}")
    with io_errors("remove checkpoint", ckpt):
        os.replace(ckpt, doomed)
        fsync_dir(ckpt.parent)
    shutil.rmtree(doomed, ignore_errors=True)


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
    if keep < 2:
        raise ValueError(f"keep must be >= 2 so a crash during a write leaves a good checkpoint, got {keep}")
    run = Path(run_dir)
    final = run / f"step-{state.step:08d}"
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


def checkpoint_io_failure(e: BaseException, final: Path) -> BaseException:
    """What a failed write of checkpoint `final` raises: an I/O error becomes one IOFailure line naming the
    checkpoint, the cause and the newest complete checkpoint; anything else is raised as it is."""
    if isinstance(e, Exception) and is_io_error(e) and not isinstance(e, IOFailure):
        newest = latest_checkpoint(final.parent)
        where = f"the newest complete checkpoint is {newest}" if newest else "no complete checkpoint exists"
        return IOFailure(f"cannot write checkpoint {final}: {io_cause(e)}; {where}", getattr(e, "errno", None))
    return e


def new_checkpoint_dir(final: Path) -> Path:
    """The temporary directory `<final>.tmp-<random>` a checkpoint is written into."""
    tmp = Path(tempfile.mkdtemp(prefix=f"{final.name}.tmp-", dir=final.parent))
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp makes 0700; a checkpoint should be as readable as any dir
    return tmp


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


def commit_checkpoint(
    tmp: Path, final: Path, step: int, layout: str, hashed: dict[str, dict[str, Any]] | None = None
) -> None:
    """Manifest last (every file under `tmp`, sizes and sha256; `hashed`: entries already fsynced and
    hashed elsewhere, e.g. by the rank that wrote them), then rename `tmp` to `final`, fsyncing both."""
    hashed = hashed or {}
    files = {}
    for f in sorted(tmp.rglob("*")):
        if not f.is_file():
            continue
        rel = f.relative_to(tmp).as_posix()
        if rel in hashed:
            files[rel] = hashed[rel]
            continue
        fsync_file(f)
        files[rel] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    manifest = {"format_version": FORMAT_VERSION, "layout": layout, "step": step, "files": files}
    write_json_durable(tmp / MANIFEST, manifest)
    for d in sorted({f.parent for f in tmp.rglob("*")} | {tmp}, key=lambda x: -len(x.parts)):
        fsync_dir(d)
    if final.exists():  # an earlier checkpoint of the same step (e.g. re-saved after a resume)
        remove_checkpoint(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def prune_checkpoints(run: Path, keep: int) -> None:
    """Keep the newest `keep` complete checkpoints; remove older step folders (complete or damaged) and
    the leftovers of killed writes/deletes."""
    complete = list_checkpoints(run)
    if len(complete) > keep:
        oldest_kept = step_of(complete[-keep])
        for old in step_dirs(run):
            if step_of(old) < oldest_kept:
                remove_checkpoint(old)
    clean_leftovers(run)


# --- load ------------------------------------------------------------------------------------------------


def resolve_checkpoint(path: str | Path) -> Path:
    """A step directory as given, or the newest checkpoint of a run directory. A newest step folder that
    is incomplete is an error naming the newest complete one (never a silent fall back to it)."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path not found: {p}")
    if (p / MANIFEST).is_file():
        return p
    if _STEP_RE.match(p.name) or ".tmp-" in p.name or ".del-" in p.name:
        raise CheckpointError(f"{p} is an incomplete checkpoint (no {MANIFEST}); it was not fully written")
    dirs = step_dirs(p)
    if not dirs:
        raise FileNotFoundError(f"no complete checkpoint (step-N/{MANIFEST}) in {p}")
    newest = dirs[-1]
    if not (newest / MANIFEST).is_file():
        older = latest_checkpoint(p)
        hint = f"the newest complete one is {older}; pass that folder" if older else "no complete one exists"
        raise CheckpointError(f"the newest checkpoint {newest} is incomplete (no {MANIFEST}); {hint}")
    return newest


def _read_json(path: Path, what: str) -> dict[str, Any]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise CheckpointError(f"{path}: missing") from None
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable {what} ({io_cause(e)})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}: invalid JSON in the {what} ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: the {what} is not a JSON object")
    return obj


def read_manifest(ckpt: Path) -> dict[str, Any]:
    """The manifest, checked for shape: a known layout listing every file its loader reads, each with an
    integer size and a sha256, each name inside the folder."""
    path = ckpt / MANIFEST
    manifest = _read_json(path, "manifest")
    name = manifest.get("layout", DEFAULT_LAYOUT)
    layout = LAYOUTS.get(name) if isinstance(name, str) else None
    if layout is None:
        raise CheckpointError(f"{path}: unknown checkpoint layout {name!r} (this fastgrow reads {sorted(LAYOUTS)})")
    files = manifest.get("files")
    if not isinstance(files, dict) or not files:
        raise CheckpointError(f"{path}: lists no files (a complete checkpoint lists {', '.join(layout.required)})")
    for fname, info in files.items():
        try:
            contained_path(ckpt, fname, str(path))
        except ValueError as e:
            raise CheckpointError(str(e)) from None
        if not layout.allows(fname):
            raise CheckpointError(f"{path}: lists {fname!r}, which is not a file of the {layout.name!r} layout")
        ok = isinstance(info, dict) and isinstance(info.get("bytes"), int) and isinstance(info.get("sha256"), str)
        if not ok:
            raise CheckpointError(f"{path}: entry {fname!r} needs integer 'bytes' and string 'sha256', got {info!r}")
    missing = [f for f in layout.required if f not in files]
    if missing:
        raise CheckpointError(
            f"{path}: does not list {', '.join(missing)} (every file the loader reads must be listed and checked)"
        )
    unlisted = [f for f in layout.optional if f not in files and (ckpt / f).exists()]
    if unlisted:
        raise CheckpointError(f"{path}: {', '.join(unlisted)} is present but not listed (it would be read unchecked)")
    m = _STEP_RE.match(ckpt.name)
    if m and "step" in manifest and manifest["step"] != int(m.group(1)):
        raise CheckpointError(f"{path}: step {manifest['step']!r} does not match the folder name {ckpt.name}")
    return manifest


def checkpoint_layout(manifest: dict[str, Any]) -> str:
    """The manifest's layout: "single" (one process's safetensors files; also manifests written before
    layouts existed) or "dcp" (sharded, fastgrow.checkpoint_dcp)."""
    return manifest.get("layout", DEFAULT_LAYOUT)


def verify_file(ckpt: Path, name: str, info: dict[str, Any]) -> None:
    """One listed file: present, of the listed size and sha256."""
    f = ckpt / name
    if not f.is_file():
        raise CheckpointError(f"{f}: listed in the manifest but missing")
    try:
        good = f.stat().st_size == info["bytes"] and sha256_file(f) == info["sha256"]
    except OSError as e:
        raise CheckpointError(f"{f}: unreadable ({io_cause(e)})") from None
    if not good:
        raise CheckpointError(f"{f}: checksum mismatch (the checkpoint is corrupt)")


def verify_checkpoint(ckpt: Path) -> dict[str, Any]:
    """Check the manifest (`read_manifest`), every file it lists (size and sha256) and state.json's keys
    (`read_state`); return the manifest."""
    ckpt = Path(ckpt)
    manifest = read_manifest(ckpt)
    if checkpoint_layout(manifest) == "dcp":
        from fastgrow.checkpoint_dcp import check_listing

        check_listing(ckpt, manifest)
    for name, info in manifest["files"].items():
        verify_file(ckpt, name, info)
    read_state(ckpt)
    return manifest


def read_state(ckpt: Path) -> dict[str, Any]:
    """state.json with the keys the loader needs (a missing one is a CheckpointError naming the file)."""
    path = Path(ckpt) / STATE
    meta = _read_json(path, "training state")
    missing = [k for k in STATE_KEYS if k not in meta]
    if missing:
        raise CheckpointError(f"{path}: missing key{'s' if len(missing) > 1 else ''} {', '.join(map(repr, missing))}")
    if meta["format_version"] != FORMAT_VERSION:
        raise CheckpointError(f"{path}: unsupported checkpoint format {meta['format_version']!r}")
    return meta


def read_meta(path: str | Path) -> dict[str, Any]:
    return read_state(resolve_checkpoint(path))


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


def resume_config(meta: dict[str, Any], config: RunConfig | None, ckpt: Path) -> RunConfig:
    """The run config a loaded state carries: `config` if it agrees with the checkpoint's (ConfigError
    naming every field that may not change), else the checkpoint's own."""
    saved_cfg = meta["config"]
    if config is None:
        return RunConfig.from_dict(saved_cfg)
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
    return config


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
