"""Growth inside a training run: train -> grow -> checkpoint/resume bitwise on CPU, offline growth of a
checkpoint through the same grow(), and the `plan` / `grow` subcommands."""

from __future__ import annotations

import argparse
import dataclasses
import json

import numpy as np
import pytest
import torch
from growth_helpers import legacy_growth_table, stream_run, write_token_stream

from fastgrow.checkpoint import latest_checkpoint, load_checkpoint, read_meta
from fastgrow.config import GrowthConfig, RunConfig
from fastgrow.grow import GrowPlan
from fastgrow.grow_cli import add_growth_commands, grow_checkpoint
from fastgrow.train import train as _train

VOCAB = 61
STALE_STATE = (
    "the trainer grew more than once in one run: its loop must use the TrainState that grow() returned "
    "(self.state), not one bound before the growth event"
)


class _GrewTwice(RuntimeError):
    pass


def train(cfg, **kw):
    """fastgrow.train.train, failing fast (instead of growing without bound) if one run grows more often
    than it has stages."""
    import fastgrow.grow_event as event_mod

    real = event_mod.apply_growth
    calls = []

    def counted(state, growth_cfg, **kw):
        calls.append(state.step)
        if len(calls) > len(cfg.growth):
            raise _GrewTwice(f"apply_growth called again at step(s) {calls}")
        return real(state, growth_cfg, **kw)

    event_mod.apply_growth = counted
    try:
        return _train(cfg, **kw)
    except _GrewTwice:
        pytest.fail(STALE_STATE)
    finally:
        event_mod.apply_growth = real


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A tiny token stream in the loader's on-disk format (uint16 shard + meta.json)."""
    return write_token_stream(tmp_path_factory.mktemp("tokens"), vocab=VOCAB)


def run_cfg(data_dir, out_dir, growth: tuple[GrowthConfig, ...] | None = None) -> RunConfig:
    default = (GrowthConfig(at_tokens=3 * 32, op="stack", factor=2, schedule="rewarm", rewarm_steps=2),)
    return stream_run(data_dir, out_dir, default if growth is None else growth)


def params_of(state) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in state.model.named_parameters()}


def moments_of(state) -> dict[str, torch.Tensor]:
    out = {}
    for n, p in state.model.named_parameters():
        for k, v in state.optimizer.state.get(p, {}).items():
            out[f"{n}.{k}"] = v.clone()
    return out


def assert_bitwise(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


@pytest.fixture(scope="module")
def straight(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight")
    res = train(run_cfg(data_dir, out), echo=False)
    return res


def test_growth_happens_in_run(straight):
    st = straight.state
    assert st.step == 8 and st.model.cfg.n_layers == 4
    (rec,) = st.growth_history
    assert rec["step"] == 3 and rec["tokens"] == 96 and rec["sources"] == [0, 1, 0, 1]
    grows = [r for r in straight.records if r["kind"] == "growth"]
    assert len(grows) == 1 and grows[0]["layers_after"] == 4
    assert st.schedule.rewarm_start == 3 and st.schedule.rewarm_steps == 2
    assert all(np.isfinite(r["loss"]) for r in straight.records if r["kind"] == "train")


@pytest.mark.parametrize("stop_at", [2, 3, 5])
def test_resume_across_growth_is_bitwise(data_dir, tmp_path, straight, stop_at):
    """Stop before (2), exactly at (3: tokens reached, not yet grown) and after (5) the growth event,
    resume from the checkpoint, and land on the straight run's weights and moments bit for bit."""
    cfg = run_cfg(data_dir, tmp_path / "run")
    first = train(cfg, echo=False, until_step=stop_at)
    assert first.state.step == stop_at
    assert (first.state.model.cfg.n_layers == 4) == (stop_at > 3)
    second = train(cfg, resume=True, echo=False)
    assert second.state.step == 8 and len(second.state.growth_history) == 1
    assert_bitwise(params_of(second.state), params_of(straight.state))
    assert_bitwise(moments_of(second.state), moments_of(straight.state))


def assert_continues_like(cfg, grown_dir, straight):
    """Continue the offline-grown checkpoint in `grown_dir` as a run of `cfg`: no second growth, and the
    same weights as the run `straight` that grew in-run."""
    cont = train(
        dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, out_dir=str(grown_dir))), resume=True, echo=False
    )
    assert len(cont.state.growth_history) == 1
    assert_bitwise(params_of(cont.state), params_of(straight.state))


def test_offline_grow_checkpoint_matches_in_run_growth(data_dir, tmp_path, straight):
    cfg = run_cfg(data_dir, tmp_path / "small")
    train(cfg, echo=False, until_step=3)  # checkpoint at step 3, tokens 96, not grown yet
    ckpt = latest_checkpoint(tmp_path / "small")
    rng = torch.get_rng_state()
    plan = GrowPlan("stack", factor=2, schedule="rewarm", rewarm_steps=2)
    out = grow_checkpoint(ckpt, tmp_path / "grown", plan)
    assert torch.equal(torch.get_rng_state(), rng)  # the caller's RNG is left alone
    assert read_meta(out)["model_config"]["n_layers"] == 4
    grown = load_checkpoint(out, "cpu", restore_rng=False)
    assert grown.model.cfg.n_layers == 4 and grown.step == 3
    assert_continues_like(cfg, tmp_path / "grown", straight)
    with pytest.raises(ValueError, match="another run directory"):
        grow_checkpoint(ckpt, tmp_path / "small", plan)
    with pytest.raises(ValueError, match="malformed"):
        grow_checkpoint(ckpt, tmp_path / "bad", GrowPlan("partial", spec="12-3x"))
    assert not (tmp_path / "bad").exists() or latest_checkpoint(tmp_path / "bad") is None


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastgrow")
    add_growth_commands(p.add_subparsers(dest="command", required=True))
    return p


def test_plan_command_json(capsys):
    args = _parser().parse_args(["plan", "--params", "7B", "--tokens", "300B", "--json"])
    assert args.func(args, []) == 0
    d = json.loads(capsys.readouterr().out)
    for key in ("growth_tokens", "factor", "base_layers", "flops_small", "flops_large"):
        assert key in d
    assert d["factor"] == 4 and d["base_layers"] == 8
    assert d["growth_tokens"] == pytest.approx(2.0481e10, rel=2e-4)
    args = _parser().parse_args(["plan", "--preset", "410M", "--tokens", "2e12"])
    assert args.func(args, []) == 0
    assert "grow after d" in capsys.readouterr().out


def test_grow_command(data_dir, tmp_path, capsys):
    cfg = run_cfg(data_dir, tmp_path / "small", growth=())
    train(cfg, echo=False, until_step=2)
    args = _parser().parse_args(
        ["grow", str(tmp_path / "small"), str(tmp_path / "big"), "--op", "partial", "--spec", "1-2*3"]
    )
    assert args.func(args, []) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["layers"] == 4 and out["params_after"] > out["params_before"]


def test_resume_after_growth_in_a_new_process(data_dir, tmp_path, straight):
    """The same, with the second half in a fresh interpreter (nothing cached in this process helps)."""
    import subprocess
    import sys

    cfg = run_cfg(data_dir, tmp_path / "run")
    train(cfg, echo=False, until_step=5)
    (tmp_path / "cfg.json").write_text(cfg.to_json())
    script = (
        "import json, sys, torch\n"
        "from fastgrow.config import RunConfig\n"
        "from fastgrow.train import train\n"
        "cfg = RunConfig.from_dict(json.loads(open(sys.argv[1]).read()))\n"
        "st = train(cfg, resume=True, echo=False).state\n"
        "torch.save({n: p.detach() for n, p in st.model.named_parameters()}, sys.argv[2])\n"
    )
    out = tmp_path / "params.pt"
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "cfg.json"), str(out)], check=True, timeout=120)
    assert_bitwise(torch.load(out), params_of(straight.state))


def test_grow_checkpoint_refuses_a_run_directory_that_has_checkpoints(tmp_path):
    import pytest
    import torch
    from conftest import tiny_run_config

    from fastgrow.checkpoint import save_checkpoint
    from fastgrow.grow import GrowPlan
    from fastgrow.grow_cli import grow_checkpoint
    from fastgrow.state import build_state

    st = build_state(tiny_run_config(tmp_path / "d", tmp_path / "src"), "cpu")
    st.step = 3
    save_checkpoint(st, tmp_path / "src")
    st.step = 20
    save_checkpoint(st, tmp_path / "out")
    with pytest.raises(ValueError, match="already holds checkpoints"):
        grow_checkpoint(tmp_path / "src", tmp_path / "out", GrowPlan(depth="stack", factor=2))
    assert torch.get_rng_state() is not None


# --- several stages in one run -----------------------------------------------------------------------

TWO_STAGES = """
[[growth]]
at_tokens = 96            # step 3: G_stack 2 -> 4 layers
op = "stack"
factor = 2

[[growth]]
at_tokens = 192           # step 6: 4 -> 8 layers, new blocks are identities (function kept)
op = "zero"
target_layers = 8
schedule = "rewarm"
rewarm_steps = 2
"""


def two_stage_cfg(data_dir, out_dir, tmp_path) -> RunConfig:
    from fastgrow.config_files import load_toml

    f = tmp_path / "stages.toml"
    f.write_text(TWO_STAGES)
    stages = load_toml(f).growth
    return run_cfg(data_dir, out_dir, growth=stages)


@pytest.fixture(scope="module")
def straight_two(data_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("two")
    return train(two_stage_cfg(data_dir, tmp / "run", tmp), echo=False)


def test_two_stage_run_logs_both_growths(straight_two):
    st = straight_two.state
    assert st.step == 8 and st.model.cfg.n_layers == 8
    assert [r["stage"] for r in st.growth_history] == [0, 1]
    assert [(r["step"], r["tokens"]) for r in st.growth_history] == [(3, 96), (6, 192)]
    assert st.growth_history[1]["sources"] == [0, 1, 2, 3, -1, -1, -1, -1]
    grows = [r for r in straight_two.records if r["kind"] == "growth"]
    assert [(g["stage"], g["layers_before"], g["layers_after"], g["op"]) for g in grows] == [
        (0, 2, 4, "stack"),
        (1, 4, 8, "zero"),
    ]
    for g, h in zip(grows, st.growth_history):
        assert g["val_loss_before"] == h["val_loss_before"] and g["val_loss_after"] == h["val_loss_after"]
        assert np.isfinite(g["val_loss_before"]) and np.isfinite(g["val_loss_after"])
    # Stage 1 adds identity blocks: the validation loss right after growth, before any step of the grown
    # model, is the loss right before it.
    assert grows[1]["val_loss_after"] == grows[1]["val_loss_before"]
    # Stage 0 (G_stack) changes the function: its measured loss moves.
    assert grows[0]["val_loss_after"] != grows[0]["val_loss_before"]
    # FLOPs count each phase at its own size: 3 steps at 2 layers, 3 at 4, 2 at 8.
    from fastgrow.model import flops_per_token

    m = st.config.model
    f = [flops_per_token(dataclasses.replace(m, n_layers=n), 16) for n in (2, 4, 8)]
    last = [r for r in straight_two.records if r["kind"] == "train"][-1]
    assert last["flops"] == pytest.approx(32 * (3 * f[0] + 3 * f[1] + 2 * f[2]), rel=1e-12)
    assert st.schedule.rewarm_start == 6 and st.schedule.rewarm_steps == 2


@pytest.mark.parametrize("stop_at", [2, 4, 6, 7])
def test_resume_between_stages_is_bitwise(data_dir, tmp_path, straight_two, stop_at):
    """Stop before stage 0, between the stages, exactly at stage 1 (tokens reached, not yet grown) and
    after it; resume; land on the straight run's weights and moments bit for bit."""
    cfg = two_stage_cfg(data_dir, tmp_path / "run", tmp_path)
    first = train(cfg, echo=False, until_step=stop_at)
    assert len(first.state.growth_history) == (stop_at > 3) + (stop_at > 6)
    second = train(cfg, resume=True, echo=False)
    assert second.state.step == 8 and [r["stage"] for r in second.state.growth_history] == [0, 1]
    assert_bitwise(params_of(second.state), params_of(straight_two.state))
    assert_bitwise(moments_of(second.state), moments_of(straight_two.state))


def test_bad_stage_chains_fail_at_start(data_dir, tmp_path):
    """Each stage is checked against the model the previous stage makes, before any step, and a stage
    the run never reaches is an error (it would silently never happen)."""
    from fastgrow.config import ConfigError

    bad = [
        # stage 1 reads layer 5 of what stage 0 made (4 layers)
        (
            (GrowthConfig(at_tokens=64, factor=2), GrowthConfig(at_tokens=96, op="partial", spec="1-5*2")),
            "growth\\[1\\]",
        ),
        # direct width from dim 32 to 48 is not an integer multiple
        ((GrowthConfig(at_tokens=64, op="width", target_dim=48),), "growth\\[0\\]: .*integer"),
        # step 8 of an 8-step run: growth would come after the last step
        ((GrowthConfig(at_tokens=8 * 32, factor=2),), "growth\\[0\\].at_tokens = 256 is never reached"),
        ((GrowthConfig(at_tokens=32, factor=2), GrowthConfig(at_tokens=7 * 32 + 1, factor=2)), "growth\\[1\\]"),
    ]
    for stages, needle in bad:
        cfg = run_cfg(data_dir, tmp_path / "bad", growth=stages)
        with pytest.raises(ConfigError, match=needle):
            train(cfg, echo=False)
        assert latest_checkpoint(tmp_path / "bad") is None


def test_resume_a_checkpoint_with_a_legacy_growth_table(data_dir, tmp_path, straight):
    """Checkpoints of older versions store [growth] as one table (every field, unused ones included):
    they resume under the equivalent one-stage config."""
    from fastgrow.checkpoint import MANIFEST
    from fastgrow.fsutil import sha256_file

    cfg = run_cfg(data_dir, tmp_path / "run")
    train(cfg, echo=False, until_step=2)
    ckpt = latest_checkpoint(tmp_path / "run")
    meta = json.loads((ckpt / "state.json").read_text())
    meta["config"]["growth"] = legacy_growth_table(at_tokens=96, factor=2, schedule="rewarm", rewarm_steps=2)
    (ckpt / "state.json").write_text(json.dumps(meta))
    manifest = json.loads((ckpt / MANIFEST).read_text())
    f = ckpt / "state.json"
    manifest["files"]["state.json"] = {"bytes": f.stat().st_size, "sha256": sha256_file(f)}
    (ckpt / MANIFEST).write_text(json.dumps(manifest))
    second = train(cfg, resume=True, echo=False)
    assert_bitwise(params_of(second.state), params_of(straight.state))


def test_a_0_layer_base_grows_in_a_run_and_the_progress_line_shows_the_loss(data_dir, tmp_path, capsys):
    """Bu et al. 2025's 0-layer base (embeddings and head only) grown late in a WSD run with identity
    blocks: the loss right after growth is the loss before it, and the progress bar's growth line says so."""
    cfg = run_cfg(data_dir, tmp_path / "z", growth=(GrowthConfig(at_tokens=5 * 32, op="zero", target_layers=2),))
    cfg = dataclasses.replace(
        cfg,
        model=dataclasses.replace(cfg.model, n_layers=0),
        train=dataclasses.replace(cfg.train, schedule="wsd", progress=True),
    )
    res = train(cfg, echo=True)
    (g,) = [r for r in res.records if r["kind"] == "growth"]
    assert (g["layers_before"], g["layers_after"], g["step"]) == (0, 2, 5)
    assert g["val_loss_after"] == g["val_loss_before"]
    err = capsys.readouterr().err
    assert (
        "growth[0] zero 0→2 layers" in err and f"val_loss {g['val_loss_before']:.4f} → {g['val_loss_after']:.4f}" in err
    )
