"""The Reporter's sinks: bar or lines, disabled on other ranks, TensorBoard and W&B carrying the same
numbers as metrics.jsonl, and a clear error for a logger that is not installed."""

from __future__ import annotations

import importlib.util
import io

import pytest
from conftest import tiny_run_config

from fastgrow.config import ConfigError
from fastgrow.config_files import apply_overrides
from fastgrow.metrics import read_metrics
from fastgrow.report import Reporter, growth_line, scalars_of, train_line

REC = {
    "kind": "train",
    "step": 30,
    "tokens": 3840,
    "loss": 4.56789,
    "lr": 0.0021,
    "grad_norm": 0.4321,
    "tokens_per_s": 12345.6,
    "mfu": 0.4132,
    "mfu_6n": 0.38,
    "skipped_steps": 0,
}
GROWTH = {
    "kind": "growth",
    "step": 40,
    "op": "stack",
    "layers_before": 2,
    "layers_after": 8,
    "params_before": 1000,
    "params_after": 4000,
    "grow_seconds": 0.0123,
}


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_train_line_shows_the_fields_users_look_for():
    assert train_line(REC, 100) == (
        "step 30/100 | loss 4.5679 | lr 2.10e-03 | grad norm 0.432 | 12,346 tok/s | MFU 41.3%"
    )
    assert train_line({**REC, "mfu": None, "skipped_steps": 2}).endswith("MFU n/a | skipped 2 non-finite")
    assert growth_line(GROWTH) == "[growth] step 40: stack 2→8 layers, 1,000→4,000 params, grow() 12.3 ms"
    staged = growth_line({**GROWTH, "stage": 1, "val_loss_before": 3.5, "val_loss_after": 3.75})
    assert "step 40: growth[1] " in staged and staged.endswith("val_loss 3.5000 → 3.7500")


@pytest.mark.parametrize(
    "progress, terminal, want", [(True, True, "bar"), (True, False, "lines"), (False, True, "lines")]
)
def test_bar_only_on_a_terminal_with_progress_on(tmp_path, progress, terminal, want):
    cfg = apply_overrides(tiny_run_config("d", tmp_path), [f"--train.progress={str(progress).lower()}"])
    stream = Terminal() if terminal else io.StringIO()
    with Reporter(cfg, tmp_path, stream=stream) as rep:
        rep.step()
        rep.record(REC)
        rep.record({"kind": "val", "step": 30, "val_loss": 4.25})
    text = stream.getvalue()
    assert "[val] step 30: val_loss 4.2500" in text
    if want == "lines":
        assert text.splitlines()[0] == train_line(REC, cfg.train.max_steps) and "\r" not in text
    else:
        assert "\r" in text and "loss=4.568" in text and "step 30/" not in text


def test_a_disabled_reporter_says_nothing(tmp_path):
    cfg = apply_overrides(tiny_run_config("d", tmp_path), ["--train.tensorboard=true"])
    stream = Terminal()
    rep = Reporter(cfg, tmp_path, stream=stream, enabled=False)
    rep.step()
    rep.record(REC)
    rep.message("hello")
    rep.close()
    assert stream.getvalue() == "" and list(tmp_path.iterdir()) == []


def test_missing_logger_package_is_a_config_error(tiny_data, tmp_path, monkeypatch):
    from fastgrow import report
    from fastgrow.train import train

    real = importlib.util.find_spec
    monkeypatch.setattr(report.importlib.util, "find_spec", lambda n, *a: None if n == "tensorboard" else real(n, *a))
    cfg = apply_overrides(tiny_run_config(tiny_data, tmp_path / "r"), ["--train.tensorboard=true"])
    with pytest.raises(
        ConfigError,
        match=r'train.tensorboard = true needs the tensorboard package: pip install "fastgrow\[tensorboard\]"',
    ):
        train(cfg, echo=False)
    assert not (tmp_path / "r").exists()  # failed before anything was built or written


def _tb_scalars(run_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard not installed")
def test_tensorboard_logs_the_metrics_jsonl_numbers(tiny_data, tmp_path):
    import shutil

    from fastgrow.train import train

    out = tmp_path / "tb"
    cfg = tiny_run_config(tiny_data, out, max_steps=6, log_every=2, eval_every=3, ckpt_every=3)
    cfg = apply_overrides(cfg, ["--train.tensorboard=true"])
    first = train(cfg, echo=False, until_step=5)  # logs steps 2, 4, 5 and val 3; checkpoints 3 and 5
    shutil.rmtree(first.checkpoint)  # as if killed before step 5's checkpoint: steps 4-5 were never kept
    second = train(cfg, resume=True, echo=False)  # from step 3: logs 4, 6 on the same curves
    assert any(p.name.startswith("events.out.tfevents") for p in out.iterdir())
    tb = _tb_scalars(out)
    recs = [r for r in first.records if r["step"] <= 3] + second.records
    train_recs = [r for r in recs if r["kind"] == "train"]
    # the interrupted run's steps after its checkpoint (4 and 5) are gone from TensorBoard
    assert sorted(tb["train/loss"]) == [r["step"] for r in train_recs] == [2, 4, 6]
    for r in train_recs:
        assert tb["train/loss"][r["step"]] == pytest.approx(r["loss"], rel=1e-6)  # event files store fp32
        assert tb["train/lr"][r["step"]] == pytest.approx(r["lr"], rel=1e-6)
        assert tb["train/grad_norm"][r["step"]] == pytest.approx(r["grad_norm"], rel=1e-6)
        assert tb["perf/tokens_per_s"][r["step"]] == pytest.approx(r["tokens_per_s"], rel=1e-6)
    assert "perf/mfu" not in tb  # None on a CPU: left out, not logged as 0
    vals = {r["step"]: r["val_loss"] for r in recs if r["kind"] == "val"}
    assert tb["val/loss"] == pytest.approx(vals)
    assert all(tag in scalars_of(train_recs[0]) for tag in ("train/loss", "train/lr", "perf/tokens_per_s"))


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb not installed")
def test_wandb_offline_run_gets_the_same_numbers(tiny_data, tmp_path, monkeypatch):
    from fastgrow.train import train

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "wb"
    cfg = tiny_run_config(tiny_data, out, max_steps=4, log_every=2, ckpt_every=0)
    cfg = apply_overrides(cfg, ["--train.wandb=true", "--train.wandb_project=fastgrow-test"])
    logged = []
    import wandb

    real_init = wandb.init

    def spy_init(*a, **kw):
        run = real_init(*a, **kw)
        real_log = run.log
        run.log = lambda data, step=None, **k: (logged.append((step, dict(data))), real_log(data, step=step, **k))
        return run

    monkeypatch.setattr(wandb, "init", spy_init)
    train(cfg, echo=False)
    run_id = (out / "wandb-run-id").read_text().strip()
    assert list((out / "wandb").glob(f"offline-run-*-{run_id}")), list((out / "wandb").iterdir())
    recs = read_metrics(out / "metrics.jsonl")
    train_logged = [(s, d) for s, d in logged if "train/loss" in d]
    train_recs = [r for r in recs if r["kind"] == "train"]
    assert [s for s, _ in train_logged] == [r["step"] for r in train_recs] == [2, 4]
    for (_, data), r in zip(train_logged, train_recs):
        assert data["train/loss"] == r["loss"] and data["train/lr"] == r["lr"]
    val = [r for r in recs if r["kind"] == "val"][-1]
    assert (val["step"], {"val/loss": val["val_loss"]}) in logged
