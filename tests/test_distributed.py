"""Several ranks on the CPU (gloo, 2 processes): the same training as one process (growth included),
checkpoints that resume at any world size, bitwise resharding and sharded growth, SIGTERM on one rank,
one rank failing, and the run lock. Each launch has a hard timeout (a hang fails, never blocks)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from cli_helpers import write_toml
from conftest import tiny_run_config
from dist_helpers import REPO, altered_data_copy, cli, spawn, wait

from fastgrow.checkpoint import latest_checkpoint, list_checkpoints, load_checkpoint, read_manifest
from fastgrow.config import GrowthConfig
from fastgrow.metrics import read_metrics
from fastgrow.runlock import RunLockedError
from fastgrow.train import train

TIMEOUT = 150  # seconds per launch: far above the ~10 s a launch takes on 2 busy cores
REL = 1e-3  # the bound; the sums run in another order, nothing else differs


def run_cfg(data, out, **train_kw):
    """Tiny model, 8 steps of 4 x 32 tokens, eval at 4 and 8, two growth stages: stack x2 after 3 steps
    (moments carried, LR re-warmed), then width x2 (dim, heads, ffn) after 5 with a fresh optimizer."""
    kw = dict(max_steps=8, eval_every=4, ckpt_every=0, device="cpu", dist_timeout=30.0)
    kw.update(train_kw)
    cfg = tiny_run_config(data, out, **kw)
    stages = (
        GrowthConfig(at_tokens=3 * 4 * 32, op="stack", factor=2, schedule="rewarm", rewarm_steps=2),
        GrowthConfig(at_tokens=5 * 4 * 32, op="width", target_dim=64, target_ffn_dim=128, optimizer="reset"),
    )
    return dataclasses.replace(cfg, growth=stages)


def records(run_dir: Path, kind: str) -> list[dict]:
    return [r for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r["kind"] == kind]


def by_step(run_dir: Path, kind: str = "train", key: str = "loss") -> dict[int, float]:
    recs = records(run_dir, kind)
    steps = [r["step"] for r in recs]
    assert len(steps) == len(set(steps)), f"duplicated {kind} lines (more than one rank logging?): {steps}"
    return {r["step"]: r[key] for r in recs}


def assert_close(got: dict[int, float], want: dict[int, float], steps) -> None:
    for s in steps:
        assert abs(got[s] - want[s]) <= REL * abs(want[s]), (s, got[s], want[s])


@pytest.fixture(scope="module")
def reference(tiny_data, tmp_path_factory):
    """The one-process run every distributed run must reproduce."""
    out = tmp_path_factory.mktemp("one") / "run"
    train(run_cfg(tiny_data, out), echo=False)
    return out


def test_torchrun_matches_one_process_through_growth_and_resumes_in_one_process(tiny_data, tmp_path, reference):
    cfg = run_cfg(tiny_data, tmp_path / "two")
    toml = write_toml(cfg, tmp_path / "run.toml")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    cmd = ["torchrun", "--standalone", "--nproc_per_node=2", "--no-python", "fastgrow", "train"]
    proc = subprocess.run(
        [*cmd, "--config", toml, "--steps", "6"], capture_output=True, text=True, timeout=TIMEOUT, cwd=REPO, env=env
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count('"steps": 6') == 1  # the summary comes from rank 0 only
    one, two = by_step(reference), by_step(tmp_path / "two")
    assert sorted(two) == [1, 2, 3, 4, 5, 6]
    assert_close(two, one, range(1, 7))
    assert_close(by_step(tmp_path / "two", "val", "val_loss"), by_step(reference, "val", "val_loss"), [4])
    grew = records(tmp_path / "two", "growth")
    assert [(g["step"], g["layers_after"], g["params_after"]) for g in grew] == [
        (g["step"], g["layers_after"], g["params_after"]) for g in records(reference, "growth")
    ]
    assert [(g["step"], g["stage"], g["layers_after"]) for g in grew] == [(3, 0, 4), (5, 1, 4)]
    for key in ("val_loss_before", "val_loss_after"):  # the growth event's sharded evaluations
        assert_close(
            {g["step"]: g[key] for g in grew}, {g["step"]: g[key] for g in records(reference, "growth")}, [3, 5]
        )
    ckpt = latest_checkpoint(tmp_path / "two")
    assert ckpt.name == "step-00000006" and read_manifest(ckpt)["layout"] == "dcp"
    assert sorted(n for n in read_manifest(ckpt)["files"] if n.endswith(".distcp")) == [
        "dcp/__0_0.distcp",
        "dcp/__1_0.distcp",
    ]
    # The 2-rank checkpoint (grown model, sharded) resumes in this single process.
    res = train(cfg, resume=True, echo=False)
    assert res.state.step == 8 and (res.state.model.cfg.n_layers, res.state.model.cfg.dim) == (4, 64)
    assert_close(by_step(tmp_path / "two"), one, [7, 8])
    # `fastgrow export` reads the sharded checkpoint: the same weights as a one-process load of it.
    from fastgrow.checkpoint_dcp import read_model_weights

    weights = read_model_weights(ckpt)
    for name, t in load_checkpoint(ckpt).model.state_dict().items():
        assert torch.equal(weights[name], t), name


def test_reshard_and_sharded_growth_are_bitwise(tiny_data, tmp_path):
    """1 -> 2 ranks and 2 ranks -> 1 process restore bitwise the saved state; grow() of the sharded
    state gives bitwise the tensors of grow() in one process, for depth, new-block, noise and width
    operators; a NaN on one rank makes every rank skip that step."""
    cfg = run_cfg(tiny_data, tmp_path / "single", max_steps=4, eval_every=0)
    train(dataclasses.replace(cfg, growth=()), echo=False, until_step=2)
    (tmp_path / "cfg.json").write_text(dataclasses.replace(cfg, growth=()).to_json())
    worker = [sys.executable, str(REPO / "tests" / "dist_worker.py"), str(tmp_path)]
    ranks = spawn([worker, worker], tmp_path / "logs")
    assert wait(ranks, TIMEOUT) == [0, 0], ranks[0].stderr[-3000:] + ranks[1].stderr[-3000:]
    results = json.loads((tmp_path / "results.json").read_text())
    for check, bad in results.items():
        if check not in ("skips", "losses"):
            assert bad == [], (check, bad)
    assert results["skips"] == [[0, 0, 1, 0, 0]] * 2
    assert results["losses"][0] == results["losses"][1]
    # The DCP checkpoint the two ranks wrote, read back by one process: the one-process state, bitwise.
    a = load_checkpoint(tmp_path / "single")
    b = load_checkpoint(tmp_path / "dcp")
    assert read_manifest(latest_checkpoint(tmp_path / "dcp"))["layout"] == "dcp"
    for name, t in a.model.state_dict().items():
        assert torch.equal(t, b.model.state_dict()[name]), name
    pa, pb = dict(a.model.named_parameters()), dict(b.model.named_parameters())
    for name, p in pa.items():
        sa, sb = a.optimizer.state[p], b.optimizer.state[pb[name]]
        for key in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa[key], sb[key]), (name, key)
    assert (a.step, a.tokens, a.cursor, a.schedule) == (b.step, b.tokens, b.cursor, b.schedule)


def test_ddp_matches_one_process_through_growth(tiny_data, tmp_path, reference):
    cfg = run_cfg(tiny_data, tmp_path / "ddp", parallel="ddp")
    toml = write_toml(cfg, tmp_path / "run.toml")
    peak = 1e9
    ranks = spawn([cli("train", "--config", toml)] * 2, tmp_path / "logs", env={"FASTGROW_PEAK_FLOPS": str(peak)})
    assert wait(ranks, TIMEOUT) == [0, 0], ranks[0].stderr[-3000:] + ranks[1].stderr[-3000:]
    assert_close(by_step(tmp_path / "ddp"), by_step(reference), range(1, 9))
    # tokens/s counts both ranks' tokens (the global batch), MFU is against 2 x the device peak.
    from fastgrow.model import flops_per_token

    for r in records(tmp_path / "ddp", "train"):
        arch = cfg.model if r["step"] <= 3 else dataclasses.replace(cfg.model, n_layers=4)
        if r["step"] > 5:
            arch = dataclasses.replace(arch, dim=64, n_heads=8, n_kv_heads=4, ffn_dim=128)
        want = flops_per_token(arch, cfg.data.seq_len) * r["tokens_per_s"] / (2 * peak)
        assert r["tokens"] == r["step"] * 4 * 32 and r["mfu"] == pytest.approx(want, rel=1e-9)
    assert read_manifest(latest_checkpoint(tmp_path / "ddp")).get("layout", "single") == "single"
    assert ranks[1].stdout == ""  # rank 1 prints nothing


def _wait_for_steps(run_dir: Path, n: int, ranks, timeout: float = TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if any(r.proc.poll() is not None for r in ranks):
            raise AssertionError("a rank exited early:\n" + "\n".join(r.stderr[-2000:] for r in ranks))
        f = run_dir / "metrics.jsonl"
        if f.is_file() and sum('"kind": "train"' in line for line in f.read_text().splitlines()) >= n:
            return
        time.sleep(0.1)
    for r in ranks:
        r.proc.kill()
    raise AssertionError("no training progress")


def test_sigterm_on_one_rank_saves_once_and_every_rank_exits_and_the_lock_refuses_others(tiny_data, tmp_path):
    cfg = run_cfg(tiny_data, tmp_path / "run", max_steps=100_000, eval_every=0)
    toml = write_toml(cfg, tmp_path / "run.toml")
    ranks = spawn([cli("train", "--config", toml)] * 2, tmp_path / "logs")
    try:
        _wait_for_steps(tmp_path / "run", 2, ranks)
        # A second trainer on the directory the distributed run uses is refused (rank 0 holds the lock).
        with pytest.raises(RunLockedError, match=f"pid {ranks[0].proc.pid}"):
            train(cfg, resume=True, echo=False)
        ranks[1].proc.send_signal(signal.SIGTERM)  # rank 1 only
        codes = wait(ranks, TIMEOUT)
    finally:
        for r in ranks:
            if r.proc.poll() is None:
                r.proc.kill()
    assert codes == [143, 143], ranks[0].stderr[-2000:] + ranks[1].stderr[-2000:]
    ckpts = list_checkpoints(tmp_path / "run")
    last = max(by_step(tmp_path / "run"))
    assert [c.name for c in ckpts] == [f"step-{last:08d}"]  # saved once, at the step both ranks stopped
    assert "SIGTERM: saved" in ranks[0].stderr and "SIGTERM" not in ranks[1].stderr
    assert read_manifest(ckpts[0])["layout"] == "dcp"


def test_a_failing_rank_stops_every_rank_with_its_message(tiny_data, tmp_path):
    cfg = run_cfg(tiny_data, tmp_path / "a", eval_every=0)
    toml = write_toml(cfg, tmp_path / "run.toml")
    # At start: rank 1 cannot find its data.
    missing = tmp_path / "no-data"
    ranks = spawn(
        [cli("train", "--config", toml), cli("train", "--config", toml, f"--data.data_dir={missing}")], tmp_path / "l1"
    )
    assert wait(ranks, TIMEOUT) == [1, 2]
    assert f"fastgrow: error: rank 1: data directory {missing} not found" in ranks[1].stderr
    assert f"fastgrow: error: rank 1 failed: data directory {missing} not found" in ranks[0].stderr
    assert "Traceback" not in ranks[0].stderr + ranks[1].stderr
    assert latest_checkpoint(tmp_path / "a") is None
    # In the loop: rank 1's tokens are outside the vocabulary, its first forward pass raises.
    oov = altered_data_copy(tiny_data, tmp_path / "oov", token=600)
    out = tmp_path / "b"
    ranks = spawn(
        [
            cli("train", "--config", toml, f"--train.out_dir={out}"),
            cli("train", "--config", toml, f"--train.out_dir={out}", f"--data.data_dir={oov}"),
        ],
        tmp_path / "l2",
    )
    codes = wait(ranks, TIMEOUT)
    assert codes[0] == 1 and codes[1] != 0
    assert "fastgrow: error: rank 1 failed: IndexError" in ranks[0].stderr, ranks[0].stderr[-3000:]
