"""The first-use launch-config tuner (kernels/_tune.py). Its CUDA timing is replaced by a fake clock here
(no GPU): what is tested is the choice logic, caching, fallbacks and error handling."""

import pytest
import torch
from fastgrow.kernels import _tune

CUDA = torch.device("cuda")


@pytest.fixture
def fake_gpu(monkeypatch):
    """A fake clock: each candidate's time from `times`; records every run."""
    state = {"times": {}, "runs": []}

    def time_ms(fn, reps):
        fn()
        return state["times"][state["runs"][-1]]

    monkeypatch.setattr(_tune, "_time_ms", time_ms)
    monkeypatch.setattr(_tune, "_sync", lambda device: None)
    monkeypatch.setattr(_tune, "_capturing", lambda: False)
    monkeypatch.delenv("FASTGROW_TUNE", raising=False)
    _tune.reset()
    yield state
    _tune.reset()


def _run(state, fail=None):
    def run(cfg):
        if fail and cfg in fail:
            raise fail[cfg]
        state["runs"].append(cfg)

    return run


def test_picks_the_fastest_once_and_caches(fake_gpu):
    fake_gpu["times"] = {"a": 3.0, "b": 1.0, "c": 2.0}
    run = _run(fake_gpu)
    assert _tune.pick("k", ["a", "b", "c"], run, CUDA) == "b"
    n_runs = len(fake_gpu["runs"])
    assert n_runs == 6  # each candidate: one warm-up/compile call, one timed call (fake clock)
    assert _tune.pick("k", ["a", "b", "c"], run, CUDA) == "b"
    assert len(fake_gpu["runs"]) == n_runs  # cached: nothing re-run
    log = _tune.tuning_log()["'k'"]
    assert log["chosen"] == "'b'" and log["fallback"] == "'a'" and log["times_ms"]["'c'"] == 2.0


def test_fallback_without_tuning(fake_gpu, monkeypatch):
    run = _run(fake_gpu)
    assert _tune.pick("k", ["a", "b"], run, torch.device("cpu")) == "a"  # CPU: never timed
    assert _tune.pick("k", ["only"], run, CUDA) == "only"  # single candidate
    monkeypatch.setenv("FASTGROW_TUNE", "0")
    assert _tune.pick("k", ["a", "b"], run, CUDA) == "a"
    monkeypatch.setenv("FASTGROW_TUNE", "1")
    monkeypatch.setattr(_tune, "_capturing", lambda: True)  # inside CUDA graph capture: no timing
    assert _tune.pick("k", ["a", "b"], run, CUDA) == "a"
    assert fake_gpu["runs"] == [] and _tune.tuning_log() == {}


def test_out_of_resources_candidates_are_skipped_other_errors_raise(fake_gpu):
    class OutOfResources(Exception):
        pass

    fake_gpu["times"] = {"a": 2.0, "c": 3.0}
    run = _run(fake_gpu, fail={"b": OutOfResources("out of resource: shared memory, Required: 300000")})
    assert _tune.pick("k2", ["a", "b", "c"], run, CUDA) == "a"
    assert "'b'" in _tune.tuning_log()["'k2'"]["skipped"]
    with pytest.raises(ValueError, match="bug"):
        _tune.pick("k3", ["a", "b"], _run(fake_gpu, fail={"b": ValueError("bug")}), CUDA)


def test_length_bucket():
    assert [_tune.length_bucket(n) for n in (1, 256, 257, 2048, 3000, 10**6)] == [256, 256, 512, 2048, 4096, 16384]


@pytest.mark.gpu
def test_gpu_attention_and_norm_tune_on_first_use(monkeypatch):
    # On a GPU the launchers time their candidates on first use and log the choice; results equal the
    # fallback config's to rounding (every candidate is a correct tiling).
    from fastgrow.kernels import attention, rms_norm

    monkeypatch.delenv("FASTGROW_TUNE", raising=False)
    _tune.reset()
    q, k, v = (torch.randn(2, 1024, 8, 64, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    out = attention(q, k, v, backend="triton")
    out.float().square().sum().backward()
    x = torch.randn(4096, 1024, device="cuda", dtype=torch.bfloat16)
    y = rms_norm(x, torch.ones(1024, device="cuda"))
    log = _tune.tuning_log()
    assert any(key.startswith("('attention', 'dkdv'") for key in log), log
    assert any(key.startswith("('rms_fwd'") for key in log), log
    assert all(entry["times_ms"] for entry in log.values()), log
    monkeypatch.setenv("FASTGROW_TUNE", "0")
    out0 = attention(q, k, v, backend="triton")
    torch.testing.assert_close(out, out0, rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(y, rms_norm(x, torch.ones(1024, device="cuda")), rtol=1e-2, atol=1e-2)
    _tune.reset()
