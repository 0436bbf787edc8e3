"""What a run shows while it trains: a progress bar or log lines on stderr, TensorBoard, Weights & Biases.

metrics.jsonl (fastgrow.metrics) is the record of a run; everything here is a view of the same records,
fed by the training loop through one `Reporter`:

    report = Reporter(cfg, out_dir, initial_step=state.step, console=True)
    report.step()             # after every optimizer step (advances the bar)
    report.record(rec)        # each metrics.jsonl record: kind "train" | "val" | "growth"
    report.message(text)      # any other line for the user
    report.close()

Console: a tqdm bar when `train.progress` is on and stderr is a terminal; otherwise (a batch job, a log
file, `train.progress = false`) one line per log step, e.g.

    step 120/1000 | loss 4.2310 | lr 2.91e-03 | grad norm 0.412 | 51,234 tok/s | MFU 41.3%

Validation and growth events print one line each in both modes. `train.tensorboard = true` writes
TensorBoard event files into the run directory (beside metrics.jsonl; `tensorboard --logdir runs/`),
`train.wandb = true` logs to Weights & Biases (project `train.wandb_project`; `WANDB_MODE=offline`
works without an account). Both packages are optional extras (`pip install "fastgrow[tensorboard]"`,
`"fastgrow[wandb]"`); asking for one that is not installed is a config error before training starts.

`Reporter(..., enabled=False)` reports nothing at all (for the non-zero ranks of a distributed run).
"""

from __future__ import annotations

import importlib.util
import math
import secrets
import sys
from pathlib import Path
from typing import Any, TextIO

from fastgrow.config import ConfigError, RunConfig

WANDB_ID_FILE = "wandb-run-id"


def check_reporting(cfg: RunConfig) -> None:
    """Raise ConfigError now if the config asks for a logger whose package is not installed."""
    if cfg.train.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise ConfigError(
            'train.tensorboard = true needs the tensorboard package: pip install "fastgrow[tensorboard]" '
            "(or set train.tensorboard = false)"
        )
    if cfg.train.wandb and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            'train.wandb = true needs the wandb package: pip install "fastgrow[wandb]" (or set train.wandb = false)'
        )


def _num(x: Any, fmt: str) -> str:
    return "n/a" if x is None or (isinstance(x, float) and not math.isfinite(x)) else format(x, fmt)


def train_line(rec: dict[str, Any], total_steps: int | None = None) -> str:
    """One console line for a `kind: "train"` record."""
    step = f"{rec['step']}/{total_steps}" if total_steps else f"{rec['step']}"
    mfu = rec.get("mfu")
    parts = [
        ("G_learn " if rec.get("phase") == "learn" else "") + f"step {step}",  # the operator's training
        f"loss {_num(rec['loss'], '.4f')}",
        f"lr {_num(rec['lr'], '.2e')}",
        f"grad norm {_num(rec.get('grad_norm'), '.3f')}",
        f"{_num(rec['tokens_per_s'], ',.0f')} tok/s",
        f"MFU {'n/a' if mfu is None else format(mfu, '.1%')}",
    ]
    if rec.get("skipped_steps"):
        parts.append(f"skipped {rec['skipped_steps']} non-finite")
    return " | ".join(parts)


def val_line(rec: dict[str, Any]) -> str:
    return f"[val] step {rec['step']}: val_loss {_num(rec['val_loss'], '.4f')}"


def _seconds(s: float) -> str:
    return f"{s * 1e3:.0f} ms" if s < 1 else f"{s:.2f} s"


def growth_line(rec: dict[str, Any]) -> str:
    stage = f"growth[{rec['stage']}] " if "stage" in rec else ""
    line = (
        f"[growth] step {rec['step']}: {stage}{rec['op']} {rec['layers_before']}→{rec['layers_after']} layers, "
        f"{rec['params_before']:,}→{rec['params_after']:,} params, grow() {rec['grow_seconds'] * 1e3:.1f} ms"
    )
    if rec.get("learn_steps"):  # G_learn: the event includes the operator's training
        line += f" incl. {rec['learn_steps']} learn steps"
    if rec.get("stall_seconds") is not None:  # growth to the end of the next step, evaluations included
        line += f", stall {_seconds(rec['stall_seconds'])}"
    if rec.get("val_loss_before") is not None and rec.get("val_loss_after") is not None:
        line += f", val_loss {rec['val_loss_before']:.4f} → {rec['val_loss_after']:.4f}"
    return line


class Reporter:
    """Console, TensorBoard and W&B views of a run's records (see the module docstring)."""

    def __init__(
        self,
        cfg: RunConfig,
        out_dir: str | Path,
        *,
        initial_step: int = 0,
        console: bool = True,
        enabled: bool = True,
        stream: TextIO | None = None,
    ) -> None:
        self.cfg = cfg
        self.out_dir = Path(out_dir)
        self.enabled = enabled
        self.total_steps = cfg.train.max_steps
        self.stream = stream if stream is not None else sys.stderr
        self._bar = None
        self._lines = False
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        check_reporting(cfg)
        if console:
            isatty = getattr(self.stream, "isatty", lambda: False)()
            if cfg.train.progress and isatty:
                from tqdm import tqdm

                self._bar = tqdm(
                    total=self.total_steps,
                    initial=initial_step,
                    desc="train",
                    unit="step",
                    dynamic_ncols=True,
                    file=self.stream,
                )
            else:
                self._lines = True
        if cfg.train.tensorboard:
            self._tb = self._open_tensorboard(initial_step)
        if cfg.train.wandb:
            self._wandb = self._open_wandb()

    # --- sinks --------------------------------------------------------------------------------------------
    def _open_tensorboard(self, initial_step: int):
        from torch.utils.tensorboard import SummaryWriter

        from fastgrow.config_toml import config_toml

        # purge_step: on a resume from step N, TensorBoard drops the events of steps > N that the interrupted
        # run logged after its checkpoint, so the curves show what the resumed run actually trained.
        writer = SummaryWriter(log_dir=str(self.out_dir), purge_step=initial_step + 1 if initial_step else None)
        if not initial_step:
            writer.add_text("config", "```toml\n" + config_toml(self.cfg) + "```", 0)
        return writer

    def _open_wandb(self):
        import wandb

        self.out_dir.mkdir(parents=True, exist_ok=True)
        id_file = self.out_dir / WANDB_ID_FILE
        # One W&B run per run directory: a resume continues the same W&B run.
        run_id = id_file.read_text().strip() if id_file.is_file() else secrets.token_hex(6)
        id_file.write_text(run_id + "\n")
        return wandb.init(
            project=self.cfg.train.wandb_project,
            name=self.out_dir.name,
            id=run_id,
            resume="allow",
            dir=str(self.out_dir),
            config=self.cfg.to_dict(),
        )

    # --- events -------------------------------------------------------------------------------------------
    def step(self, n: int = 1) -> None:
        if self._bar is not None:
            self._bar.update(n)

    def record(self, rec: dict[str, Any]) -> None:
        if not self.enabled:
            return
        kind = rec.get("kind")
        if kind == "train":
            if self._bar is not None:
                post = {"loss": _num(rec["loss"], ".3f"), "tok/s": _num(rec["tokens_per_s"], ",.0f")}
                post["mfu"] = "n/a" if rec.get("mfu") is None else format(rec["mfu"], ".1%")
                self._bar.set_postfix(post, refresh=False)
            elif self._lines:
                self._print(train_line(rec, self.total_steps))
        elif kind == "val":
            self.message(val_line(rec))
        elif kind == "growth":
            self.message(growth_line(rec))
        self._log_scalars(rec)

    def message(self, text: str) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.write(text, file=self.stream)
        elif self._lines:
            self._print(text)

    def _print(self, text: str) -> None:
        print(text, file=self.stream, flush=True)

    def _log_scalars(self, rec: dict[str, Any]) -> None:
        scalars = scalars_of(rec)
        if not scalars:
            return
        step = rec["step"]
        if self._tb is not None:
            for tag, value in scalars.items():
                self._tb.add_scalar(tag, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None
        if self._tb is not None:
            self._tb.close()
            self._tb = None
        if self._wandb is not None:
            self._wandb.finish()
            self._wandb = None

    def __enter__(self) -> Reporter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# metrics.jsonl key -> logger tag, per record kind (values that are None or non-finite are left out).
SCALAR_TAGS: dict[str, dict[str, str]] = {
    "train": {
        "loss": "train/loss",
        "lr": "train/lr",
        "grad_norm": "train/grad_norm",
        "tokens": "train/tokens",
        "skipped_steps": "train/skipped_steps",
        "tokens_per_s": "perf/tokens_per_s",
        "mfu": "perf/mfu",
        "mfu_6n": "perf/mfu_6n",
    },
    "val": {"val_loss": "val/loss"},
    "growth": {
        "layers_after": "growth/layers",
        "params_after": "growth/params",
        "grow_seconds": "growth/grow_seconds",
        "stall_seconds": "growth/stall_seconds",
    },
}


def scalars_of(rec: dict[str, Any]) -> dict[str, float]:
    """The logger scalars of one metrics record: {tag: value}."""
    out = {}
    for key, tag in SCALAR_TAGS.get(rec.get("kind", ""), {}).items():
        v = rec.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            out[tag] = float(v)
    return out
