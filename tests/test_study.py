"""Growth study (fastgrow.study, fastgrow.speedup, tools/growth_study.py): the speedup math on synthetic
curves with known answers, equal-FLOPs budgets, config validation, and the CPU study config end to end
(scratch, stack, zero), with reuse and resume."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import re
import shutil
from pathlib import Path

import pytest

from fastgrow.config import ConfigError
from fastgrow.model import flops_per_token
from fastgrow.speedup import Curve, envelope, flops_to_reach, loss_at, read_records, speedup_at_equal_loss
from fastgrow.study import (
    StudyConfig,
    Variant,
    equal_flops_steps,
    load_study,
    plan_study,
    resolve_timing,
    run_study,
)

ROOT = Path(__file__).resolve().parents[1]
CPU_TOML = ROOT / "tools" / "study" / "cpu.toml"
GPU_TOML = ROOT / "tools" / "study" / "gpu.toml"


@pytest.fixture
def one_thread():
    """Training tests run single-threaded: on a shared, loaded 2-core machine two OpenMP threads spin
    against other processes and make these tiny runs 5-10x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _power_curve(a: float, b: float, flops: list[float], shift: float = 1.0) -> Curve:
    """loss = a * (shift * F)^-b: a run that gets the loss scratch gets at F with F / shift FLOPs."""
    return Curve(flops=tuple(flops), loss=tuple(a * (shift * f) ** -b for f in flops))


def _grid(lo: float, hi: float, n: int) -> list[float]:
    return [lo + (hi - lo) * i / (n - 1) for i in range(n)]


# --- speedup on synthetic curves -------------------------------------------------------------------------


@pytest.mark.parametrize("s", [0.0, 0.25, 0.546, 1.5])
def test_speedup_exact_on_shifted_power_law(s):
    budget = 3.7e15
    scratch = _power_curve(9.0, 0.07, _grid(budget / 25, budget, 25))
    # A different, uneven eval grid for the grown run: the answer must not depend on where evals fall.
    grown = _power_curve(9.0, 0.07, [budget * (0.013 + 0.987 * (i / 40) ** 1.3) for i in range(41)], shift=1 + s)
    cmp = speedup_at_equal_loss(scratch, grown)
    assert cmp.target_loss == pytest.approx(9.0 * budget**-0.07, rel=1e-12)
    assert cmp.flops_scratch == pytest.approx(budget, rel=1e-12)
    assert cmp.flops_grown == pytest.approx(budget / (1 + s), rel=1e-9)
    assert cmp.speedup == pytest.approx(s, abs=1e-9)
    # Loss gap at equal FLOPs: grown's loss at the budget minus scratch's, known in closed form.
    assert cmp.loss_gap == pytest.approx(9.0 * (budget * (1 + s)) ** -0.07 - 9.0 * budget**-0.07, abs=1e-12)
    assert (cmp.loss_gap < 0) == (s > 0)


def test_speedup_with_growth_spike_and_noise_uses_the_envelope():
    budget = 1e12
    f = _grid(budget / 50, budget, 50)
    scratch = _power_curve(6.0, 0.1, f)
    # Grown: a slower small-model phase, a spike right after growth, then the scratch law shifted by 2x.
    loss = []
    for x in f:
        if x < 0.3 * budget:
            loss.append(6.0 * (0.8 * x) ** -0.1 + 0.05)
        elif x < 0.36 * budget:
            loss.append(7.5)  # the loss spike after growth
        else:
            loss.append(6.0 * (2.0 * x) ** -0.1)
    # Noise that only goes up never lowers the envelope, so the answer is unchanged.
    loss = [y + (0.3 if i % 7 == 3 and f[i] < 0.45 * budget else 0.0) for i, y in enumerate(loss)]
    grown = Curve(tuple(f), tuple(loss), growth_flops=(0.3 * budget,))
    cmp = speedup_at_equal_loss(scratch, grown)
    assert cmp.speedup == pytest.approx(1.0, abs=1e-9)
    assert envelope([3.0, 2.0, 5.0, 1.5, float("nan"), 2.5]) == [3.0, 2.0, 2.0, 1.5, 1.5, 1.5]


def test_not_reached_and_edge_cases():
    budget = 1e10
    f = _grid(budget / 10, budget, 10)
    scratch = _power_curve(5.0, 0.1, f)
    worse = _power_curve(5.0, 0.1, f, shift=0.5)
    cmp = speedup_at_equal_loss(scratch, worse)
    assert cmp.flops_grown is None and cmp.speedup is None
    assert cmp.loss_gap > 0
    # The first evaluation already below the level: its FLOPs (no extrapolation before it).
    assert flops_to_reach(scratch, 100.0) == f[0]
    assert loss_at(scratch, f[0] / 2) is None
    assert loss_at(scratch, 2 * budget) == pytest.approx(scratch.loss[-1])
    with pytest.raises(ValueError, match="strictly increasing"):
        Curve((2.0, 1.0), (1.0, 1.0))
    with pytest.raises(ValueError, match="ema"):
        envelope([1.0], ema=1.0)
    with pytest.raises(ValueError, match="level"):
        flops_to_reach(scratch, -1.0)


def test_read_records_dedupes_a_resumed_log(tmp_path):
    log = tmp_path / "metrics.jsonl"
    recs = [
        {"kind": "val", "step": 10, "flops": 1.0, "val_loss": 5.0, "tokens": 1},
        {"kind": "val", "step": 20, "flops": 2.0, "val_loss": 9.0, "tokens": 2},  # logged, then crashed
        {"kind": "val", "step": 20, "flops": 2.0, "val_loss": 4.0, "tokens": 2},  # re-logged after resume
        {"kind": "growth", "step": 20, "flops": 2.0, "tokens": 2},
    ]
    log.write_text("".join(json.dumps(r) + "\n" for r in recs) + '{"kind": "val", "st')
    out = read_records(log)
    assert [(r["kind"], r["step"]) for r in out] == [("val", 10), ("growth", 20), ("val", 20)]
    assert out[-1]["val_loss"] == 4.0


# --- budgets and configuration ------------------------------------------------------------------------------


def test_equal_flops_steps_matches_budget_within_half_a_step():
    tps, f_s, f_l = 256, 3.3e5, 1.0e6
    budget = 500 * tps * f_l
    for k in (1, 37, 250, 499):
        n = equal_flops_steps(budget, f_s, f_l, k, tps)
        total = k * tps * f_s + (n - k) * tps * f_l
        assert abs(total - budget) <= 0.5 * tps * f_l
    with pytest.raises(ValueError, match="grow earlier"):
        equal_flops_steps(budget, f_s, f_l, 2000, tps)


def test_resolve_timing():
    kw = {"planner": 1000, "budget_tokens": 10_000, "tokens_per_step": 64}
    assert resolve_timing("planner", **kw) == 1024  # rounded up to whole steps
    assert resolve_timing("planner*2", **kw) == 2048
    assert resolve_timing("planner/2", **kw) == 512
    assert resolve_timing("0.1D", **kw) == 1024
    assert resolve_timing("2k", **kw) == 2048
    assert resolve_timing(64, **kw) == 64
    for bad in ("later", "planner*x", "-0.1D", 0, True):
        with pytest.raises(ConfigError, match="timing"):
            resolve_timing(bad, **kw, name="v")


def _write_study(tmp_path: Path, variants: str, extra: str = "") -> Path:
    text = CPU_TOML.read_text().split("[[variant]]")[0] + extra + variants
    p = tmp_path / "s.toml"
    p.write_text(text)
    return p


def test_study_config_errors(tmp_path):
    scratch = '[[variant]]\nname = "scratch"\nop = "scratch"\n'
    with pytest.raises(ConfigError, match="needs the 'scratch'"):
        load_study(_write_study(tmp_path, '[[variant]]\nname = "stack"\n'))
    with pytest.raises(ConfigError, match="duplicate"):
        load_study(_write_study(tmp_path, scratch + '[[variant]]\nname = "a"\n[[variant]]\nname = "a"\n'))
    with pytest.raises(ConfigError, match="unknown key"):
        load_study(_write_study(tmp_path, scratch + '[[variant]]\nname = "a"\nnoize = 0.2\n'))
    with pytest.raises(ConfigError, match="variant b: growth.noise"):
        load_study(_write_study(tmp_path, scratch + '[[variant]]\nname = "b"\nnoise = 1.5\n'))
    with pytest.raises(ConfigError, match="needs a spec"):
        Variant(name="p", op="partial")
    with pytest.raises(ConfigError, match="reserved"):
        Variant(name="scratch", op="stack")
    # A partial spec that does not give the target depth is refused, naming the variant.
    study = load_study(
        _write_study(tmp_path, scratch + '[[variant]]\nname = "short"\nop = "partial"\nspec = "1-2*3"\n')
    )
    with pytest.raises(ConfigError, match="variant short: .*gives 4 layers but target_layers is 8"):
        plan_study(study, tmp_path / "out")
    # Growing after the whole budget is spent on the small model is refused.
    study = load_study(_write_study(tmp_path, scratch + '[[variant]]\nname = "late"\ntiming = "5D"\n'))
    with pytest.raises(ConfigError, match="variant late .*grow earlier"):
        plan_study(study, tmp_path / "out")
    with pytest.raises(ConfigError, match="factor"):
        StudyConfig(target=study.target, variants=study.variants, factor=3)


@pytest.mark.parametrize("path", [CPU_TOML, GPU_TOML])
def test_shipped_configs_plan_equal_flops_and_data_order(path, tmp_path):
    study = load_study(path)
    runs = plan_study(study, tmp_path)
    names = [r.variant.name for r in runs]
    assert names[0] == "scratch" and len(set(names)) == len(names)
    ops = {r.variant.op for r in runs}
    assert {"stack", "interpolate", "partial", "zero", "random", "base"} <= ops
    assert all(len(r.config.growth) == (2 if r.variant.op == "stages" else 1) for r in runs if r.variant.grows)
    assert not any(r.config.growth for r in runs if not r.variant.grows)
    grown = [g for r in runs for g in r.config.growth]
    assert any(g.noise == pytest.approx(0.2) for g in grown)
    assert {g.optimizer for g in grown} == {"copy", "reset"}
    assert {"continue", "rewarm"} <= {g.schedule for g in grown}
    assert len({r.growth_tokens for r in runs if r.variant.grows}) >= 3  # planner timing and alternatives
    t = study.target
    f_l = flops_per_token(t.model, t.data.seq_len)
    base = next(r for r in runs if r.variant.op == "base")
    assert base.config.model == study.base and base.max_steps > 2 * t.train.max_steps
    assert abs(base.planned_flops - base.budget_flops) <= 0.5 * study.tokens_per_step * flops_per_token(
        study.base, t.data.seq_len
    )
    for r in runs:
        c = r.config
        assert (c.data, c.train.seed, c.train.eval_batches, c.train.eval_every) == (
            t.data,
            t.train.seed,
            t.train.eval_batches,
            t.train.eval_every,
        )
        assert abs(r.planned_flops - r.budget_flops) <= 0.5 * study.tokens_per_step * f_l
        assert c.train.out_dir == str(tmp_path / r.variant.name)


def test_shipped_variants_do_what_their_names_say(tmp_path):
    """The CPU config's named recipes, checked against their definitions (FLOPs recomputed by hand)."""
    study = load_study(CPU_TOML)
    runs = {r.variant.name: r for r in plan_study(study, tmp_path)}
    t, tps = study.target, study.tokens_per_step
    B = t.train.max_steps * tps * flops_per_token(t.model, t.data.seq_len)

    def f(layers):
        return flops_per_token(dataclasses.replace(t.model, n_layers=layers), t.data.seq_len)

    # Two growths x2 at 10% and 30% of D: phases of 2, 4 and 8 layers, each at its own FLOPs.
    r = runs["stack-2x2-stages"]
    k1, k2 = math.ceil(0.1 * study.budget_tokens / tps), math.ceil(0.3 * study.budget_tokens / tps)
    assert [g.at_tokens for g in r.config.growth] == [k1 * tps, k2 * tps] and r.growth_steps == (k1, k2)
    assert [(g.op, g.factor) for g in r.config.growth] == [("stack", 2), ("stack", 2)]
    early = k1 * tps * f(2) + (k2 - k1) * tps * f(4)
    assert r.max_steps == k2 + round((B - early) / (tps * f(8)))
    assert r.planned_flops == pytest.approx(early + (r.max_steps - k2) * tps * f(8), rel=1e-12)
    # prts's recipe: fresh AdamW, its own cosine from the growth step at 0.3x the base's peak, min 1/10 of
    # it, a warmup of 1% of the grown phase, the planner timing.
    r = runs["prts-recipe"]
    (g,) = r.config.growth
    assert (g.op, g.optimizer, g.schedule, g.horizon_steps) == ("stack", "reset", "restart", None)
    assert g.lr == pytest.approx(0.3 * t.train.lr) and g.min_lr == pytest.approx(g.lr / 10)
    assert g.warmup_steps == round(0.01 * (r.max_steps - r.growth_step))
    assert r.growth_tokens == runs["stack"].growth_tokens
    # Bu et al.: a 1-layer (0-layer) base grown once after 80% of its own steps, under WSD.
    for name, layers, op in (("bu-1layer-stack-0.8R-wsd", 1, "stack"), ("bu-0layer-zero-0.8R-wsd", 0, "zero")):
        r = runs[name]
        assert r.config.model.n_layers == layers and r.config.growth[0].op == op
        assert r.config.train.schedule == "wsd" and r.config.growth[0].target_layers == t.model.n_layers
        assert abs(r.growth_step / r.max_steps - 0.8) < 2 / r.max_steps
        early = r.growth_step * tps * f(layers)
        assert r.max_steps == r.growth_step + round((B - early) / (tps * f(8)))
    r = runs["scratch-wsd"]
    assert r.config.model == t.model and r.config.train.schedule == "wsd" and not r.config.growth
    assert r.max_steps == t.train.max_steps


def test_variant_settings_are_strict():
    for kw, needle in [
        ({"name": "b", "op": "base", "noise": 0.2}, "noise is not used by op 'base'"),
        ({"name": "t", "op": "target", "base_layers": 1}, "base_layers is not used by op 'target'"),
        ({"name": "s", "op": "stages"}, "needs \\[\\[variant.stage\\]\\] tables"),
        ({"name": "s", "op": "stages", "stage": [{"op": "stack", "factor": 2}]}, "stage 0: needs a timing"),
        ({"name": "s", "op": "stages", "stage": [{"timing": "0.1D", "fator": 2}]}, "unknown key"),
        ({"name": "s", "op": "stages", "stage": [{"timing": "0.5R", "factor": 2}]}, "one-growth variants"),
        ({"name": "s", "op": "stages", "timing": "0.1D", "stage": [{"timing": "0.1D"}]}, "timing is not used"),
        ({"name": "c", "op": "stack", "lr": 1e-3}, "variant c: growth.lr = 0.001 is not used: schedule 'continue'"),
        ({"name": "w", "op": "stack", "lr_schedule": "linear"}, "lr_schedule must be one of"),
    ]:
        with pytest.raises(ConfigError, match=needle):
            Variant(**kw)


# --- end to end on the CPU config ---------------------------------------------------------------------------


def _cpu_study(data_dir: Path, **train):
    """tools/study/cpu.toml on the session's data; `train`: [train] fields changed (e.g. a shorter budget)."""
    study = load_study(CPU_TOML)
    target = dataclasses.replace(
        study.target,
        data=dataclasses.replace(study.target.data, data_dir=str(data_dir)),
        train=dataclasses.replace(study.target.train, **train),
    )
    return dataclasses.replace(study, target=target, prepare=None)


def _load_script():
    spec = importlib.util.spec_from_file_location("growth_study", ROOT / "tools" / "growth_study.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_cpu_study_end_to_end_reuse_and_resume(tiny_data, tmp_path, one_thread):
    from fastgrow.train import train

    # cpu.toml's budget cut to 64 scratch steps (evaluated every 6): the same pipeline in 1/4 of the steps.
    study = _cpu_study(tiny_data, max_steps=64, eval_every=6, ckpt_every=30)
    out = tmp_path / "study"
    result = run_study(study, out, only=["stack", "zero"], echo=False)
    assert not result.interrupted
    assert [o.status for o in result.outcomes] == ["done", "done", "done"]

    rows = [json.loads(line) for line in (out / "runs.jsonl").read_text().splitlines()]
    assert [r["variant"] for r in rows] == ["scratch", "stack", "zero"]
    plan = {r.variant.name: r for r in plan_study(study, out)}
    for r in rows:
        assert (out / r["variant"] / "metrics.jsonl").is_file()
        assert (out / r["variant"] / "study_done.json").is_file()
        # The trainer's own FLOPs count (each phase at its size) lands exactly on the planned total.
        assert r["total_flops"] == pytest.approx(plan[r["variant"]].planned_flops, rel=1e-9)
        assert abs(r["flops_ratio"] - 1) < 0.01
        assert math.isfinite(r["final_val_loss"]) and r["evals"] >= 10
        assert r["tokens_per_s"] > 0 and (r["tokens_per_s_before_growth"] is None) == (r["variant"] == "scratch")
        assert r["config"]["data"] == rows[0]["config"]["data"]
    scratch, stack, zero = rows
    assert scratch["speedup"] == pytest.approx(0.0, abs=1e-12) and scratch["loss_gap"] == pytest.approx(0.0)
    for r in (stack, zero):
        assert r["growth_step"] == r["growth_tokens"] // study.tokens_per_step
        assert len(r["growth_flops"]) == 1
        assert r["config"]["growth"][0]["op"] == r["variant"]
        assert r["config"]["model"]["n_layers"] == 2 and r["max_steps"] > scratch["max_steps"]
        if r["reached"]:
            assert r["speedup"] == pytest.approx(scratch["flops_scratch"] / r["flops_to_reach"] - 1)
        else:
            assert r["speedup"] is None
    table = (out / "study.md").read_text()
    assert all(f"| {name} |" in table for name in ("scratch", "stack", "zero"))
    png = (out / "study.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob(".*"))  # no temp files left behind

    # Run again: every finished run is reused, nothing is trained or rewritten.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.jsonl")}
    again = run_study(study, out, only=["stack", "zero"], echo=False, plot=False)
    assert [o.status for o in again.outcomes] == ["reused"] * 3
    assert {p: p.stat().st_mtime_ns for p in out.glob("*/metrics.jsonl")} == stamps
    assert [r["final_val_loss"] for r in again.rows] == [r["final_val_loss"] for r in rows]

    # An interrupted run (checkpoint, no marker) is resumed and ends where the straight run ended.
    out2 = tmp_path / "study2"
    stack_plan = {r.variant.name: r for r in plan_study(study, out2)}["stack"]
    train(stack_plan.config, echo=False, until_step=stack_plan.growth_step + 3)  # stopped after growth
    shutil.copytree(out / "scratch", out2 / "scratch")  # the finished scratch run: only stack has to run
    resumed = run_study(study, out2, only=["stack"], echo=False, plot=False)
    assert [o.status for o in resumed.outcomes] == ["reused", "done"]
    assert json.loads((out2 / "stack" / "study_done.json").read_text())["resumed"] is True
    assert resumed.rows[1]["final_val_loss"] == pytest.approx(stack["final_val_loss"], abs=1e-6)
    assert resumed.rows[1]["total_flops"] == pytest.approx(stack["total_flops"], rel=1e-12)

    # A finished run made with another config is not silently reused.
    changed = dataclasses.replace(
        study, target=dataclasses.replace(study.target, train=dataclasses.replace(study.target.train, lr=1e-3))
    )
    with pytest.raises(ConfigError, match="another config.*train.lr"):
        run_study(changed, out, only=["stack"], echo=False, plot=False)

    # The script: --list and --report-only on the finished study.
    script = _load_script()
    cfg = tmp_path / "cpu.toml"
    text = CPU_TOML.read_text().replace('data_dir = "data/study-cpu"', f'data_dir = "{tiny_data}"')
    for key in ("max_steps", "eval_every", "ckpt_every"):  # the shortened budget the runs above used
        text = re.sub(rf"(?m)^{key} = \d+", f"{key} = {getattr(study.target.train, key)}", text)
    cfg.write_text(text)
    assert script.main(["--config", str(cfg), "--out", str(out), "--list"]) == 0
    (out / "study.md").unlink()
    assert script.main(["--config", str(cfg), "--out", str(out), "--only", "stack,zero", "--report-only"]) == 0
    report = (out / "study.md").read_text()
    for r in rows:
        assert f"| {r['variant']} |" in report and f"{r['final_val_loss']:.4f}" in report
    assert script.main(["--config", str(tmp_path / "missing.toml")]) == 2


def test_interrupted_and_aborted_runs_without_training(tmp_path, monkeypatch, tiny_data):
    """The study's bookkeeping around train(): SIGTERM stops the study (no marker, later runs pending, the
    next call resumes); a run aborted on non-finite losses is recorded and not retried; with
    keep_checkpoints = false a finished run's checkpoints are deleted after its marker is written."""
    import types

    import fastgrow.train as train_mod

    calls: list[tuple[str, bool]] = []

    def fake_train(cfg, *, resume=False, device=None, echo=True, until_step=None):
        out = Path(cfg.train.out_dir)
        calls.append((out.name, resume))
        ckpt = out / "step-00000010"
        ckpt.mkdir(parents=True, exist_ok=True)
        (ckpt / "manifest.json").write_text("{}")
        if out.name == "stack" and not resume:
            return types.SimpleNamespace(interrupted=True)  # SIGTERM: checkpoint saved, loop left
        if out.name == "zero":
            raise train_mod.TrainingAborted("5 consecutive non-finite steps")
        # A power-law validation curve reaching the budget; the grown run's is 1.5x "faster".
        budget = 1e12
        shift = 1.0 if out.name == "scratch" else 1.5
        with open(out / "metrics.jsonl", "w") as f:
            for i in range(1, 11):
                x = budget * i / 10
                f.write(
                    json.dumps({"kind": "val", "step": i, "tokens": i, "flops": x, "val_loss": 9 * (shift * x) ** -0.1})
                )
                f.write("\n")
        return types.SimpleNamespace(interrupted=False)

    monkeypatch.setattr(train_mod, "train", fake_train)
    study = dataclasses.replace(_cpu_study(tiny_data), keep_checkpoints=False, prepare=None)
    out = tmp_path / "s"
    first = run_study(study, out, only=["stack", "zero"], echo=False, plot=False, train_runs=True)
    assert first.interrupted
    assert [o.status for o in first.outcomes] == ["done", "interrupted", "pending"]
    assert not (out / "stack" / "study_done.json").exists() and (out / "stack" / "step-00000010").is_dir()
    assert not (out / "scratch" / "step-00000010").exists()  # finished: checkpoints deleted
    assert "| stack |" in (out / "study.md").read_text()

    second = run_study(study, out, only=["stack", "zero"], echo=False, plot=False)
    assert not second.interrupted
    assert [o.status for o in second.outcomes] == ["reused", "done", "aborted"]
    assert calls == [("scratch", False), ("stack", False), ("stack", True), ("zero", False)]
    rows = {r["variant"]: r for r in second.rows}
    assert rows["stack"]["speedup"] == pytest.approx(0.5, abs=1e-9)
    assert "non-finite" in rows["zero"]["error"] and "speedup" not in rows["zero"]

    third = run_study(study, out, only=["stack", "zero"], echo=False, plot=False)
    assert [o.status for o in third.outcomes] == ["reused", "reused", "aborted"]
    assert len(calls) == 4  # nothing ran again
