"""A checkpoint's run config against the config of the run that resumes it.

Everything a resume must agree on is in the run config; `RESUME_MUTABLE` lists the fields that may
change (logging, devices, paths, the step budget). A resume whose config differs in any other field is
refused with every differing field named (`resume_config`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from fastgrow.config import ConfigError, RunConfig, growth_from_legacy

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
