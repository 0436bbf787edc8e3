"""Peak host memory of a G_learn step vs a training step of the grown model, measured on the CPU.

    python tools/learn_memory.py                      # dim 512, 2 -> 8 layers (G_stack x4), batch 8 x 256
    python tools/learn_memory.py --dim 256 --json

Each measurement runs in a fresh process (fp32, CPU, glibc's mmap threshold pinned at 64 KiB so freed
tensors go back to the OS and the peak RSS follows live tensor memory): the process's RSS after `import
torch` is subtracted from its peak RSS (VmHWM, reset just before the measured step). "learn" holds the
small TrainState (weights and Adam moments, trained one step) and a LearnPhase (maps and their Adam
state, warmed by one step) and measures one learn step; "train" holds the grown model's TrainState
(weights and Adam moments, warmed by one step) and measures one training step. The activation bytes of
the large model's forward (tensors saved for backward that are not weights) are counted with
saved_tensors_hooks in the "train" process. The report then predicts both peaks from the byte counts
(see `predict`) and prints the same prediction for a preset pair (default 1.1B-base -> 1.1B).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys

MMAP_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "OMP_NUM_THREADS": "1"}


def _rss(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def _configs(dim: int, base_layers: int, factor: int):
    from fastgrow.config import ModelConfig

    heads = dim // 64
    small = ModelConfig(
        vocab_size=4096,
        dim=dim,
        n_layers=base_layers,
        n_heads=heads,
        n_kv_heads=max(1, heads // 4),
        ffn_dim=256 * -(-(8 * dim // 3) // 256),
        max_seq_len=2048,
    )
    return small, dataclasses.replace(small, n_layers=base_layers * factor)


def child(kind: str, dim: int, base_layers: int, factor: int, seq: int, batch: int) -> dict:
    import dataclasses

    import torch

    from fastgrow.config import RunConfig, TrainConfig
    from fastgrow.grow import GrowPlan
    from fastgrow.grow_learn import LearnPhase
    from fastgrow.state import build_state

    small_cfg, large_cfg = _configs(dim, base_layers, factor)
    tcfg = TrainConfig(device="cpu", lr=1e-3, min_lr=1e-4, max_steps=10)
    # Page in the code paths (a learn step of a tiny model) before the baseline, so it counts tensors only.
    tiny = dataclasses.replace(small_cfg, dim=64, n_heads=1, n_kv_heads=1, ffn_dim=64, vocab_size=64, n_layers=1)
    warm = build_state(RunConfig(model=tiny, train=tcfg), device="cpu")
    t = torch.randint(0, 64, (1, 8))
    warm.model(t, t).backward()
    warm.optimizer.step()
    LearnPhase(warm, GrowPlan("stack", factor=2), steps=1).train_step([(t, t)])
    del warm
    base_rss = _rss("VmRSS")
    torch.manual_seed(0)
    x = torch.randint(0, small_cfg.vocab_size, (batch, seq))
    y = torch.roll(x, -1, 1)
    out: dict = {"kind": kind}
    if kind == "learn":
        st = build_state(RunConfig(model=small_cfg, train=tcfg), device="cpu")
        st.model(x, y).backward()
        st.optimizer.step()
        st.optimizer.zero_grad(set_to_none=True)
        phase = LearnPhase(st, GrowPlan("stack", factor=factor), steps=3)
        phase.train_step([(x, y)])
        out["maps_params"] = sum(p.numel() for p in phase.maps.parameters())
        _reset_peak()
        held = _rss("VmRSS")
        phase.train_step([(x, y)])
    else:
        st = build_state(RunConfig(model=large_cfg, train=tcfg), device="cpu")
        weights = {p.untyped_storage().data_ptr() for p in st.model.parameters()}
        saved: dict[int, int] = {}

        def pack(t):
            s = t.untyped_storage()
            if s.data_ptr() not in weights:
                saved[s.data_ptr()] = s.nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            st.model(x, y).backward()
        out["activation_bytes"] = sum(saved.values())
        st.optimizer.step()
        st.optimizer.zero_grad(set_to_none=True)
        _reset_peak()
        held = _rss("VmRSS")
        st.model(x, y).backward()
        st.optimizer.step()
        st.optimizer.zero_grad(set_to_none=True)
    out["held_bytes"] = held - base_rss
    out["peak_bytes"] = _rss("VmHWM") - base_rss
    return out


def predict(small, large, maps_params: int, activations: float, bytes_per: int = 4) -> dict[str, float]:
    """Byte counts of what each step holds at its peak (fp32 tensors of `bytes_per` bytes):

    learn: small weights + Adam (3 N_s), maps + grads + Adam (4 M), the expanded large weights and
    their gradients (2 N), the width-expanded small layers the depth mix reads (L/T of the large
    layers' weights, 2 tensors per weight: after the write and after the read map), activations;
    train: the grown model's weights, gradients and Adam moments (4 N) and the same activations.
    """
    n_s, n = small.num_params(), large.num_params()
    block = (large.num_params(include_embeddings=False) - large.dim) / large.n_layers  # one layer's weights
    expanded_small_layers = 2 * small.n_layers * block
    learn = bytes_per * (3 * n_s + 4 * maps_params + 2 * n + expanded_small_layers) + activations
    train = bytes_per * 4 * n + activations
    return {"learn": learn, "train": train}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dim", type=int, default=512)
    ap.add_argument("--base-layers", type=int, default=2)
    ap.add_argument("--factor", type=int, default=4)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--preset", default="1.1B", help="target preset to extrapolate to (its -base is the small model)")
    ap.add_argument("--json", action="store_true")
    ap.add_argument("--child", choices=("learn", "train"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    shape = (args.dim, args.base_layers, args.factor, args.seq, args.batch)
    if args.child:
        print(json.dumps(child(args.child, *shape)))
        return 0
    res = {}
    for kind in ("learn", "train"):
        cmd = [sys.executable, __file__, "--child", kind, "--dim", str(args.dim), "--base-layers"]
        cmd += [str(args.base_layers), "--factor", str(args.factor), "--seq", str(args.seq), "--batch", str(args.batch)]
        proc = subprocess.run(cmd, env={**os.environ, **MMAP_ENV}, capture_output=True, text=True, check=True)
        res[kind] = json.loads(proc.stdout.strip().splitlines()[-1])
    from fastgrow.config import preset

    small, large = _configs(args.dim, args.base_layers, args.factor)
    acts = res["train"]["activation_bytes"]
    pred = predict(small, large, res["learn"]["maps_params"], acts)
    big = preset(args.preset).model
    big_small = preset(args.preset + "-base").model
    from fastgrow.grow_learn_maps import map_params

    maps_big = map_params(big_small, big)
    report = {
        "measured": res,
        "predicted_cpu": pred,
        "small": small.architecture(),
        "large": large.architecture(),
        "extrapolated": {
            "preset": args.preset,
            "small_params": big_small.num_params(),
            "large_params": big.num_params(),
            "maps_params": maps_big,
            "bytes_without_activations": predict(big_small, big, maps_big, 0.0),
        },
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    gib = 2**30
    print(f"CPU, fp32: {small.n_layers} -> {large.n_layers} layers, dim {args.dim}, batch {args.batch} x {args.seq}")
    print(f"  small {small.num_params():,} params, large {large.num_params():,}, maps {res['learn']['maps_params']:,}")
    print(f"  activations of the large model's forward: {acts / gib:.3f} GiB")
    for kind in ("learn", "train"):
        print(
            f"  {kind:<5} step: peak {res[kind]['peak_bytes'] / gib:.3f} GiB measured, "
            f"{pred[kind] / gib:.3f} GiB predicted (held between steps {res[kind]['held_bytes'] / gib:.3f} GiB)"
        )
    e = report["extrapolated"]
    b = e["bytes_without_activations"]
    print(
        f"{args.preset}-base -> {args.preset}: small {e['small_params']:,}, large {e['large_params']:,}, "
        f"maps {e['maps_params']:,} params; fp32 state + weights, activations excluded: "
        f"learn {b['learn'] / gib:.1f} GiB, train {b['train'] / gib:.1f} GiB"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
