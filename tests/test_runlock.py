"""The run-directory lock: one process per out_dir, refused at once, released by the kernel on kill -9."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import REPO, run_cli, write_toml
from conftest import tiny_run_config

from fastgrow.checkpoint import latest_checkpoint, load_checkpoint
from fastgrow.metrics import read_metrics
from fastgrow.runlock import RunLock, RunLockedError
from fastgrow.train import train


def test_second_holder_is_refused_and_release_frees_it(tmp_path):
    with RunLock(tmp_path / "run") as lock:
        assert lock.held and f"pid {os.getpid()}" in (tmp_path / "run" / ".lock").read_text()
        with pytest.raises(RunLockedError, match=rf"in use by another fastgrow process \(pid {os.getpid()} on "):
            RunLock(tmp_path / "run").acquire()
        cfg = tiny_run_config(tmp_path / "data", tmp_path / "run")
        with pytest.raises(RunLockedError):  # train takes the lock before it reads anything
            train(cfg, echo=False)
    assert not lock.held
    with RunLock(tmp_path / "run"):  # released: free again
        pass


def test_kill_9_never_leaves_a_stale_lock(tmp_path):
    script = textwrap.dedent(
        f"""
        import sys, time
        from fastgrow.runlock import RunLock
        RunLock({str(tmp_path / "run")!r}).acquire()
        print("locked", flush=True)
        time.sleep(600)
        """
    )
    proc = subprocess.Popen([sys.executable, "-c", script], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout.readline().strip() == "locked"
        with pytest.raises(RunLockedError, match=f"pid {proc.pid} "):
            RunLock(tmp_path / "run").acquire()
    finally:
        proc.kill()
        proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    with RunLock(tmp_path / "run"):  # the kernel dropped the dead holder's lock
        pass


def test_two_runs_on_one_directory(tiny_data, tmp_path):
    """The second run is refused within seconds with one line naming the holder; the first one is not
    disturbed: its checkpoint is bitwise-equal to a solo run of the same steps, its log holds each step once."""
    cfg = tiny_run_config(tiny_data, tmp_path / "shared", max_steps=100000, ckpt_every=0, log_every=1)
    cfg_file = write_toml(cfg, tmp_path / "shared.toml")
    first = subprocess.Popen(
        [sys.executable, "-m", "fastgrow.cli", "train", "--config", str(cfg_file)],
        cwd=REPO,
        env={**os.environ, "PYTHONHASHSEED": "0"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = tmp_path / "shared" / "metrics.jsonl"
    try:
        deadline = time.time() + 120
        while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= 2):
            time.sleep(0.05)
        first.send_signal(signal.SIGSTOP)  # paused (lock held), so the solo replay below stays short
        with pytest.raises(RunLockedError, match=f"pid {first.pid} "):  # a fresh run, in this process
            train(cfg, echo=False)
        t0 = time.time()
        second = run_cli("train", "--config", cfg_file, "--resume", timeout=120)  # a resume, from the CLI
        assert time.time() - t0 < 60
        assert second.returncode == 2, second.stderr
        assert second.stderr.count("\n") == 1 and "Traceback" not in second.stderr, second.stderr
        assert second.stderr.startswith("fastgrow: error: ") and f"pid {first.pid} " in second.stderr
    finally:
        first.send_signal(signal.SIGTERM)
        first.send_signal(signal.SIGCONT)
        out, err = first.communicate(timeout=120)
    assert first.returncode == 143, err
    ckpt = latest_checkpoint(tmp_path / "shared")
    got = load_checkpoint(ckpt)
    steps = [r["step"] for r in read_metrics(metrics) if r["kind"] == "train"]
    assert steps == list(range(1, got.step + 1))  # one writer, each step once
    solo = train(
        tiny_run_config(tiny_data, tmp_path / "solo", max_steps=100000, ckpt_every=0), echo=False, until_step=got.step
    )
    for name, t in solo.state.model.state_dict().items():
        assert torch.equal(t, got.model.state_dict()[name]), name
    assert [p.name for p in Path(tmp_path / "shared").iterdir() if ".tmp-" in p.name] == []
