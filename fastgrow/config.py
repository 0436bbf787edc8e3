"""Run configuration: frozen, validated dataclasses, named presets, TOML files and CLI overrides.

A run is described by one `RunConfig` with four sections (`model`, `data`, `train`, `growth`).
Every section validates itself on construction and raises `ConfigError` (a `ValueError`) whose
message names the offending field, so a typo in a TOML file or an override fails with one clear line.

Presets (the paper's targets and the bases they grow from, Du et al. 2024 Table 1 / our choices of the
free sizes, following LLaMA/TinyLlama: head dim 64 or 128, FFN = 8/3 * dim rounded up to 256):

| name       | layers | dim  | heads | kv heads | ffn   | head dim | note                               |
|------------|--------|------|-------|----------|-------|----------|------------------------------------|
| tiny       | 8      | 128  | 4     | 2        | 384   | 32       | CPU demo/tests target (GQA 2:1)    |
| tiny-base  | 2      | 128  | 4     | 2        | 384   | 32       | tiny / 4, the demo's base          |
| 410M       | 24     | 1024 | 16    | 16       | 2816  | 64       | paper's 410M target                |
| 410M-base  | 6      | 1024 | 16    | 16       | 2816  | 64       | g = 4                              |
| 1.1B       | 24     | 2048 | 32    | 4        | 5632  | 64       | TinyLlama widths, paper's 24 layers|
| 1.1B-base  | 6      | 2048 | 32    | 4        | 5632  | 64       |                                    |
| 3B         | 32     | 2560 | 20    | 20       | 6912  | 128      | head dim 128 (80 is no kernel size)|
| 3B-base    | 8      | 2560 | 20    | 20       | 6912  | 128      |                                    |
| 7B         | 32     | 4096 | 32    | 32       | 11008 | 128      | LLaMA-7B                           |
| 7B-base    | 8      | 4096 | 32    | 32       | 11008 | 128      |                                    |

The large presets use a 32000-token vocabulary (LLaMA's); `tiny` uses 4096, what `fastgrow prepare`
trains by default.
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib


from fastgrow.errors import ConfigError
from fastgrow.growth_config import (  # noqa: F401  (re-exported: the run config's growth stages)
    DEFAULT_FACTOR,
    GROWTH_OPS,
    OPTIMIZER_POLICIES,
    SCHEDULE_POLICIES,
    WIDTH_OPS,
    GrowthConfig,
    growth_from_legacy,
)


def _check(cond: bool, msg: str) -> None:
    if not cond:
        raise ConfigError(msg)


ATTN_BACKENDS = ("auto", "triton", "sdpa", "flash_attn", "ref")
KERNEL_IMPLS = ("auto", "triton", "ref")


@dataclass(frozen=True)
class ModelConfig:
    """Architecture of a LLaMA-style decoder (pre-norm RMSNorm, RoPE, GQA, SwiGLU, untied head)."""

    vocab_size: int = 4096
    dim: int = 128
    n_layers: int = 8
    n_heads: int = 4
    n_kv_heads: int = 2
    ffn_dim: int = 384
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    init_std: float = 0.02
    # How attention / norm / SwiGLU are computed; not part of the architecture (a checkpoint trained
    # with one loads with another).
    attn_backend: str = "auto"
    kernel_impl: str = "auto"

    def __post_init__(self) -> None:
        for name in ("vocab_size", "dim", "n_heads", "n_kv_heads", "ffn_dim", "max_seq_len"):
            v = getattr(self, name)
            _check(isinstance(v, int) and v > 0, f"model.{name} must be a positive integer, got {v!r}")
        # 0 layers is a model too: embeddings, final norm and head (a base that growth fills with layers).
        _check(
            isinstance(self.n_layers, int) and self.n_layers >= 0,
            f"model.n_layers must be a non-negative integer, got {self.n_layers!r}",
        )
        _check(
            self.dim % self.n_heads == 0,
            f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})",
        )
        _check(
            self.n_heads % self.n_kv_heads == 0,
            f"model.n_kv_heads ({self.n_kv_heads}) must divide model.n_heads ({self.n_heads})",
        )
        _check(self.head_dim % 2 == 0, f"head dim dim/n_heads = {self.head_dim} must be even for RoPE")
        _check(self.rope_theta > 0, f"model.rope_theta must be > 0, got {self.rope_theta}")
        _check(0 < self.norm_eps < 1, f"model.norm_eps must be in (0, 1), got {self.norm_eps}")
        _check(self.init_std > 0, f"model.init_std must be > 0, got {self.init_std}")
        _check(
            self.attn_backend in ATTN_BACKENDS,
            f"model.attn_backend must be one of {ATTN_BACKENDS}, got {self.attn_backend!r}",
        )
        _check(
            self.kernel_impl in KERNEL_IMPLS,
            f"model.kernel_impl must be one of {KERNEL_IMPLS}, got {self.kernel_impl!r}",
        )

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    def architecture(self) -> dict[str, Any]:
        """The fields that define the weights' shapes and function (what a resume must agree on)."""
        d = dataclasses.asdict(self)
        d.pop("attn_backend")
        d.pop("kernel_impl")
        return d

    def num_params(self, include_embeddings: bool = True) -> int:
        """Parameter count, computed from the shapes (equals `sum(p.numel())` of the model)."""
        hd = self.head_dim
        attn = self.dim * (self.n_heads + 2 * self.n_kv_heads) * hd + self.n_heads * hd * self.dim
        mlp = 3 * self.dim * self.ffn_dim
        per_layer = attn + mlp + 2 * self.dim
        n = self.n_layers * per_layer + self.dim  # + final norm
        if include_embeddings:
            n += 2 * self.vocab_size * self.dim  # untied embedding and head
        return n


SCHEDULES = ("cosine", "constant", "wsd")


@dataclass(frozen=True)
class DataConfig:
    """Where the token shards are and how batches are cut from them."""

    data_dir: str = "data/stdlib"
    seq_len: int = 128
    batch_size: int = 16
    # Fraction of the tokens held out for validation (taken from the end of the token stream).
    val_fraction: float = 0.02

    def __post_init__(self) -> None:
        _check(bool(self.data_dir), "data.data_dir must not be empty")
        _check(
            isinstance(self.seq_len, int) and self.seq_len > 0,
            f"data.seq_len must be > 0, got {self.seq_len}",
        )
        _check(
            isinstance(self.batch_size, int) and self.batch_size > 0,
            f"data.batch_size must be > 0, got {self.batch_size}",
        )
        _check(0.0 < self.val_fraction < 0.5, f"data.val_fraction must be in (0, 0.5), got {self.val_fraction}")


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation, schedule, logging and checkpointing."""

    max_steps: int = 200
    lr: float = 3e-3
    min_lr: float = 3e-4
    warmup_steps: int = 20
    schedule: str = "cosine"
    # WSD: the last `decay_fraction` of the steps decay linearly to min_lr.
    decay_fraction: float = 0.2
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    grad_clip: float = 1.0
    grad_accum: int = 1
    seed: int = 1337
    device: str = "auto"
    dtype: str = "auto"  # auto: bf16 autocast on CUDA, fp32 on CPU
    compile: bool = False
    out_dir: str = "runs/default"
    log_every: int = 10
    eval_every: int = 100
    eval_batches: int = 8
    ckpt_every: int = 100
    keep_ckpts: int = 2
    # Abort after this many non-finite steps in a row (each one is skipped without touching Adam).
    max_bad_steps: int = 5
    # Console: a progress bar when stderr is a terminal, else (or when false) one line per log step.
    progress: bool = True
    # Optional loggers beside metrics.jsonl (extras: pip install "fastgrow[tensorboard]" / "fastgrow[wandb]").
    tensorboard: bool = False
    wandb: bool = False
    wandb_project: str = "fastgrow"

    def __post_init__(self) -> None:
        _check(self.max_steps > 0, f"train.max_steps must be > 0, got {self.max_steps}")
        _check(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        _check(0 <= self.min_lr <= self.lr, f"train.min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        _check(self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        _check(self.schedule in SCHEDULES, f"train.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        _check(0 < self.decay_fraction <= 1, f"train.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        _check(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1 and train.beta2 must be in [0, 1)")
        _check(self.eps > 0, f"train.eps must be > 0, got {self.eps}")
        _check(self.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        _check(self.grad_accum >= 1, f"train.grad_accum must be >= 1, got {self.grad_accum}")
        _check(self.dtype in ("auto", "fp32", "bf16"), f"train.dtype must be auto|fp32|bf16, got {self.dtype!r}")
        _check(self.log_every >= 1, f"train.log_every must be >= 1, got {self.log_every}")
        _check(self.eval_every >= 0, f"train.eval_every must be >= 0 (0 disables), got {self.eval_every}")
        _check(self.eval_batches >= 1, f"train.eval_batches must be >= 1, got {self.eval_batches}")
        _check(self.ckpt_every >= 0, f"train.ckpt_every must be >= 0 (0 disables), got {self.ckpt_every}")
        _check(self.keep_ckpts >= 2, f"train.keep_ckpts must be >= 2, got {self.keep_ckpts}")
        _check(self.max_bad_steps >= 1, f"train.max_bad_steps must be >= 1, got {self.max_bad_steps}")


def _stage_error(i: int, e: ConfigError) -> ConfigError:
    """Name the stage in a GrowthConfig message: `growth.factor ...` -> `growth[1].factor ...`."""
    return ConfigError(re.sub(r"\bgrowth\.", f"growth[{i}].", str(e)))


def _build_stages(values: Any) -> tuple[GrowthConfig, ...]:
    if isinstance(values, dict):
        values = growth_from_legacy(values)
    if not isinstance(values, (list, tuple)):
        raise ConfigError(f"config section growth must be a list of stage tables, got {type(values).__name__}")
    stages = []
    for i, v in enumerate(values):
        if isinstance(v, GrowthConfig):
            stages.append(v)
            continue
        if not isinstance(v, dict):
            raise ConfigError(f"growth[{i}] must be a table, got {type(v).__name__}")
        try:
            stages.append(_build(GrowthConfig, v, "growth"))
        except ConfigError as e:
            raise _stage_error(i, e) from None
    return tuple(stages)


@dataclass(frozen=True)
class RunConfig:
    """model is the base the run starts from; growth its stages, in increasing token order (empty: no
    growth). Stage N is resolved against the model stage N-1 produced (fastgrow.stages checks the chain
    at the start of a run)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    growth: tuple[GrowthConfig, ...] = ()

    def __post_init__(self) -> None:
        stages = self.growth
        if isinstance(stages, GrowthConfig):
            stages = (stages,)
        if isinstance(stages, list):
            stages = tuple(stages)
        _check(
            isinstance(stages, tuple) and all(isinstance(g, GrowthConfig) for g in stages),
            f"RunConfig.growth must be a tuple of GrowthConfig stages, got {type(self.growth).__name__}",
        )
        object.__setattr__(self, "growth", stages)
        if len(stages) > 1:
            for i, g in enumerate(stages):
                _check(
                    g.at_tokens != "auto",
                    f'growth[{i}].at_tokens: "auto" (Eq. 10) times one growth event; give token counts for '
                    "a run of several stages (`fastgrow plan --stages` computes them)",
                )
            for i in range(1, len(stages)):
                prev, cur = stages[i - 1].at_tokens, stages[i].at_tokens
                _check(
                    cur > prev,
                    f"growth[{i}].at_tokens ({cur:,}) must be greater than growth[{i - 1}].at_tokens ({prev:,}): "
                    "stages grow in increasing token order",
                )

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["growth"] = [dataclasses.asdict(g) for g in self.growth]
        return d

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RunConfig:
        """Inverse of to_dict. `growth` is a list of stage tables; a single table (an older fastgrow's
        [growth], as in old checkpoints) is read as one stage, or none if its at_tokens is 0."""
        unknown = set(d) - {f.name for f in fields(cls)}
        _check(not unknown, f"unknown config section(s): {sorted(unknown)}")
        return cls(
            model=_build(ModelConfig, d.get("model", {}), "model"),
            data=_build(DataConfig, d.get("data", {}), "data"),
            train=_build(TrainConfig, d.get("train", {}), "train"),
            growth=_build_stages(d.get("growth", [])),
        )


def _build(cls: type, values: dict[str, Any], section: str) -> Any:
    if not isinstance(values, dict):
        raise ConfigError(f"config section [{section}] must be a table, got {type(values).__name__}")
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    _check(not unknown, f"unknown key(s) in [{section}]: {sorted(unknown)} (known: {sorted(known)})")
    hints = typing.get_type_hints(cls)
    coerced = {k: _coerce(v, hints[k], f"{section}.{k}") for k, v in values.items()}
    return cls(**coerced)


def _coerce(value: Any, hint: Any, name: str) -> Any:
    """Convert a TOML/CLI value to the field's type; raise ConfigError naming the field."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", typing.Union)):
        args = typing.get_args(hint)
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, name)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{name}: cannot use {value!r} ({'; '.join(errors)})")
    if hint is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise ConfigError(f"{name} must be true/false, got {value!r}")
    if hint is int:
        if isinstance(value, bool):
            raise ConfigError(f"{name} must be an integer, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return parse_count(value)
            except ValueError:
                pass
        raise ConfigError(f"{name} must be an integer, got {value!r}")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{name} must be a number, got {value!r}")
    if hint is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{name} must be a string, got {value!r}")
    return value


_SUFFIXES = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9, "t": 1e12}


def parse_count(text: str | int | float) -> int:
    """Parse '410M', '1.1B', '300B', '2e12', '4096' into an integer count (ValueError otherwise)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text < 0 or (isinstance(text, float) and not text.is_integer() and text < 1):
            raise ValueError(f"count must be a non-negative number, got {text!r}")
        return int(text)
    s = str(text).strip().replace("_", "").replace(",", "")
    if not s:
        raise ValueError("empty count")
    mult = 1.0
    if s[-1].lower() in _SUFFIXES:
        mult = _SUFFIXES[s[-1].lower()]
        s = s[:-1]
    try:
        v = float(s) * mult
    except ValueError:
        raise ValueError(f"cannot parse {text!r} as a count (examples: 410M, 1.1B, 300B, 2e12)") from None
    if v < 0 or v != v:
        raise ValueError(f"count must be non-negative, got {text!r}")
    return int(round(v))


def _model(layers: int, dim: int, heads: int, kv: int, ffn: int, vocab: int = 32000) -> ModelConfig:
    return ModelConfig(
        vocab_size=vocab,
        dim=dim,
        n_layers=layers,
        n_heads=heads,
        n_kv_heads=kv,
        ffn_dim=ffn,
        max_seq_len=2048,
    )


MODEL_PRESETS: dict[str, ModelConfig] = {
    "tiny": ModelConfig(vocab_size=4096, dim=128, n_layers=8, n_heads=4, n_kv_heads=2, ffn_dim=384, max_seq_len=512),
    "tiny-base": ModelConfig(
        vocab_size=4096, dim=128, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=384, max_seq_len=512
    ),
    "410M": _model(24, 1024, 16, 16, 2816),
    "410M-base": _model(6, 1024, 16, 16, 2816),
    "1.1B": _model(24, 2048, 32, 4, 5632),
    "1.1B-base": _model(6, 2048, 32, 4, 5632),
    "3B": _model(32, 2560, 20, 20, 6912),
    "3B-base": _model(8, 2560, 20, 20, 6912),
    "7B": _model(32, 4096, 32, 32, 11008),
    "7B-base": _model(8, 4096, 32, 32, 11008),
}

# Run-level defaults that go with a preset (sequence length, batch, learning rate).
_RUN_PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {"data": {"seq_len": 128, "batch_size": 16}, "train": {"lr": 3e-3, "min_lr": 3e-4}},
    "tiny-base": {"data": {"seq_len": 128, "batch_size": 16}, "train": {"lr": 3e-3, "min_lr": 3e-4}},
}
for _name in ("410M", "1.1B", "3B", "7B"):
    _lr = {"410M": 3e-4, "1.1B": 3e-4, "3B": 2e-4, "7B": 1.5e-4}[_name]
    for _n in (_name, _name + "-base"):
        _RUN_PRESETS[_n] = {
            "data": {"seq_len": 2048, "batch_size": 8},
            "train": {"lr": _lr, "min_lr": _lr / 10, "warmup_steps": 2000, "dtype": "auto"},
        }


def preset_names() -> list[str]:
    return list(MODEL_PRESETS)


def preset(name: str) -> RunConfig:
    """The RunConfig for a named preset (case-insensitive)."""
    lookup = {k.lower(): k for k in MODEL_PRESETS}
    key = lookup.get(name.lower())
    if key is None:
        raise ConfigError(f"unknown preset {name!r}; choose one of {preset_names()}")
    extra = _RUN_PRESETS.get(key, {})
    base = RunConfig(model=MODEL_PRESETS[key])
    return RunConfig(
        model=base.model,
        data=replace(base.data, **extra.get("data", {})),
        train=replace(base.train, **extra.get("train", {})),
    )


def _parse_override_value(text: str) -> Any:
    """CLI values: TOML scalars where they parse (numbers, booleans, quoted strings), else raw text."""
    try:
        return tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        return text


def apply_overrides(cfg: RunConfig, overrides: list[str]) -> RunConfig:
    """Apply `section.key=value` overrides (leading dashes allowed) and revalidate.

    Growth stages: `growth.KEY=V` sets KEY of the single stage (creating stage 0 if the run has none; an
    error if it has several), `growth.N.KEY=V` sets KEY of stage N (0-based; N = the number of stages
    appends a new one).
    """
    d = cfg.to_dict()
    known_growth = {f.name for f in fields(GrowthConfig)}
    for item in overrides:
        s = item.lstrip("-")
        if "=" not in s or "." not in s.split("=", 1)[0]:
            raise ConfigError(f"override {item!r} is not of the form --section.key=value (e.g. --train.lr=1e-3)")
        key, value = s.split("=", 1)
        section, _, name = key.partition(".")
        if section not in d:
            raise ConfigError(f"override {item!r}: unknown section {section!r} (known: {sorted(d)})")
        if section == "growth":
            stage, name = _override_stage(item, d["growth"], name)
            if name not in known_growth:
                raise ConfigError(
                    f"override {item!r}: unknown key {name!r} in [growth] (known: {sorted(known_growth)})"
                )
            stage[name] = _parse_override_value(value)
            continue
        if name not in d[section]:
            raise ConfigError(f"override {item!r}: unknown key {name!r} in [{section}] (known: {sorted(d[section])})")
        d[section][name] = _parse_override_value(value)
    return RunConfig.from_dict(d)


def _override_stage(item: str, stages: list[dict[str, Any]], name: str) -> tuple[dict[str, Any], str]:
    """The stage dict a growth override addresses (appending one where it asks for a new stage)."""
    index, sep, rest = name.partition(".")
    if sep and index.isdigit():
        n = int(index)
        if n > len(stages):
            raise ConfigError(
                f"override {item!r}: the run has {len(stages)} growth stage(s); address growth.0 .. "
                f"growth.{len(stages)} (growth.{len(stages)} appends a stage)"
            )
        if n == len(stages):
            stages.append({})
        return stages[n], rest
    if len(stages) > 1:
        raise ConfigError(
            f"override {item!r}: the run has {len(stages)} growth stages; address one as --growth.N.{name}=... "
            f"(N = 0 .. {len(stages) - 1})"
        )
    if not stages:
        stages.append({})
    return stages[0], name


def load_toml(path: str | Path, base: RunConfig | None = None, *, preset_name: str | None = None) -> RunConfig:
    """Read a TOML config. A top-level `preset = "name"` starts from that preset; sections override it.

    Growth: a `[growth]` table is one stage, an array of tables `[[growth]]` several (in increasing
    at_tokens order); either replaces the base's stages.

    base: the config to start from when the file names no preset. preset_name: the preset the caller
    chose elsewhere (the command line's --preset); a file that names a different one is an error rather
    than one of them silently winning.
    """
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"config file not found: {p}")
    try:
        raw = tomllib.loads(p.read_text())
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{p}: invalid TOML: {e}") from None
    start = base or RunConfig()
    if "preset" in raw:
        file_preset = str(raw.pop("preset"))
        if preset_name is not None and file_preset.lower() != preset_name.lower():
            raise ConfigError(
                f"--preset {preset_name} conflicts with preset = {file_preset!r} in {p}; "
                "drop one of them (a preset is a starting point, the file's sections then override it)"
            )
        start = preset(file_preset)
    d = start.to_dict()
    for section, values in raw.items():
        if section not in d:
            raise ConfigError(f"{p}: unknown config section [{section}] (known: {sorted(d)})")
        if section == "growth":
            d["growth"] = _toml_stages(p, values)
            continue
        if not isinstance(values, dict):
            raise ConfigError(f"{p}: [{section}] must be a table")
        for k, v in values.items():
            if k not in d[section]:
                raise ConfigError(f"{p}: unknown key {k!r} in [{section}] (known: {sorted(d[section])})")
            d[section][k] = v
    try:
        return RunConfig.from_dict(d)
    except ConfigError as e:
        raise ConfigError(f"{p}: {e}") from None


def _toml_stages(p: Path, values: Any) -> list[dict[str, Any]]:
    if isinstance(values, dict):
        # `[growth]` with at_tokens = 0: the older way to say "no growth".
        return [] if values.get("at_tokens", None) == 0 else [values]
    if isinstance(values, list) and all(isinstance(v, dict) for v in values):
        return values
    raise ConfigError(f"{p}: growth must be a [growth] table or [[growth]] tables")
