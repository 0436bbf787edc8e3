"""G_learn in a run and offline: val loss vs G_stack from the same base, FLOPs and tokens counted,
checkpoint/resume during and after the operator's training bit for bit, `fastgrow grow --op learn`,
and the configuration errors (CPU, tiny)."""

from __future__ import annotations

import dataclasses
import json
import os
import signal

import pytest
import torch
from test_grow_run import (  # noqa: F401 (data_dir: a fixture)
    _parser,
    assert_bitwise,
    assert_continues_like,
    data_dir,
    moments_of,
    params_of,
    run_cfg,
)

from fastgrow.checkpoint import latest_checkpoint, load_checkpoint, read_meta
from fastgrow.config import ConfigError, GrowthConfig, RunConfig
from fastgrow.grow import GrowPlan
from fastgrow.grow_learn import LearnPhase, learn_flops_per_step
from fastgrow.grow_learn_run import learn_checkpoint
from fastgrow.model import flops_per_token
from fastgrow.stages import check_stages
from fastgrow.train import train

LEARN = GrowthConfig(at_tokens=96, op="learn", factor=2, learn_steps=3, learn_lr=3e-2)  # steps 4..6 learn
STACK = GrowthConfig(at_tokens=96, op="stack", factor=2)


def learn_cfg(tokens, out_dir, growth=LEARN):
    return run_cfg(tokens, out_dir, growth=(growth,))


@pytest.fixture(scope="module")
def tokens(request):
    """test_grow_run's token stream (a noisy repeating ramp, 61-token vocabulary)."""
    return request.getfixturevalue("data_dir")


@pytest.fixture(scope="module")
def straight(tokens, tmp_path_factory):
    return train(learn_cfg(tokens, tmp_path_factory.mktemp("learn")), echo=False)


@pytest.fixture(scope="module")
def stacked(tokens, tmp_path_factory):
    return train(learn_cfg(tokens, tmp_path_factory.mktemp("stack"), STACK), echo=False)


def test_learn_beats_g_stack_from_the_same_base_and_counts_its_flops(straight, stacked):
    st = straight.state
    assert st.step == 8 and st.tokens == 8 * 32 and st.model.cfg.n_layers == 4 and st.learn is None
    (rec,) = st.growth_history
    (stack_rec,) = stacked.state.growth_history
    assert rec["op"] == "learn" and rec["stage"] == 0 and rec["sources"] == stack_rec["sources"]
    # Grown after the 3 learn steps (step 6); the small model and the data were the same up to step 3.
    assert (rec["step"], rec["tokens"], stack_rec["step"]) == (6, 192, 3)
    assert rec["val_loss_before"] == stack_rec["val_loss_before"]
    # Learn step 0 is G_stack: the loss at the start of learning is G_stack's loss right after growth.
    assert rec["val_loss_learn_start"] == stack_rec["val_loss_after"]
    # The must-hold: right after growth, G_learn's validation loss is below G_stack's.
    assert rec["val_loss_after"] < stack_rec["val_loss_after"] - 1e-3, (rec["val_loss_after"], stack_rec)
    assert rec["learn_steps"] == 3 and rec["learn_tokens"] == 3 * 32 and rec["learn_lr"] == 3e-2
    small, large = st.config.model, st.model.cfg
    per_step = learn_flops_per_step(small, large, 16, 32)
    assert rec["learn_flops"] == pytest.approx(3 * per_step, rel=1e-12)
    assert per_step > 32 * flops_per_token(large, 16)  # the expansion is counted on top of the model's
    # The run's flops: 3 small steps, 3 learn steps, 2 large steps.
    expected = 32 * (3 * flops_per_token(small, 16) + 2 * flops_per_token(large, 16)) + 3 * per_step
    last = [r for r in straight.records if r["kind"] == "train"][-1]
    assert last["flops"] == pytest.approx(expected, rel=1e-12)
    learn_lines = [r for r in straight.records if r.get("phase") == "learn"]
    assert [r["step"] for r in learn_lines if r["kind"] == "train"] == [4, 6]
    assert learn_lines[-1]["flops"] == pytest.approx(32 * 3 * flops_per_token(small, 16) + 3 * per_step)
    assert all(r["layers"] == 4 and torch.isfinite(torch.tensor(r["loss"])) for r in learn_lines)
    (grow_line,) = [r for r in straight.records if r["kind"] == "growth"]
    for key in ("learn_steps", "learn_tokens", "learn_flops", "val_loss_learn_start", "val_loss_after"):
        assert grow_line[key] == rec[key], key
    # The data cursor moved on through the learn steps: both runs consumed the same 8 batches.
    assert st.cursor == stacked.state.cursor


@pytest.mark.parametrize("stop_at", [4, 5, 7])
def test_resume_during_and_after_learning_is_bitwise(tokens, tmp_path, straight, stop_at):
    """Stop inside the operator's training (steps 4, 5) and after it (7); resume; same weights, moments."""
    cfg = learn_cfg(tokens, tmp_path / "run")
    first = train(cfg, echo=False, until_step=stop_at)
    assert first.state.step == stop_at and (first.state.learn is not None) == (stop_at < 6)
    if stop_at < 6:
        ckpt = latest_checkpoint(tmp_path / "run")
        assert (ckpt / "learn.safetensors").is_file()
        assert "learn.safetensors" in json.loads((ckpt / "manifest.json").read_text())["files"]
        assert read_meta(ckpt)["learn"]["done"] == stop_at - 3
        assert load_checkpoint(ckpt, "cpu").learn.done == stop_at - 3
    second = train(cfg, resume=True, echo=False)
    assert second.state.step == 8 and len(second.state.growth_history) == 1
    assert_bitwise(params_of(second.state), params_of(straight.state))
    assert_bitwise(moments_of(second.state), moments_of(straight.state))
    a, b = second.state.growth_history[0], straight.state.growth_history[0]
    for key in ("val_loss_learn_start", "val_loss_after", "learn_flops", "step", "tokens"):
        assert a[key] == b[key], key


def test_sigterm_during_learning_saves_and_resumes_bitwise(tokens, tmp_path, straight, monkeypatch):
    cfg = learn_cfg(tokens, tmp_path / "run")
    real = LearnPhase.train_step

    def step_then_sigterm(self, *a, **kw):
        out = real(self, *a, **kw)
        if self.done == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return out

    monkeypatch.setattr(LearnPhase, "train_step", step_then_sigterm)
    first = train(cfg, echo=False)
    monkeypatch.setattr(LearnPhase, "train_step", real)
    assert first.interrupted and first.state.step == 5 and first.state.learn.done == 2
    assert first.checkpoint.name == "step-00000005"
    second = train(cfg, resume=True, echo=False)
    assert_bitwise(params_of(second.state), params_of(straight.state))


def test_offline_learn_matches_in_run_learning(tokens, tmp_path, straight, capsys):
    cfg = learn_cfg(tokens, tmp_path / "small")
    train(cfg, echo=False, until_step=3)
    ckpt = latest_checkpoint(tmp_path / "small")
    plan = GrowPlan("stack", factor=2)
    with pytest.raises(ValueError, match="needs --data"):
        learn_checkpoint(ckpt, tmp_path / "grown", plan, None, steps=3, lr=3e-2)
    out = learn_checkpoint(ckpt, tmp_path / "grown", plan, tokens, steps=3, lr=3e-2)
    meta = read_meta(out)
    assert (meta["step"], meta["tokens"], meta["model_config"]["n_layers"]) == (6, 192, 4)
    rec = meta["growth_history"][-1]
    ref = straight.state.growth_history[0]
    for key in ("val_loss_before", "val_loss_learn_start", "val_loss_after", "learn_flops", "learn_tokens"):
        assert rec[key] == ref[key], key
    assert_continues_like(cfg, tmp_path / "grown", straight)
    # The command line: `fastgrow grow --op learn` needs --data; with it, it reports the learning.
    args = _parser().parse_args(["grow", str(ckpt), str(tmp_path / "cli"), "--op", "learn", "--factor", "2"])
    with pytest.raises(ValueError, match="needs --data DIR"):
        args.func(args, [])
    argv = ["grow", str(ckpt), str(tmp_path / "cli"), "--op", "learn", "--factor", "2", "--data", str(tokens)]
    args = _parser().parse_args([*argv, "--learn-steps", "2"])
    assert args.func(args, []) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["op"] == "learn" and printed["learn_steps"] == 2 and printed["layers"] == 4
    args = _parser().parse_args(["grow", str(ckpt), str(tmp_path / "x"), "--factor", "2", "--learn-steps", "2"])
    with pytest.raises(ValueError, match="apply to --op learn only"):
        args.func(args, [])


@pytest.mark.parametrize(
    "growth,err",
    [
        ({"learn_steps": 0}, r"growth\[0\]\.learn_steps must be an integer >= 1"),
        ({"learn_lr": -1.0}, r"growth\[0\]\.learn_lr must be > 0"),
        (
            {"target_dim": 48},
            r"growth\[0\]: G_learn's width maps start from width direct, .* not resid 32 -> 48",
        ),  # 4 -> 6 heads
        ({"target_dim": 36}, r"growth\[0\]: target width 36 is not divisible by the head dim 8"),
        (
            {"target_dim": 64, "width_op": "zero"},
            r"growth\[0\]\.width_op = 'zero': op 'learn' starts its width maps from width 'direct'",
        ),
        ({"learn_steps": 5}, r"growth\[0\]\.learn_steps = 5: G_learn trains its maps for steps 4\.\.8"),
        ({"op": "stack", "learn_steps": 5}, r"growth\[0\]\.learn_steps = 5 is not used: op 'stack' does not read it"),
        ({"noise": 0.2}, r"growth\[0\]\.noise = 0\.2 is not used: op 'learn' does not read it"),
    ],
)
def test_bad_learn_settings_are_one_clear_error(tokens, tmp_path, growth, err):
    base = {k: v for k, v in dataclasses.asdict(LEARN).items() if v != getattr(GrowthConfig(at_tokens=1), k)}
    with pytest.raises(ConfigError, match=err) as e:
        cfg = RunConfig.from_dict({**learn_cfg(tokens, tmp_path).to_dict(), "growth": [{**base, **growth}]})
        check_stages(cfg, cfg.model)
    assert "\n" not in str(e.value)


def test_study_learn_variant_budget_counts_the_learn_steps(tmp_path):
    from fastgrow.study_config import load_study
    from fastgrow.study_plan import equal_flops_steps_phases, plan_study

    study = load_study(os.path.join(os.path.dirname(__file__), "..", "tools", "study", "cpu.toml"))
    runs = {r.variant.name: r for r in plan_study(study, tmp_path)}
    learn, stack = runs["learn"], runs["stack"]
    (g,) = learn.config.growth
    assert g.op == "learn" and g.learn_steps == 10 and learn.growth_tokens == stack.growth_tokens
    t, tps = study.target, study.tokens_per_step
    f_s, f_l = flops_per_token(study.base, t.data.seq_len), flops_per_token(t.model, t.data.seq_len)
    per_learn = learn_flops_per_step(study.base, t.model, t.data.seq_len, tps)
    k = learn.growth_step
    large = learn.max_steps - k - 10
    assert learn.planned_flops == pytest.approx(k * tps * f_s + 10 * per_learn + large * tps * f_l, rel=1e-12)
    assert abs(learn.planned_flops - learn.budget_flops) <= 0.5 * tps * f_l
    # Learning costs more than the large steps it replaces, so the learn run has fewer steps than stack's.
    assert per_learn > tps * f_l and learn.max_steps < stack.max_steps
    # A learning phase that costs the whole budget leaves nothing for the grown model.
    with pytest.raises(ValueError, match="grow earlier"):
        equal_flops_steps_phases(learn.budget_flops, [(k, f_s), (10, learn.budget_flops / (10 * tps))], f_l, tps)
