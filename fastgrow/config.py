"""Run configuration: frozen, validated dataclasses and named presets.

A run is described by one `RunConfig` with four sections (`model`, `data`, `train`, `growth`).
Every section validates itself on construction and raises `ConfigError` (a `ValueError`) whose
message names the offending field, so a typo in a TOML file or an override fails with one clear line.
Reading values from text is fastgrow.config_values; TOML files and `--section.key=value` overrides are
fastgrow.config_files; the growth stages' fields are fastgrow.growth_config (re-exported here).

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
from dataclasses import dataclass, field, fields, replace
from typing import Any

from fastgrow.config_values import build_section, check, parse_count  # noqa: F401  (parse_count re-exported)
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
            check(isinstance(v, int) and v > 0, f"model.{name} must be a positive integer, got {v!r}")
        # 0 layers is a model too: embeddings, final norm and head (a base that growth fills with layers).
        check(
            isinstance(self.n_layers, int) and self.n_layers >= 0,
            f"model.n_layers must be a non-negative integer, got {self.n_layers!r}",
        )
        check(
            self.dim % self.n_heads == 0,
            f"model.dim ({self.dim}) must be divisible by model.n_heads ({self.n_heads})",
        )
        check(
            self.n_heads % self.n_kv_heads == 0,
            f"model.n_kv_heads ({self.n_kv_heads}) must divide model.n_heads ({self.n_heads})",
        )
        check(self.head_dim % 2 == 0, f"head dim dim/n_heads = {self.head_dim} must be even for RoPE")
        check(self.rope_theta > 0, f"model.rope_theta must be > 0, got {self.rope_theta}")
        check(0 < self.norm_eps < 1, f"model.norm_eps must be in (0, 1), got {self.norm_eps}")
        check(self.init_std > 0, f"model.init_std must be > 0, got {self.init_std}")
        check(
            self.attn_backend in ATTN_BACKENDS,
            f"model.attn_backend must be one of {ATTN_BACKENDS}, got {self.attn_backend!r}",
        )
        check(
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
        check(bool(self.data_dir), "data.data_dir must not be empty")
        check(
            isinstance(self.seq_len, int) and self.seq_len > 0,
            f"data.seq_len must be > 0, got {self.seq_len}",
        )
        check(
            isinstance(self.batch_size, int) and self.batch_size > 0,
            f"data.batch_size must be > 0, got {self.batch_size}",
        )
        check(0.0 < self.val_fraction < 0.5, f"data.val_fraction must be in (0, 0.5), got {self.val_fraction}")


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
    # Under torchrun: "fsdp" (FSDP2, parameters and Adam moments sharded over the ranks) or "ddp"
    # (replicated). A process not started by torchrun ignores it.
    parallel: str = "fsdp"
    # Seconds any collective may wait under torchrun before the run stops (a rank that died or hangs).
    dist_timeout: float = 600.0

    def __post_init__(self) -> None:
        check(self.max_steps > 0, f"train.max_steps must be > 0, got {self.max_steps}")
        check(self.lr > 0, f"train.lr must be > 0, got {self.lr}")
        check(0 <= self.min_lr <= self.lr, f"train.min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        check(self.warmup_steps >= 0, f"train.warmup_steps must be >= 0, got {self.warmup_steps}")
        check(self.schedule in SCHEDULES, f"train.schedule must be one of {SCHEDULES}, got {self.schedule!r}")
        check(0 < self.decay_fraction <= 1, f"train.decay_fraction must be in (0, 1], got {self.decay_fraction}")
        check(self.weight_decay >= 0, f"train.weight_decay must be >= 0, got {self.weight_decay}")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "train.beta1 and train.beta2 must be in [0, 1)")
        check(self.eps > 0, f"train.eps must be > 0, got {self.eps}")
        check(self.grad_clip >= 0, f"train.grad_clip must be >= 0 (0 disables), got {self.grad_clip}")
        check(self.grad_accum >= 1, f"train.grad_accum must be >= 1, got {self.grad_accum}")
        check(self.dtype in ("auto", "fp32", "bf16"), f"train.dtype must be auto|fp32|bf16, got {self.dtype!r}")
        check(self.log_every >= 1, f"train.log_every must be >= 1, got {self.log_every}")
        check(self.eval_every >= 0, f"train.eval_every must be >= 0 (0 disables), got {self.eval_every}")
        check(self.eval_batches >= 1, f"train.eval_batches must be >= 1, got {self.eval_batches}")
        check(self.ckpt_every >= 0, f"train.ckpt_every must be >= 0 (0 disables), got {self.ckpt_every}")
        check(self.keep_ckpts >= 2, f"train.keep_ckpts must be >= 2, got {self.keep_ckpts}")
        check(self.max_bad_steps >= 1, f"train.max_bad_steps must be >= 1, got {self.max_bad_steps}")
        check(self.parallel in ("fsdp", "ddp"), f"train.parallel must be fsdp|ddp, got {self.parallel!r}")
        check(self.dist_timeout > 0, f"train.dist_timeout must be > 0 seconds, got {self.dist_timeout}")


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
            stages.append(build_section(GrowthConfig, v, "growth"))
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
        check(
            isinstance(stages, tuple) and all(isinstance(g, GrowthConfig) for g in stages),
            f"RunConfig.growth must be a tuple of GrowthConfig stages, got {type(self.growth).__name__}",
        )
        object.__setattr__(self, "growth", stages)
        if len(stages) > 1:
            for i, g in enumerate(stages):
                check(
                    g.at_tokens != "auto",
                    f'growth[{i}].at_tokens: "auto" (Eq. 10) times one growth event; give token counts for '
                    "a run of several stages (`fastgrow plan --stages` computes them)",
                )
            for i in range(1, len(stages)):
                prev, cur = stages[i - 1].at_tokens, stages[i].at_tokens
                check(
                    cur > prev,
                    f"growth[{i}].at_tokens ({cur:,}) must be greater than growth[{i - 1}].at_tokens ({prev:,}): "
                    "stages grow in increasing token order",
                )

    @property
    def tokens_per_step(self) -> int:
        """Training tokens per optimizer step: batch_size x seq_len x grad_accum (at any world size)."""
        return self.data.batch_size * self.data.seq_len * self.train.grad_accum

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
        check(not unknown, f"unknown config section(s): {sorted(unknown)}")
        return cls(
            model=build_section(ModelConfig, d.get("model", {}), "model"),
            data=build_section(DataConfig, d.get("data", {}), "data"),
            train=build_section(TrainConfig, d.get("train", {}), "train"),
            growth=_build_stages(d.get("growth", [])),
        )


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


def preset_key(name: str) -> str:
    """The preset's name as MODEL_PRESETS spells it (names are case-insensitive); ConfigError if unknown."""
    key = {k.lower(): k for k in MODEL_PRESETS}.get(str(name).lower())
    if key is None:
        raise ConfigError(f"unknown preset {name!r}; choose one of {preset_names()}")
    return key


def preset(name: str) -> RunConfig:
    """The RunConfig for a named preset (case-insensitive)."""
    key = preset_key(name)
    extra = _RUN_PRESETS.get(key, {})
    base = RunConfig(model=MODEL_PRESETS[key])
    return RunConfig(
        model=base.model,
        data=replace(base.data, **extra.get("data", {})),
        train=replace(base.train, **extra.get("train", {})),
    )
