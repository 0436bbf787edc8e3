"""Shared helpers for the growth tests: a tiny run config and a state trained a few real AdamW steps."""

from __future__ import annotations

import copy
import dataclasses

import torch

from fastgrow.config import ModelConfig, RunConfig, TrainConfig
from fastgrow.model import Transformer
from fastgrow.optim import build_optimizer, set_lr
from fastgrow.state import TrainState, build_state


def tiny_run(**model_kw) -> RunConfig:
    train_kw = {k[6:]: model_kw.pop(k) for k in list(model_kw) if k.startswith("train_")}
    m = dict(vocab_size=61, dim=32, n_layers=3, n_heads=4, n_kv_heads=2, ffn_dim=40, max_seq_len=32)
    m.update(model_kw)
    t = dict(device="cpu", lr=1e-2, min_lr=1e-3, warmup_steps=2, max_steps=20, seed=7)
    t.update(train_kw)
    return RunConfig(model=ModelConfig(**m), train=TrainConfig(**t))


def batch(vocab: int, seed: int, b: int = 2, s: int = 17) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (b, s), generator=g)


def train_step(state: TrainState, tokens: torch.Tensor) -> torch.Tensor:
    """One plain training step (no clipping) that advances the state's counters like the trainer."""
    set_lr(state.optimizer, state.schedule.lr_at(state.step))
    loss = state.model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.step += 1
    state.tokens += tokens[:, :-1].numel()
    return loss.detach()


def trained_state(cfg: RunConfig, steps: int = 3) -> TrainState:
    st = build_state(cfg, device="cpu")
    for i in range(steps):
        train_step(st, batch(cfg.model.vocab_size, 100 + i))
    st.cursor = {"position": 1234, "epoch": 0}
    return st


def snapshot(state: TrainState) -> dict[str, torch.Tensor]:
    """Deep copy of every tensor of the model and the optimizer state (to check nothing changed)."""
    out = {f"p.{k}": v.detach().clone() for k, v in state.model.state_dict().items()}
    names = {id(p): n for n, p in state.model.named_parameters()}
    for p, st in state.optimizer.state.items():
        for k, v in st.items():
            out[f"o.{names[id(p)]}.{k}"] = v.clone()
    return out


def assert_same_snapshot(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


def opt_state_by_name(state: TrainState) -> dict[str, dict[str, torch.Tensor]]:
    return {n: state.optimizer.state[p] for n, p in state.model.named_parameters() if p in state.optimizer.state}


def replace_train(cfg: RunConfig, **kw) -> RunConfig:
    return dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, **kw))


def fresh_target_like(grown) -> tuple[Transformer, torch.optim.AdamW]:
    """A freshly built target model + AdamW loaded with the grown weights and moments (the oracle)."""
    torch.manual_seed(123)
    model = Transformer(grown.model.cfg)
    model.load_state_dict(grown.model.state_dict())
    opt = build_optimizer(model, grown.config.train)
    # deepcopy: load_state_dict keeps same-device tensors by reference, which would share the moments.
    opt.load_state_dict(copy.deepcopy(grown.optimizer.state_dict()))
    return model, opt
