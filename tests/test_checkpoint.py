"""Checkpoints: atomic writes, pruning, verification, and a process killed in the middle of a save."""

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from conftest import tiny_run_config

from fastgrow.checkpoint import (
    CheckpointError,
    latest_checkpoint,
    list_checkpoints,
    load_checkpoint,
    optimizer_tensors,
    save_checkpoint,
)
from fastgrow.state import build_state

REPO = Path(__file__).resolve().parents[1]


def _state(tmp_path, step=0):
    cfg = tiny_run_config(tmp_path / "data", tmp_path / "run")
    st = build_state(cfg, "cpu")
    # one optimizer step so Adam has moments
    loss = st.model(torch.randint(0, 512, (2, 8)), torch.randint(0, 512, (2, 8)))
    loss.backward()
    st.optimizer.step()
    st.step = step
    return st


def test_roundtrip_and_keep_n(tmp_path):
    st = _state(tmp_path)
    for step in (1, 2, 3):
        st.step = step
        save_checkpoint(st, tmp_path / "run", keep=2)
    assert [p.name for p in list_checkpoints(tmp_path / "run")] == ["step-00000002", "step-00000003"]
    back = load_checkpoint(tmp_path / "run")
    assert back.step == 3
    for k, v in st.model.state_dict().items():
        assert torch.equal(v, back.model.state_dict()[k])
    a, b = optimizer_tensors(st), optimizer_tensors(back)
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(ValueError, match="keep must be >= 2"):
        save_checkpoint(st, tmp_path / "run", keep=1)


def test_corruption_and_incomplete_dirs_are_named(tmp_path):
    st = _state(tmp_path, step=5)
    ck = save_checkpoint(st, tmp_path / "run")
    (tmp_path / "run" / "step-00000009.tmp-abc").mkdir()
    assert latest_checkpoint(tmp_path / "run") == ck
    with pytest.raises(CheckpointError, match="incomplete checkpoint"):
        load_checkpoint(tmp_path / "run" / "step-00000009.tmp-abc")
    w = ck / "model.safetensors"
    raw = bytearray(w.read_bytes())
    raw[-3] ^= 0x55
    w.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="model.safetensors: checksum mismatch"):
        load_checkpoint(ck)
    with pytest.raises(FileNotFoundError):
        load_checkpoint(tmp_path / "nowhere")


def test_kill_during_checkpoint_write_leaves_previous_usable(tmp_path):
    """A real process is SIGKILLed after writing half of a checkpoint; the previous one stays newest."""
    script = textwrap.dedent(
        f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(REPO / "tests")!r})
        from conftest import tiny_run_config
        from fastgrow import checkpoint
        from fastgrow.state import build_state
        from pathlib import Path
        tmp = Path({str(tmp_path)!r})
        st = build_state(tiny_run_config(tmp / "data", tmp / "run"), "cpu")
        st.step = 1
        checkpoint.save_checkpoint(st, tmp / "run")
        real = checkpoint.save_file
        def dying_save(tensors, path):
            real(tensors, path)
            if path.endswith("optimizer.safetensors"):
                os.kill(os.getpid(), signal.SIGKILL)   # die mid-checkpoint: weights written, no manifest
        checkpoint.save_file = dying_save
        st.step = 2
        checkpoint.save_checkpoint(st, tmp / "run")
        """
    )
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -9, proc.stderr
    run = tmp_path / "run"
    leftovers = [p.name for p in run.iterdir() if ".tmp-" in p.name]
    assert leftovers and leftovers[0].startswith("step-00000002.tmp-")
    assert not (run / "step-00000002").exists()
    assert latest_checkpoint(run).name == "step-00000001"
    assert load_checkpoint(run).step == 1  # verified by checksum and usable
    # The next successful save clears the dead write's leftovers.
    st = _state(tmp_path, step=3)
    save_checkpoint(st, run)
    assert not [p for p in run.iterdir() if ".tmp-" in p.name]
    assert os.listdir(run)
