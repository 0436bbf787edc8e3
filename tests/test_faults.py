"""Faults around a run: a full disk, Ctrl-C, a non-finite streak, and the metrics log after a resume."""

import os
import signal
import subprocess

import pytest
from cli_helpers import interrupt_cli_train, run_cli, write_toml
from conftest import tiny_run_config

from fastgrow.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, verify_checkpoint
from fastgrow.config_files import apply_overrides
from fastgrow.interrupts import StopSignals
from fastgrow.metrics import read_metrics
from fastgrow.train import TrainingAborted, train


def test_full_disk_during_training_is_one_line(tiny_data, tmp_path, small_tmpfs):
    cfg = tiny_run_config(tiny_data, small_tmpfs / "run", max_steps=40, ckpt_every=4)
    probe = train(tiny_run_config(tiny_data, tmp_path / "probe", max_steps=4), echo=False).checkpoint
    ckpt_bytes = sum(f.stat().st_size for f in probe.iterdir())
    # Leave room for about one and a half checkpoints: the first fits, the second cannot.
    free = os.statvfs(small_tmpfs).f_bavail * os.statvfs(small_tmpfs).f_frsize
    (small_tmpfs / "filler").write_bytes(b"\0" * (free - int(1.5 * ckpt_bytes)))
    p = run_cli("train", "--config", write_toml(cfg, tmp_path / "c.toml"))
    assert p.returncode == 2, p.stderr
    # The step lines of the steps that ran, then exactly one error line, last.
    lines = p.stderr.splitlines()
    assert "Traceback" not in p.stderr and lines[-1].startswith("fastgrow: error: "), p.stderr
    assert sum(line.startswith("fastgrow:") for line in lines) == 1, p.stderr
    assert lines[-1].startswith("fastgrow: error: cannot write ") and "No space left on device" in lines[-1]
    assert str(small_tmpfs / "run") in p.stderr
    run = small_tmpfs / "run"
    assert [c.name for c in run.iterdir() if ".tmp-" in c.name or ".del-" in c.name] == []
    assert [c.name for c in list_checkpoints(run)] == ["step-00000004"]
    assert "the newest complete checkpoint is " + str(run / "step-00000004") in p.stderr
    verify_checkpoint(run / "step-00000004")


def test_second_signal_exits_at_once():
    with StopSignals(echo=False) as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        assert stop.hit and stop.name == "SIGTERM"
        os.kill(os.getpid(), signal.SIGTERM)  # a second SIGTERM changes nothing
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_ctrl_c_saves_the_current_step_and_resumes(tiny_data, tmp_path):
    cfg = tiny_run_config(tiny_data, tmp_path / "int", max_steps=100000, ckpt_every=0, log_every=1)
    cfg_file = write_toml(cfg, tmp_path / "int.toml")
    metrics = tmp_path / "int" / "metrics.jsonl"
    code, _, err = interrupt_cli_train(cfg_file, metrics, after_records=3, sig=signal.SIGINT)
    assert code == 130, err
    assert "SIGINT: saved" in err and "Traceback" not in err
    logged = [r["step"] for r in read_metrics(metrics) if r["kind"] == "train"]
    ckpt = latest_checkpoint(tmp_path / "int")
    assert load_checkpoint(ckpt).step == logged[-1] >= 3  # the step it was on, not an older one
    train(cfg, resume=True, echo=False, until_step=logged[-1] + 2)
    steps = [r["step"] for r in read_metrics(metrics) if r["kind"] == "train"]
    assert steps == list(range(1, logged[-1] + 3))


def _bad_from(monkeypatch, bad_calls):
    from fastgrow import model as model_mod

    real_forward = model_mod.Transformer.forward
    calls = {"n": 0}

    def forward(self, t, y=None):
        calls["n"] += 1
        out = real_forward(self, t, y)
        return out * float("inf") if bad_calls(calls["n"]) else out

    monkeypatch.setattr(model_mod.Transformer, "forward", forward)


def test_no_checkpoint_during_a_nonfinite_streak(tiny_data, tmp_path, monkeypatch):
    _bad_from(monkeypatch, lambda n: n >= 3)  # steps 1-2 good, then non-finite for good
    cfg = tiny_run_config(tiny_data, tmp_path / "blow", max_steps=20, ckpt_every=2, max_bad_steps=3)
    with pytest.raises(TrainingAborted, match=r"The last good checkpoint is .*step-00000002$"):
        train(cfg, echo=False)
    assert [c.name for c in list_checkpoints(tmp_path / "blow")] == ["step-00000002"]  # not step 4


def test_a_checkpoint_due_in_a_streak_is_written_after_it(tiny_data, tmp_path, monkeypatch):
    _bad_from(monkeypatch, lambda n: n == 4)  # one bad step, exactly when a checkpoint is due
    cfg = tiny_run_config(tiny_data, tmp_path / "late", max_steps=6, ckpt_every=4, max_bad_steps=3)
    res = train(cfg, echo=False, until_step=5)
    assert [c.name for c in list_checkpoints(tmp_path / "late")] == ["step-00000005"]
    assert res.checkpoint.name == "step-00000005" and load_checkpoint(res.checkpoint).bad_steps == 0


def test_metrics_hold_each_step_once_after_a_crash_and_resume(tiny_data, tmp_path, monkeypatch):
    from fastgrow import model as model_mod

    cfg = tiny_run_config(tiny_data, tmp_path / "m", max_steps=10, ckpt_every=4, eval_every=3)
    cfg = apply_overrides(cfg, ["--growth.at_tokens=640"])  # grows before step 6 (128 tokens per step)
    real_forward = model_mod.Transformer.forward
    calls = {"n": 0}

    def crash_at_7(self, t, y=None):
        if self.training:
            calls["n"] += 1
            if calls["n"] == 7:
                raise RuntimeError("simulated crash")
        return real_forward(self, t, y)

    monkeypatch.setattr(model_mod.Transformer, "forward", crash_at_7)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(cfg, echo=False)
    with open(tmp_path / "m" / "metrics.jsonl", "a") as f:
        f.write('{"kind": "train", "step": 7, "lo')  # and a line cut by the crash
    monkeypatch.undo()
    train(cfg, resume=True, echo=False)
    lines = (tmp_path / "m" / "metrics.jsonl").read_text().splitlines()
    import json

    recs = [json.loads(ln) for ln in lines]  # every line whole
    assert [r["step"] for r in recs if r["kind"] == "train"] == list(range(1, 11))
    assert [r["step"] for r in recs if r["kind"] == "val"] == [3, 6, 9, 10]
    assert [r["step"] for r in recs if r["kind"] == "growth"] == [5]
    assert read_metrics(tmp_path / "m" / "metrics.jsonl") == recs


def test_read_metrics_keeps_the_latest_of_repeated_steps(tmp_path):
    """Logs written by older versions repeat the replayed steps after a resume; plots must not double back."""
    p = tmp_path / "metrics.jsonl"
    rows = [("train", 1, 5.0), ("train", 2, 4.0), ("train", 3, 3.9), ("train", 2, 4.1), ("train", 3, 3.5)]
    rows += [("train", 4, 3.0)]
    p.write_text("".join(f'{{"kind": "{k}", "step": {s}, "loss": {v}}}\n' for k, s, v in rows) + '{"kind": "tr')
    got = read_metrics(p)
    assert [(r["step"], r["loss"]) for r in got] == [(1, 5.0), (2, 4.1), (3, 3.5), (4, 3.0)]
    p.write_text('{"kind": "train", "step": 1}\nnot json\n{"kind": "train", "step": 2}\n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON line"):
        read_metrics(p)


def _fill(mnt, leave: int) -> None:
    st = os.statvfs(mnt)
    (mnt / "filler").write_bytes(b"\0" * max(0, st.f_bavail * st.f_frsize - leave))


def test_full_disk_in_export_and_grow_leaves_nothing(tiny_data, tmp_path, small_tmpfs):
    from fastgrow.fsutil import IOFailure
    from fastgrow.grow import GrowPlan
    from fastgrow.grow_cli import grow_checkpoint
    from fastgrow.hf import export_checkpoint

    src = train(tiny_run_config(tiny_data, tmp_path / "src", max_steps=2), echo=False).checkpoint
    _fill(small_tmpfs, 60_000)  # less than one model's weights
    with pytest.raises(IOFailure, match=rf"cannot write {small_tmpfs}/hf: No space left on device"):
        export_checkpoint(src, small_tmpfs / "hf")
    with pytest.raises(IOFailure, match=rf"cannot write checkpoint {small_tmpfs}/grown/step-00000002: No space left"):
        grow_checkpoint(src, small_tmpfs / "grown", GrowPlan(depth="stack", factor=2))
    leftovers = [p.name for p in small_tmpfs.rglob("*") if p.name not in ("filler", "grown", ".lock")]
    assert leftovers == []


def test_read_only_run_directory_is_one_line(tiny_data, tmp_path, small_tmpfs):
    (small_tmpfs / "run").mkdir()
    subprocess.run(["mount", "-o", "remount,ro", str(small_tmpfs)], check=True)
    p = run_cli("train", "--config", write_toml(tiny_run_config(tiny_data, small_tmpfs / "run"), tmp_path / "c.toml"))
    assert p.returncode == 2 and p.stderr.count("\n") == 1, p.stderr
    assert f"cannot create the run lock {small_tmpfs}/run/.lock: Read-only file system" in p.stderr, p.stderr
