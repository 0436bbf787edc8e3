"""Shared helpers for the growth tests: a tiny run config and a state trained a few real AdamW steps."""

from __future__ import annotations

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


def write_token_stream(d, vocab: int = 61, repeats: int = 200, seed: int = 0):
    """A tiny learnable token stream (a noisy repeating pattern) in the loader's on-disk format."""
    import hashlib
    import json

    import numpy as np

    rng = np.random.default_rng(seed)
    base = np.tile(np.arange(1, 41, dtype=np.uint16), repeats)
    noise = rng.integers(1, vocab, size=base.size, dtype=np.uint16)
    toks = np.where(rng.random(base.size) < 0.1, noise, base).astype("<u2")
    (d / "tokens-00000.bin").write_bytes(toks.tobytes())
    meta = {
        "format": "fastgrow-tokens",
        "format_version": 1,
        "dtype": "uint16",
        "byte_order": "little",
        "vocab_size": vocab,
        "eos_id": 0,
        "eos_token": "<|endoftext|>",
        "num_tokens": int(toks.size),
        "num_documents": 1,
        "shards": [
            {
                "file": "tokens-00000.bin",
                "num_tokens": int(toks.size),
                "sha256": hashlib.sha256(toks.tobytes()).hexdigest(),
            }
        ],
    }
    (d / "meta.json").write_text(json.dumps(meta))
    return d


def expected_depth_state(source, sources: list[int]):
    """The documented image of a depth growth that copies layers: layer i of the target is layer
    sources[i] of `source` (weights and AdamW moments); everything else copied. Returns
    ({param name: tensor}, {param name: {exp_avg, exp_avg_sq, step}})."""
    old_p = {n: p.detach() for n, p in source.model.named_parameters()}
    old_s = opt_state_by_name(source)
    params, moments = {}, {}
    for n in old_p:
        if not n.startswith("layers."):
            params[n], moments[n] = old_p[n].clone(), {k: v.clone() for k, v in old_s[n].items()}
    for i, s in enumerate(sources):
        for n in old_p:
            if n.startswith(f"layers.{s}."):
                new = f"layers.{i}." + n.split(".", 2)[2]
                params[new] = old_p[n].clone()
                moments[new] = {k: v.clone() for k, v in old_s[n].items()}
    return params, moments


def reference_step(cfg_model, train_cfg, params, moments, tokens, lr):
    """A freshly built model + AdamW holding `params` / `moments`, after one step at `lr`: the
    reference a grown state's first step must equal."""
    model = Transformer(cfg_model)
    model.load_state_dict(params)
    opt = build_optimizer(model, train_cfg)
    for n, p in model.named_parameters():
        if n in moments:
            opt.state[p] = {k: v.clone() for k, v in moments[n].items()}
    for grp in opt.param_groups:
        grp["lr"] = lr
    loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    opt.step()
    return model, opt, loss.detach()


def legacy_growth_table(**changes):
    """A single [growth] table as older fastgrow versions stored it in checkpoints: every field present,
    at_tokens = 0 meaning no growth, fields the op does not read included."""
    table = {
        "at_tokens": 0,
        "op": "stack",
        "factor": 4,
        "target_layers": 0,
        "spec": "",
        "noise": 0.0,
        "target_dim": 0,
        "target_ffn_dim": 0,
        "target_heads": 0,
        "width_op": "direct",
        "optimizer": "copy",
        "schedule": "continue",
        "rewarm_steps": 0,
    }
    return {**table, **changes}


def stream_run(data_dir, out_dir, growth=(), model=None, data=None, train=None):
    """A tiny CPU run over write_token_stream's data (2 layers, dim 32, 8 steps of 2 x 16 tokens)."""
    from fastgrow.config import DataConfig

    m = dict(vocab_size=61, dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=48, max_seq_len=32)
    d = dict(data_dir=str(data_dir), seq_len=16, batch_size=2, val_fraction=0.05)
    t = dict(device="cpu", max_steps=8, lr=3e-3, min_lr=3e-4, warmup_steps=2, seed=3, out_dir=str(out_dir))
    t.update(log_every=2, eval_every=0, eval_batches=1, ckpt_every=0, progress=False)
    return RunConfig(
        model=ModelConfig(**{**m, **(model or {})}),
        data=DataConfig(**{**d, **(data or {})}),
        train=TrainConfig(**{**t, **(train or {})}),
        growth=tuple(growth),
    )
