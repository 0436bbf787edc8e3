import math

import pytest

from fastgrow.config import ModelConfig, TrainConfig
from fastgrow.model import Transformer
from fastgrow.optim import LRSchedule, build_optimizer


def sched(kind, **kw):
    cfg = TrainConfig(max_steps=100, lr=1.0, min_lr=0.1, warmup_steps=10, schedule=kind, decay_fraction=0.2)
    s = LRSchedule.from_config(cfg)
    for k, v in kw.items():
        setattr(s, k, v)
    return s


def test_warmup_then_cosine_to_min_lr():
    s = sched("cosine")
    assert s.lr_at(0) == pytest.approx(0.1) and s.lr_at(9) == pytest.approx(1.0)
    assert s.lr_at(10) == pytest.approx(1.0)
    assert s.lr_at(55) == pytest.approx(0.1 + 0.45 * (1 + math.cos(math.pi * 0.5)))
    assert s.lr_at(100) == pytest.approx(0.1) and s.lr_at(500) == pytest.approx(0.1)


def test_constant_and_wsd():
    assert sched("constant").lr_at(99) == 1.0
    w = sched("wsd")
    assert w.lr_at(79) == 1.0  # stable until the last 20%
    assert w.lr_at(90) == pytest.approx(0.55) and w.lr_at(100) == pytest.approx(0.1)


def test_rewarm_and_restart_policies():
    s = sched("cosine", rewarm_start=50, rewarm_steps=5)
    base = sched("cosine")
    assert s.lr_at(50) == pytest.approx(base.lr_at(50) / 5)
    assert s.lr_at(54) == pytest.approx(base.lr_at(54))
    assert s.lr_at(60) == base.lr_at(60)
    r = sched("cosine", offset=50)
    assert r.lr_at(50) == pytest.approx(0.1)  # warmup starts over
    assert r.lr_at(100) == pytest.approx(0.1)  # and decays by the end of the run
    assert LRSchedule.from_state_dict(r.state_dict()) == r


def test_norm_gains_are_not_decayed():
    model = Transformer(ModelConfig(vocab_size=64, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64))
    opt = build_optimizer(model, TrainConfig(weight_decay=0.1))
    decay, no_decay = opt.param_groups
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() == 1 for p in no_decay["params"]) and all(p.dim() == 2 for p in decay["params"])
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
