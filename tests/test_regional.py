"""`train.compile = true` compiles per block and head, so depth growth compiles nothing; every growth
record carries stall_seconds (and val_seconds) and is written to metrics.jsonl exactly once, across a
checkpoint/resume around the growth too (CPU, tiny runs over write_token_stream's data)."""

from __future__ import annotations

import dataclasses
import time

import pytest
import torch
from growth_helpers import stream_run, write_token_stream

import fastgrow.regional as regional
import fastgrow.runner_growth as runner_growth
from fastgrow.config import GrowthConfig
from fastgrow.metrics import read_metrics
from fastgrow.report import growth_line
from fastgrow.train import train

STACK4_AT_STEP_4 = (GrowthConfig(at_tokens=4 * 32, op="stack", factor=4),)  # 2 x 16 tokens per step


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_token_stream(tmp_path_factory.mktemp("tokens"))


def run_cfg(data_dir, out, **train_kw):
    t = {"max_steps": 7, "log_every": 1, "eval_every": 2, "eval_batches": 1}
    return stream_run(data_dir, out, STACK4_AT_STEP_4, train={**t, **train_kw})


def growth_records(out) -> list[dict]:
    return [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "growth"]


def test_depth_growth_under_regional_compile_compiles_nothing_and_stalls_briefly(data_dir, tmp_path, monkeypatch):
    """A tiny stack x4 growth with train.compile = true: the graphs compiled before growth (first block,
    the other blocks, head; training and evaluation) serve the grown model, so from the growth on not
    one graph is compiled, and the stall is growth + two validation passes + one eager-speed step.
    The backend is aot_eager (the same capture, guards and recompilation decisions as inductor, without
    its minute of code generation on a CPU); the count is what makes this robust on a loaded machine."""
    compiled: list[int] = []

    def counting_backend(gm, example_inputs):
        from torch._dynamo.backends.debugging import aot_eager

        compiled.append(len(gm.graph.nodes))
        return aot_eager(gm, example_inputs)

    at_growth: list[int] = []
    real_event = runner_growth.run_growth_event

    def event(state, ctx):
        at_growth.append(len(compiled))
        return real_event(state, ctx)

    monkeypatch.setattr(regional, "BACKEND", counting_backend)
    monkeypatch.setattr(runner_growth, "run_growth_event", event)
    torch._dynamo.reset()
    t0 = time.perf_counter()
    res = train(run_cfg(data_dir, tmp_path / "c", compile=True), echo=False)
    wall = time.perf_counter() - t0
    torch._dynamo.reset()
    assert res.state.model.cfg.n_layers == 8
    # train: first block (no pending residual), other blocks, head; eval (no_grad): the same three.
    assert at_growth == [6] and len(compiled) == 6, compiled
    (rec,) = growth_records(tmp_path / "c")
    assert rec["step"] == 4 and rec["layers_after"] == 8
    assert rec["stall_seconds"] >= rec["grow_seconds"] + rec["val_seconds"]
    assert rec["stall_seconds"] < 3.0, (rec, wall)
    # Regional compilation computes what eager computes.
    eager = train(run_cfg(data_dir, tmp_path / "e"), echo=False)
    for (n, p), q in zip(res.state.model.named_parameters(), eager.state.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-6, msg=n)


def test_growth_record_has_its_stall_and_is_logged_once_across_resume(data_dir, tmp_path):
    """The growth before step 5 is recorded at the end of step 5 (with its stall), before step 5's train
    record and checkpoint. Stopping at step 4 (checkpoint before the growth) or step 5 (checkpoint after
    the record) and resuming leaves exactly one growth record in metrics.jsonl, and the console line
    shows the stall."""
    straight = train(run_cfg(data_dir, tmp_path / "s", ckpt_every=0), echo=False)
    recs = straight.records
    g = next(i for i, r in enumerate(recs) if r["kind"] == "growth")
    assert recs[g - 1]["kind"] == "val" and recs[g - 1]["step"] == 4  # the eval at step 4 comes first
    assert recs[g + 1]["kind"] == "train" and recs[g + 1]["step"] == 5 and recs[g + 1]["layers"] == 8
    rec = recs[g]
    assert rec["step"] == 4 and rec["stall_seconds"] > 0 and rec["val_seconds"] > 0
    assert ", stall " in growth_line(rec) and growth_records(tmp_path / "s") == [rec]
    for stop in (4, 5):
        out = tmp_path / f"stop{stop}"
        cfg = run_cfg(data_dir, out, ckpt_every=1)
        first = train(cfg, echo=False, until_step=stop)
        assert len(growth_records(out)) == (stop == 5)
        train(cfg, resume=True, echo=False)
        (again,) = growth_records(out)
        assert again["step"] == 4 and again["stall_seconds"] > 0
        kinds = [(r["kind"], r["step"]) for r in read_metrics(out / "metrics.jsonl")]
        assert kinds == [(r["kind"], r["step"]) for r in recs], (stop, first.checkpoint)


def test_a_crash_in_the_first_step_after_growth_loses_no_record(data_dir, tmp_path, monkeypatch):
    """Killed inside the first step after growth (record not yet written, no checkpoint of the grown
    state): the resume grows again from the step-4 checkpoint and writes the record once."""
    from fastgrow import model as model_mod

    out = tmp_path / "crash"
    cfg = run_cfg(data_dir, out, ckpt_every=2)
    real = model_mod.Transformer.forward

    def crash_when_grown(self, tokens, targets=None):
        if self.training and self.cfg.n_layers == 8:
            raise KeyboardInterrupt  # as a kill would, after the growth, before the record
        return real(self, tokens, targets)

    monkeypatch.setattr(model_mod.Transformer, "forward", crash_when_grown)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, echo=False)
    monkeypatch.undo()
    assert growth_records(out) == []
    res = train(dataclasses.replace(cfg), resume=True, echo=False)
    assert res.state.step == 7 and len(growth_records(out)) == 1


def test_a_stage_held_when_a_later_stage_pauses_in_g_learn_is_logged_before_the_checkpoint(data_dir, tmp_path):
    """Two stages at one step, stack then G_learn, SIGTERM during G_learn's training: the stack's record
    (held for the next step's end) is written before the checkpoint, with stall_seconds None, and the
    resume writes only G_learn's."""
    import os
    import signal

    from fastgrow.grow_learn import LearnPhase

    stages = (
        GrowthConfig(at_tokens=70, op="stack", factor=2),  # both due after step 3 (96 tokens)
        GrowthConfig(at_tokens=96, op="learn", factor=2, learn_steps=3, learn_lr=3e-2),
    )
    out = tmp_path / "two"
    cfg = stream_run(data_dir, out, stages, train={"max_steps": 8, "log_every": 1, "ckpt_every": 0})
    real = LearnPhase.train_step

    def step_then_sigterm(self, *a, **kw):
        res = real(self, *a, **kw)
        if self.done == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return res

    LearnPhase.train_step = step_then_sigterm
    try:
        first = train(cfg, echo=False)
    finally:
        LearnPhase.train_step = real
    assert first.interrupted and first.state.learn is not None
    (held,) = growth_records(out)
    assert held["op"] == "stack" and held["stall_seconds"] is None
    assert ", stall" not in growth_line(held)
    train(cfg, resume=True, echo=False)
    recs = growth_records(out)
    assert [r["op"] for r in recs] == ["stack", "learn"] and recs[1]["stall_seconds"] > 0
