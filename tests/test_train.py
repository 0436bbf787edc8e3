"""The training loop: bitwise resume in a new process, non-finite steps, SIGTERM, one-line errors."""

import signal
from pathlib import Path

import pytest
import torch
from cli_helpers import interrupt_cli_train, run_cli, write_toml
from conftest import tiny_run_config
from safetensors.torch import load_file

from fastgrow.checkpoint import latest_checkpoint, load_checkpoint, optimizer_tensors
from fastgrow.config import ConfigError
from fastgrow.metrics import read_metrics
from fastgrow.train import TrainingAborted, train


def losses(run_dir):
    return {r["step"]: r["loss"] for r in read_metrics(Path(run_dir) / "metrics.jsonl") if r["kind"] == "train"}


def test_resume_is_bitwise_exact_in_a_new_process(tiny_data, tmp_path):
    straight = tiny_run_config(tiny_data, tmp_path / "a", max_steps=8, ckpt_every=0)
    res = train(straight, echo=False)
    # N steps, checkpoint, then a NEW process resumes and does the other N.
    split = tiny_run_config(tiny_data, tmp_path / "b", max_steps=8, ckpt_every=0)
    first = train(split, echo=False, until_step=4)
    assert first.checkpoint.name == "step-00000004"
    cfg_file = write_toml(split, tmp_path / "b.toml")
    proc = run_cli("train", "--config", cfg_file, "--resume")
    assert proc.returncode == 0, proc.stderr
    resumed = load_checkpoint(tmp_path / "b", "cpu")
    assert resumed.step == res.state.step == 8 and resumed.tokens == res.state.tokens
    for name, t in res.state.model.state_dict().items():
        assert torch.equal(t, resumed.model.state_dict()[name]), name
    a, b = optimizer_tensors(res.state), optimizer_tensors(resumed)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    la, lb = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert all(la[s] == lb[s] for s in range(1, 9)), (la, lb)


def test_resume_with_a_different_config_is_refused(tiny_data, tmp_path):
    cfg = tiny_run_config(tiny_data, tmp_path / "r")
    train(cfg, echo=False, until_step=4)
    changed = tiny_run_config(tiny_data, tmp_path / "r", lr=1e-3)
    with pytest.raises(ConfigError, match=r"train.lr: checkpoint 0.003 vs now 0.001"):
        train(changed, resume=True, echo=False)
    # Logging / checkpoint cadence may change on resume.
    ok = tiny_run_config(tiny_data, tmp_path / "r", log_every=2, ckpt_every=0)
    assert train(ok, resume=True, echo=False).state.step == 8


def test_refuses_to_overwrite_a_run_and_resume_needs_a_checkpoint(tiny_data, tmp_path):
    cfg = tiny_run_config(tiny_data, tmp_path / "x")
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        train(cfg, resume=True, echo=False)
    train(cfg, echo=False, until_step=4)
    with pytest.raises(ConfigError, match="already holds checkpoints"):
        train(cfg, echo=False)


def test_nonfinite_steps_are_skipped_without_touching_adam(tiny_data, tmp_path, monkeypatch):
    from fastgrow import model as model_mod

    calls = {"n": 0}
    real_forward = model_mod.Transformer.forward

    def flaky_forward(self, tokens, targets=None):
        out = real_forward(self, tokens, targets)
        calls["n"] += 1
        return out * float("nan") if calls["n"] == 3 else out  # the 3rd step's loss is NaN

    monkeypatch.setattr(model_mod.Transformer, "forward", flaky_forward)
    cfg_long = tiny_run_config(tiny_data, tmp_path / "nan2", max_steps=4, ckpt_every=0)
    res = train(cfg_long, echo=False, until_step=2)
    before = {k: v.clone() for k, v in optimizer_tensors(res.state).items()}
    weights = {k: v.clone() for k, v in res.state.model.state_dict().items()}
    res3 = train(cfg_long, resume=True, echo=False, until_step=3)  # calls["n"] hits 3 here
    after = optimizer_tensors(res3.state)
    for k in before:
        assert torch.equal(before[k], after[k]), k
    for k, v in res3.state.model.state_dict().items():
        assert torch.equal(weights[k], v), k
    rec = [r for r in res3.records if r["kind"] == "train"][-1]
    assert rec["skipped_steps"] == 1 and res3.state.step == 3


def test_aborts_after_k_consecutive_bad_steps(tiny_data, tmp_path, monkeypatch):
    from fastgrow import model as model_mod

    real_forward = model_mod.Transformer.forward
    monkeypatch.setattr(
        model_mod.Transformer, "forward", lambda self, t, y=None: real_forward(self, t, y) * float("inf")
    )
    cfg = tiny_run_config(tiny_data, tmp_path / "inf", max_steps=8, max_bad_steps=3, log_every=4)
    with pytest.raises(TrainingAborted, match="3 consecutive non-finite steps"):
        train(cfg, echo=False)


def test_sigterm_saves_then_exits(tiny_data, tmp_path):
    cfg = tiny_run_config(tiny_data, tmp_path / "term", max_steps=100000, ckpt_every=0, log_every=1)
    cfg_file = write_toml(cfg, tmp_path / "term.toml")
    code, _, err = interrupt_cli_train(
        cfg_file, tmp_path / "term" / "metrics.jsonl", after_records=2, sig=signal.SIGTERM
    )
    assert code == 143, err
    ckpt = latest_checkpoint(tmp_path / "term")
    assert ckpt is not None and "SIGTERM: saved" in err
    assert load_checkpoint(ckpt).step >= 2


def test_cli_errors_are_one_line(tiny_data, tmp_path):
    p = run_cli("train", "--data.data_dir=" + str(tmp_path / "missing"), "--train.out_dir=" + str(tmp_path / "o"))
    assert p.returncode == 2
    assert p.stderr.strip().count("\n") == 0 and "fastgrow prepare" in p.stderr, p.stderr
    p = run_cli("train", "--model.dim=100", "--model.n_heads=3")
    assert p.returncode == 2 and p.stderr.startswith("fastgrow: error: model.dim (100) must be divisible"), p.stderr
    p = run_cli("train", "--train.lr=fast")
    assert p.returncode == 2 and "train.lr must be a number" in p.stderr and p.stderr.count("\n") == 1


def test_corrupt_shard_is_named(tiny_data, tmp_path):
    import shutil

    data = tmp_path / "data"
    shutil.copytree(tiny_data, data)
    shard = sorted(data.glob("*.bin"))[0]
    raw = bytearray(shard.read_bytes())
    raw[10] ^= 0xFF
    shard.write_bytes(bytes(raw))
    p = run_cli("train", f"--data.data_dir={data}", f"--train.out_dir={tmp_path / 'o'}")
    assert p.returncode == 2 and shard.name in p.stderr and "checksum" in p.stderr, p.stderr
    assert p.stderr.count("\n") == 1


def test_metrics_lines_have_the_documented_fields(tiny_data, tmp_path):
    cfg = tiny_run_config(tiny_data, tmp_path / "m", max_steps=4, eval_every=2, ckpt_every=0)
    train(cfg, echo=False)
    recs = read_metrics(tmp_path / "m" / "metrics.jsonl")
    tr = [r for r in recs if r["kind"] == "train"]
    assert len(tr) == 4
    for key in ("step", "tokens", "loss", "lr", "grad_norm", "tokens_per_s", "mfu", "flops"):
        assert key in tr[0]
    assert tr[-1]["tokens"] == 4 * 4 * 32
    assert [r["step"] for r in recs if r["kind"] == "val"] == [2, 4]
    assert load_file(str(latest_checkpoint(tmp_path / "m") / "model.safetensors"))


def test_device_side_skip_path_aborts_on_a_bad_run_between_log_steps(tiny_data, tmp_path, monkeypatch):
    """The CUDA path (fused AdamW with found_inf, no per-step sync), exercised on CPU's fused AdamW."""
    import fastgrow.state as state_mod
    from fastgrow import model as model_mod

    def fused(model, cfg):
        return torch.optim.AdamW(model.parameters(), lr=cfg.lr, fused=True)

    monkeypatch.setattr(state_mod, "build_optimizer", fused)
    real_forward = model_mod.Transformer.forward
    calls = {"n": 0}

    def forward(self, t, y=None):
        calls["n"] += 1
        out = real_forward(self, t, y)
        return out * float("nan") if 2 <= calls["n"] <= 5 else out  # 4 bad steps, then good ones

    monkeypatch.setattr(model_mod.Transformer, "forward", forward)
    cfg = tiny_run_config(tiny_data, tmp_path / "f", max_steps=8, max_bad_steps=3, log_every=8, ckpt_every=0)
    with pytest.raises(TrainingAborted, match="4 consecutive non-finite steps"):
        train(cfg, echo=False)


def test_a_bad_growth_plan_fails_at_start_not_at_the_event(tiny_data, tmp_path):
    from fastgrow.config_files import apply_overrides

    cfg = tiny_run_config(tiny_data, tmp_path / "g")
    cfg = apply_overrides(cfg, ["--growth.at_tokens=500", "--growth.op=partial", "--growth.spec=12-3x"])
    with pytest.raises(ConfigError, match=r"growth\[0\]: malformed stacking spec"):
        train(cfg, echo=False)
    assert latest_checkpoint(tmp_path / "g") is None


def test_auto_growth_timing_pins_max_steps_until_the_run_has_grown(tiny_data, tmp_path):
    from fastgrow.config_files import apply_overrides

    cfg = apply_overrides(tiny_run_config(tiny_data, tmp_path / "a"), ["--growth.at_tokens=auto"])
    train(cfg, echo=False, until_step=1)
    longer = apply_overrides(cfg, ["--train.max_steps=50"])
    with pytest.raises(ConfigError, match='at_tokens = "auto"'):
        train(longer, resume=True, echo=False)


def test_a_resume_that_takes_no_step_keeps_its_checkpoint(tiny_data, tmp_path):
    cfg = tiny_run_config(tiny_data, tmp_path / "n", ckpt_every=0)
    first = train(cfg, echo=False, until_step=3).checkpoint
    mtime = (first / "manifest.json").stat().st_mtime_ns
    again = train(cfg, resume=True, echo=False, until_step=3)
    assert again.checkpoint == first and (first / "manifest.json").stat().st_mtime_ns == mtime
