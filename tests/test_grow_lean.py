"""The lean grow(): take-over of the input's tensors (consume=True), storage that no two grown tensors
share, one step tensor per parameter, modules built as clones, nothing read on the host (CPU, tiny)."""

from __future__ import annotations

import pytest
import torch
from growth_helpers import (
    assert_same_snapshot,
    batch,
    expected_depth_state,
    opt_state_by_name,
    reference_step,
    snapshot,
    tiny_run,
    train_step,
    trained_state,
)

import fastgrow.grow as grow_mod
from fastgrow.grow import GrowPlan, grow, resolve_plan
from fastgrow.model import Transformer

PLANS = [
    (GrowPlan("stack", factor=4), [0, 1, 2] * 4),
    (GrowPlan("interpolate", factor=2), [0, 0, 1, 1, 2, 2]),
    (GrowPlan("partial", spec="1-23*3-3"), [0, 1, 2, 1, 2, 1, 2, 2]),
    (GrowPlan("sources", spec="3,3,1,2,1"), [2, 2, 0, 1, 0]),
    (GrowPlan("zero", spec="102030"), [0, -1, 1, -1, 2, -1]),
    (GrowPlan("stack", factor=2, noise=0.2), [0, 1, 2] * 2),
]


def fresh_state():
    return trained_state(tiny_run(), steps=3)  # seeded: every call gives bitwise the same state


def tensors_of(state) -> dict[str, torch.Tensor]:
    out = {}
    for name, p in state.model.named_parameters():
        out[f"p/{name}"] = p.detach()
        for key, t in state.optimizer.state.get(p, {}).items():
            out[f"{key}/{name}"] = t
    return out


def byte_range(t: torch.Tensor) -> tuple[int, int, int]:
    start = t.data_ptr()
    return t.untyped_storage().data_ptr(), start, start + t.numel() * t.element_size()


def overlaps(tensors: dict[str, torch.Tensor]) -> list[tuple[str, str]]:
    """Pairs of tensors whose bytes overlap (views of one allocation at disjoint rows do not)."""
    spans = sorted((byte_range(t)[1], byte_range(t)[2], name) for name, t in tensors.items() if t.numel())
    return [(a[2], b[2]) for a, b in zip(spans, spans[1:]) if b[0] < a[1]]


@pytest.mark.parametrize("plan,sources", PLANS)
def test_consuming_growth_takes_over_one_copy_and_grows_the_same_state(plan, sources):
    """consume=True gives bitwise the state the copying grow() gives; the first copy of each source
    layer and the top-level tensors are the input's storage, every other tensor is new, and no two
    tensors of the grown state share a byte (an alias would make one update change two layers)."""
    copied = grow(fresh_state(), plan)
    src = fresh_state()
    old = {k: byte_range(t)[1] for k, t in tensors_of(src).items()}
    taken = grow(src, plan, consume=True)
    a, b = tensors_of(copied), tensors_of(taken)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    first = {s: i for i, s in reversed(list(enumerate(sources))) if s >= 0}
    for key, t in b.items():
        kind, name = key.split("/", 1)
        if name.startswith("layers."):
            i = int(name.split(".")[1])
            src_name = f"{kind}/layers.{sources[i]}.{name.split('.', 2)[2]}"
            owner = sources[i] >= 0 and first[sources[i]] == i
        else:
            src_name, owner = key, True
        shares = byte_range(t)[1] == old.get(src_name)
        assert shares == owner, (key, owner)
    assert overlaps(b) == []
    assert overlaps(a) == []


@pytest.mark.parametrize("plan,sources", PLANS[:3])
def test_one_step_after_a_consuming_growth_equals_a_target_built_from_the_sources(plan, sources):
    """The reference (fresh target + AdamW holding the documented image of the source state) and the
    consumed-and-grown state take one step: bit for bit equal, so no taken-over tensor is shared."""
    base = fresh_state()
    params, moments = expected_depth_state(base, sources)
    g = grow(base, plan, consume=True)
    tok = batch(61, 9)
    lr = g.schedule.scheduled(g.step)
    model, opt, loss_r = reference_step(g.model.cfg, g.config.train, params, moments, tok, lr)
    assert torch.equal(train_step(g, tok), loss_r)
    for (n, p), q in zip(g.model.named_parameters(), model.parameters()):
        assert torch.equal(p, q), n
        for k in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(g.optimizer.state[p][k], opt.state[q][k]), (n, k)


@pytest.mark.parametrize("consume", [False, True])
def test_every_parameter_has_its_own_step_tensor_and_it_advances_by_one(consume):
    # torch increments each parameter's step in place: a shared tensor would count one step per parameter.
    g = grow(fresh_state(), GrowPlan("zero", factor=3), consume=consume)
    steps = {n: st["step"] for n, st in opt_state_by_name(g).items()}
    assert set(steps) == {n for n, _ in g.model.named_parameters()}  # new blocks too
    assert all(s.shape == () and s.dtype == torch.float32 and float(s) == 3.0 for s in steps.values())
    assert overlaps(steps) == [] and len({id(s) for s in steps.values()}) == len(steps)
    train_step(g, batch(61, 4))
    assert {n: float(st["step"]) for n, st in opt_state_by_name(g).items()} == dict.fromkeys(steps, 4.0)


def test_a_consuming_growth_that_fails_leaves_its_input_intact(monkeypatch):
    src = fresh_state()
    before = snapshot(src)

    def broken(*a, **k):
        raise RuntimeError("out of memory (simulated)")

    monkeypatch.setattr(grow_mod, "build_optimizer", broken)
    with pytest.raises(RuntimeError, match="simulated"):
        grow(src, GrowPlan("stack", factor=2, noise=0.3), consume=True)
    monkeypatch.undo()
    assert_same_snapshot(before, snapshot(src))
    assert torch.isfinite(train_step(src, batch(61, 3)))


@pytest.mark.parametrize(
    "plan",
    [GrowPlan("stack", factor=2), GrowPlan("none", target_dim=64, target_ffn_dim=60), GrowPlan("random", factor=2)],
)
def test_grown_modules_are_the_modules_a_constructor_builds(plan):
    """grow() clones a template block instead of calling constructors: every module must still be what
    Transformer(target) builds (classes, attributes, parameter/buffer names and shapes), with hook
    containers of its own and no placeholder left behind."""
    st = fresh_state()
    g = grow(st, plan, consume=True)
    ref = Transformer(resolve_plan(plan, st.model.cfg).dst)
    got, want = dict(g.model.named_modules()), dict(ref.named_modules())
    assert got.keys() == want.keys()
    containers = set()
    for name, mod in got.items():
        other = want[name]
        assert type(mod) is type(other), name
        assert mod.__dict__.keys() == other.__dict__.keys(), name
        for key, value in mod.__dict__.items():
            if isinstance(value, dict):
                if key not in ("_parameters", "_buffers", "_modules"):
                    assert not value and id(value) not in containers, (name, key)  # empty, its own
                    containers.add(id(value))
            elif not callable(value):
                assert value == other.__dict__[key], (name, key)
    assert [(n, p.shape) for n, p in g.model.named_parameters()] == [(n, p.shape) for n, p in ref.named_parameters()]
    assert all(p.device.type == "cpu" for p in g.model.parameters())
    for name, buf in ref.named_buffers():
        assert torch.equal(dict(g.model.named_buffers())[name], buf), name
    calls = []
    g.model.layers[1].register_forward_hook(lambda *a: calls.append(1))
    g.model(batch(61, 1))
    assert calls == [1]  # the hook fires for its own block only


@pytest.mark.parametrize(
    "plan",
    [
        GrowPlan("stack", factor=4),
        GrowPlan("zero", factor=2, noise=0.2),
        GrowPlan("stack", factor=2, target_dim=64, target_ffn_dim=80),
        GrowPlan("none", width="zero", target_dim=64, target_ffn_dim=60),
    ],
)
@pytest.mark.parametrize("consume", [False, True])
def test_grow_reads_nothing_on_the_host(monkeypatch, plan, consume):
    """No .item(), .tolist(), .cpu(), .numpy() or Python number/bool of a tensor anywhere in grow():
    on a GPU each is a synchronisation (tests/test_grow.py checks the GPU's own sync counter)."""
    st = fresh_state()

    def host_read(*a, **k):
        raise AssertionError("grow() read a tensor on the host")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__"):
        monkeypatch.setattr(torch.Tensor, name, host_read)
    g = grow(st, plan, consume=consume)
    monkeypatch.undo()
    assert torch.isfinite(train_step(g, batch(61, 2)))
