"""One rank of the 2-rank checks in test_distributed.py that need the live state, not just a CLI run.

    python tests/dist_worker.py WORKDIR      (with torchrun's environment; see dist_helpers.spawn)

WORKDIR holds cfg.json and `single/` (a one-process checkpoint written by the test). Every rank:
1. resumes `single/` sharded (FSDP2) and compares every full tensor with a one-process load of it;
2. saves the sharded state as a DCP checkpoint into `dcp/` (the test loads it in one process);
3. grows the sharded state and the one-process state with several operators and compares every full
   parameter, Adam moment and step;
4. trains with a NaN loss on rank 1 only at step 3 and reports which steps each rank skipped.
Rank 0 writes WORKDIR/results.json: a list of mismatches per check (empty = pass) and the skip lists.
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path

import torch

from fastgrow import distributed, sharding
from fastgrow.checkpoint import latest_checkpoint, load_checkpoint
from fastgrow.checkpoint_dcp import load_parallel_state, save_sharded_checkpoint
from fastgrow.config import RunConfig
from fastgrow.grow import GrowPlan, grow

PLANS = {
    "stack_noise": GrowPlan(depth="stack", factor=2, noise=0.1),
    "zero": GrowPlan(depth="zero", factor=2),
    "random": GrowPlan(depth="random", target_layers=3),
    "width_direct": GrowPlan(depth="none", width="direct", target_dim=64, target_ffn_dim=128),
    "stack_width_random": GrowPlan(depth="stack", factor=2, width="random", target_dim=64, target_ffn_dim=96),
}


def tensors(state) -> dict[str, torch.Tensor]:
    """Every parameter, Adam moment and step as full tensors (collective for a sharded state)."""
    out = {}
    for name, p in state.model.named_parameters():
        out[name] = sharding.full_tensor(p.detach())
        for key, v in sorted(state.optimizer.state.get(p, {}).items()):
            out[f"{key}/{name}"] = sharding.full_tensor(v)
    return out


def mismatches(sharded, plain) -> list[str]:
    a, b = tensors(sharded), tensors(plain)
    bad = sorted(set(a) ^ set(b))
    bad += [k for k in sorted(set(a) & set(b)) if a[k].shape != b[k].shape or not torch.equal(a[k], b[k])]
    for attr in ("step", "tokens", "cursor", "growth_history", "bad_steps"):
        if getattr(sharded, attr) != getattr(plain, attr):
            bad.append(attr)
    if sharded.schedule != plain.schedule:
        bad.append("schedule")
    return bad


def main(work: Path) -> None:
    cfg = RunConfig.from_dict(json.loads((work / "cfg.json").read_text()))
    results: dict[str, object] = {}
    with distributed.session(cfg) as ctx:
        assert ctx.sharded and ctx.world_size == 2, ctx
        src = latest_checkpoint(work / "single")
        sharded = load_parallel_state(src, cfg, ctx)
        plain = load_checkpoint(src, "cpu", config=cfg)
        assert sharding.model_is_sharded(sharded.model)
        results["load_single"] = mismatches(sharded, plain)
        save_sharded_checkpoint(sharded, work / "dcp", keep=2, tokenizer=None, ctx=ctx)
        for name, plan in PLANS.items():
            results[f"grow_{name}"] = mismatches(grow(sharded, plan), grow(plain, plan))

        # Non-finite loss on one rank only: every rank must skip the same step.
        from fastgrow import model as model_mod
        from fastgrow.train import train

        real = model_mod.Transformer.forward
        calls = {"n": 0}

        def flaky(self, tokens, targets=None):
            out = real(self, tokens, targets)
            if targets is not None and self.training:
                calls["n"] += 1
                if ctx.rank == 1 and calls["n"] == 3:
                    return out * float("nan")
            return out

        model_mod.Transformer.forward = flaky
        nf_cfg = dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, out_dir=str(work / "nonfinite"), max_steps=5, ckpt_every=0)
        )
        res = train(nf_cfg, echo=False)
        model_mod.Transformer.forward = real
        skips = [r["skipped_steps"] for r in res.records if r["kind"] == "train"]
        losses = [r["loss"] for r in res.records if r["kind"] == "train"]
        results["skips"] = ctx.all_gather(skips)
        results["losses"] = ctx.all_gather(losses)
        if ctx.is_main:
            (work / "results.json").write_text(json.dumps(results))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
