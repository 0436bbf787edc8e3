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
    verify_checkpoint,
)
from fastgrow.config import ConfigError
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


# --- strict verification ---------------------------------------------------------------------------------


def _rewrite(ckpt, name, data: bytes | None):
    """Replace (or with None remove) a file of a checkpoint and fix its manifest entry, as a careless tool
    would: the checksums then agree, so only the structural checks can catch it."""
    import json

    from fastgrow.fsutil import sha256_file

    man = json.loads((ckpt / "manifest.json").read_text())
    if data is None:
        (ckpt / name).unlink()
        man["files"].pop(name, None)
    else:
        (ckpt / name).write_bytes(data)
        man["files"][name] = {"bytes": len(data), "sha256": sha256_file(ckpt / name)}
    (ckpt / "manifest.json").write_text(json.dumps(man))


def test_damaged_checkpoints_are_refused_naming_the_file(tmp_path):
    import json

    st = _state(tmp_path, step=3)
    cases = {
        "empty manifest": (lambda c: (c / "manifest.json").write_text("{}"), r"manifest.json: lists no files"),
        "bad manifest": (lambda c: (c / "manifest.json").write_text("{"), r"manifest.json: invalid JSON"),
        "no optimizer": (
            lambda c: _rewrite(c, "optimizer.safetensors", None),
            r"manifest.json: does not list optimizer.safetensors",
        ),
        "missing key": (
            lambda c: _rewrite(
                c,
                "state.json",
                json.dumps(
                    {k: v for k, v in json.loads((c / "state.json").read_text()).items() if k != "cursor"}
                ).encode(),
            ),
            r"state.json: missing key 'cursor'",
        ),
        "bad state": (lambda c: _rewrite(c, "state.json", b"{nope"), r"state.json: invalid JSON"),
        "unlisted tokenizer": (
            lambda c: (c / "tokenizer.json").write_text("{}"),
            r"tokenizer.json is present but not listed",
        ),
        "unknown layout": (
            lambda c: (c / "manifest.json").write_text(
                json.dumps({**json.loads((c / "manifest.json").read_text()), "layout": "exotic"})
            ),
            r"unknown checkpoint layout 'exotic'",
        ),
        "escaping name": (
            lambda c: (c / "manifest.json").write_text(
                json.dumps({"files": {"../model.safetensors": {"bytes": 1, "sha256": "x"}}})
            ),
            r"leaves its folder",
        ),
    }
    for i, (damage, message) in enumerate(cases.values()):
        run = tmp_path / f"run{i}"
        ckpt = save_checkpoint(st, run)
        damage(ckpt)
        with pytest.raises(CheckpointError, match=message):
            load_checkpoint(ckpt)
        with pytest.raises(CheckpointError, match=message):
            verify_checkpoint(ckpt)


def test_symlink_out_of_the_checkpoint_is_refused(tmp_path):
    st = _state(tmp_path, step=1)
    ckpt = save_checkpoint(st, tmp_path / "run", tokenizer=None)
    secret = tmp_path / "secret.json"
    secret.write_text("{}")
    real = ckpt / "state.json"
    secret.write_bytes(real.read_bytes())  # same content, same checksum: only the path check can refuse it
    real.unlink()
    real.symlink_to(secret)
    with pytest.raises(CheckpointError, match="symlink that leaves"):
        verify_checkpoint(ckpt)


def test_old_manifests_without_layout_stay_readable(tmp_path):
    import json

    st = _state(tmp_path, step=2)
    ckpt = save_checkpoint(st, tmp_path / "run")
    man = json.loads((ckpt / "manifest.json").read_text())
    assert man["layout"] == "single"
    del man["layout"]
    (ckpt / "manifest.json").write_text(json.dumps(man))
    assert load_checkpoint(ckpt).step == 2


def test_resume_never_falls_back_silently(tiny_data, tmp_path):
    from cli_helpers import run_cli, write_toml
    from conftest import tiny_run_config

    from fastgrow.train import train

    cfg = tiny_run_config(tiny_data, tmp_path / "r", max_steps=12, ckpt_every=2, keep_ckpts=3)
    train(cfg, echo=False, until_step=6)
    run = tmp_path / "r"
    assert [c.name for c in list_checkpoints(run)] == ["step-00000002", "step-00000004", "step-00000006"]
    (run / "step-00000006" / "manifest.json").unlink()  # the newest is damaged
    cfg_file = write_toml(cfg, tmp_path / "r.toml")
    p = run_cli("train", "--config", cfg_file, "--resume")
    assert p.returncode == 1 and p.stderr.count("\n") == 1, p.stderr
    assert "step-00000006 is damaged" in p.stderr and "--resume-from step-00000004" in p.stderr, p.stderr
    with pytest.raises(ConfigError, match="already holds checkpoints"):  # nor may a fresh run reuse the folder
        train(cfg, echo=False)
    res = train(cfg, resume_from="step-00000004", echo=False, until_step=8)
    assert res.state.step == 8
    assert [c.name for c in list_checkpoints(run)] == ["step-00000004", "step-00000006", "step-00000008"]
    assert [c.name.split(".")[0] for c in run.iterdir() if ".abandoned-" in c.name] == ["step-00000006"]
    with pytest.raises(FileNotFoundError, match=r"no checkpoint step 3 in .*step-00000004"):
        train(cfg, resume_from="3", echo=False)


def test_a_kill_while_pruning_never_leaves_a_complete_looking_folder(tmp_path):
    """strace kills the process at its 3rd unlinkat, i.e. in the middle of deleting an old checkpoint."""
    import shutil

    if shutil.which("strace") is None:
        pytest.skip("strace not installed")
    script = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(REPO / "tests")!r})
        from conftest import tiny_run_config
        from fastgrow.checkpoint import save_checkpoint
        from fastgrow.state import build_state
        from pathlib import Path
        tmp = Path({str(tmp_path)!r})
        st = build_state(tiny_run_config(tmp / "data", tmp / "run"), "cpu")
        for step in (1, 2):
            st.step = step
            save_checkpoint(st, tmp / "run")
        print("pruning", flush=True)
        st.step = 3
        save_checkpoint(st, tmp / "run")   # prunes step 1
        """
    )
    # Only unlinkat calls after "pruning" matter; the first saves prune nothing and unlink nothing.
    proc = subprocess.run(
        [
            "strace",
            "-f",
            "-qq",
            "-o",
            "/dev/null",
            "-e",
            "inject=unlinkat:signal=KILL:when=3",
            sys.executable,
            "-c",
            script,
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode in (-9, 137), (proc.returncode, proc.stderr[-2000:])
    run = tmp_path / "run"
    names = sorted(p.name for p in run.iterdir())
    for ckpt in list_checkpoints(run):  # everything listed is whole
        verify_checkpoint(ckpt)
    assert any(".del-" in n for n in names), names  # the half-deleted folder has its doomed name
    assert [c.name for c in list_checkpoints(run)] == ["step-00000002", "step-00000003"]
    st = _state(tmp_path, step=4)
    save_checkpoint(st, run)  # the next save (lock holder) cleans the leftover
    assert not [p for p in run.iterdir() if ".del-" in p.name or ".tmp-" in p.name]


def test_a_sharded_checkpoint_lists_every_file_under_dcp(tmp_path):
    """The "dcp" layout's loader reads dcp/ whole: a file there the manifest does not list (another world
    size's leftover shard, a stray file) is refused, and so is a missing DCP index. Built by hand in the
    layout's shape (state.json of a real checkpoint, placeholder shards), so no process group is needed."""
    from fastgrow.checkpoint import commit_checkpoint, new_checkpoint_dir

    st = _state(tmp_path, step=4)
    single = save_checkpoint(st, tmp_path / "single", keep=2)
    final = tmp_path / "run" / "step-00000004"
    final.parent.mkdir()
    tmp = new_checkpoint_dir(final)
    (tmp / "state.json").write_bytes((single / "state.json").read_bytes())
    (tmp / "dcp").mkdir()
    for name in (".metadata", "__0_0.distcp", "__1_0.distcp"):
        (tmp / "dcp" / name).write_bytes(name.encode())
    commit_checkpoint(tmp, final, 4, "dcp")
    assert verify_checkpoint(final)["layout"] == "dcp"
    (final / "dcp" / "__2_0.distcp").write_bytes(b"stray")
    with pytest.raises(CheckpointError, match=r"dcp/__2_0\.distcp not listed in the manifest"):
        verify_checkpoint(final)
    (final / "dcp" / "__2_0.distcp").unlink()
    (final / "dcp" / ".metadata").unlink()
    with pytest.raises(CheckpointError, match=r"\.metadata: missing"):
        verify_checkpoint(final)
