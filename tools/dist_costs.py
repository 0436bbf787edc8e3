"""Time grow() and a checkpoint write of one state, in one process or sharded under torchrun.

    python tools/dist_costs.py --dim 256 --layers 4
    torchrun --standalone --nproc_per_node=2 tools/dist_costs.py --dim 256 --layers 4

The state is a fresh model after one AdamW step (so moments exist). Timed (median of --repeat, after one
warm-up): depth growth (stack x2), width growth (direct, dim and ffn x2), and one checkpoint write (the
single-process layout, or the sharded DCP layout). Rank 0 prints one JSON line.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import tempfile
import time

import torch

from fastgrow import distributed
from fastgrow.config import ModelConfig, RunConfig, TrainConfig
from fastgrow.grow import GrowPlan, grow


def _timed(fn, repeat: int, ctx) -> float:
    fn()
    out = []
    for _ in range(repeat):
        ctx.barrier()
        t0 = time.perf_counter()
        fn()
        ctx.barrier()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--dim", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    heads = args.dim // 32
    model = ModelConfig(
        vocab_size=4096, dim=args.dim, n_layers=args.layers, n_heads=heads, n_kv_heads=heads // 2,
        ffn_dim=args.dim * 3, max_seq_len=64,
    )  # fmt: skip
    cfg = RunConfig(model=model, train=TrainConfig(device="cpu", max_steps=10))
    with distributed.session(cfg) as ctx:
        state = distributed.build_parallel_state(cfg, ctx)  # one process: build_state on ctx.device (cpu)
        x = torch.randint(0, 4096, (2, 64))
        state.model(x, x).backward()
        state.optimizer.step()
        state.optimizer.zero_grad()
        depth = GrowPlan(depth="stack", factor=2)
        width = GrowPlan(depth="none", width="direct", target_dim=2 * args.dim, target_ffn_dim=6 * args.dim)
        res = {
            "world_size": ctx.world_size,
            "parallel": ctx.parallel,
            "params": state.model.num_params(),
            "grow_depth_s": _timed(lambda: grow(state, depth), args.repeat, ctx),
            "grow_width_s": _timed(lambda: grow(state, width), args.repeat, ctx),
        }
        tmp = ctx.broadcast(tempfile.mkdtemp(prefix="dist-costs-") if ctx.is_main else None)
        step = iter(range(1, 1000))

        def save():
            s = dataclasses.replace(state, step=next(step))
            if ctx.enabled:
                from fastgrow.checkpoint_dcp import save_run_checkpoint

                save_run_checkpoint(s, tmp, 2, tokenizer=None, ctx=ctx)
            else:
                from fastgrow.checkpoint import save_checkpoint

                save_checkpoint(s, tmp, 2)

        res["save_s"] = _timed(save, args.repeat, ctx)
        if ctx.is_main:
            print(json.dumps(res))


if __name__ == "__main__":
    main()
