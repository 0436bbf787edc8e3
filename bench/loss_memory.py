"""Peak memory of one training step (forward + backward) with the model's chunked linear cross-entropy vs the
unfused loss it replaced (`F.cross_entropy(output(x).float(), targets)`), side by side in one run, on a CPU.

    python bench/loss_memory.py [--layers 4] [--batch 4] [--seq 2048] [--out bench/results/loss-memory.json]

The model has the 410M preset's shapes (dim 1024, 16 heads, ffn 2816, vocab 32000; fewer layers by
default, so two fp32 steps fit a shared 24 GB machine: the loss's memory does not depend on depth). Each
variant runs in its own child process with glibc's mmap threshold fixed at 64 KB, so every tensor of
consequence is its own mapping, returned to the OS when freed, and the resident set follows the live
tensors; the step's peak is the kernel's resident high-water mark (VmHWM, reset through
/proc/self/clear_refs after the model is built) minus the resident size before the step. Same seed, same
weights and batch: the two losses must agree (printed).

Then the GPU saving by arithmetic (bf16 autocast, batch 8 x 2048 at vocab 32000), printed with the measured
CPU numbers. Linux only (reads /proc).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import time
from pathlib import Path

GB = 2**30


def _rss_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def child(variant: str, layers: int, batch: int, seq: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    from fastgrow.config import preset
    from fastgrow.model import Transformer

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    cfg = preset("410M").model
    cfg = type(cfg)(**{**cfg.__dict__, "n_layers": layers, "max_seq_len": seq, "kernel_impl": "ref"})
    model = Transformer(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (batch, seq + 1), generator=torch.Generator().manual_seed(1))
    x, y = tokens[:, :-1], tokens[:, 1:]

    def loss_fn():
        if variant == "chunked":
            return model(x, y)
        logits = model(x)  # the loss as it was: whole logits, upcast, F.cross_entropy
        return F.cross_entropy(logits.float().view(-1, cfg.vocab_size), y.reshape(-1))

    ctypes.CDLL("libc.so.6").malloc_trim(0)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current resident size
    before = _rss_bytes("VmRSS")
    t0 = time.perf_counter()
    loss = loss_fn()
    loss.backward()
    seconds = time.perf_counter() - t0
    peak = _rss_bytes("VmHWM")
    return {
        "variant": variant,
        "loss": loss.item(),
        "step_peak_gb": (peak - before) / GB,
        "resident_before_gb": before / GB,
        "seconds": seconds,
        "tokens": batch * seq,
        "layers": layers,
    }


def gpu_arithmetic(tokens: int = 8 * 2048, vocab: int = 32000, dim: int = 1024, chunk: int = 2048) -> dict:
    """Bytes of the loss's own tensors at the 410M preset on a GPU (bf16 autocast), by counting.

    Unfused: the bf16 logits (2 B per token x vocab element), their fp32 upcast (4 B) and the fp32
    log-softmax (4 B, saved for the backward) coexist in the forward (10 B); the log-softmax output stays
    alive until the loss's backward (4 B, while every activation of the network is alive: the step's peak),
    where the fp32 gradient of the log-softmax and of its input join it (4 + 4 B) before the bf16 cast
    (2 B): 12 B at that moment. Chunked: one bf16 chunk of logits (chunk x vocab x 2 B, the gradient
    written over it), dx [tokens, dim] bf16 and dW [vocab, dim] fp32, plus the weight's bf16 copy that
    autocast would make anyway."""
    nv = tokens * vocab
    unfused_peak = 12 * nv
    unfused_held = 4 * nv
    chunked = chunk * vocab * 2 + tokens * dim * 2 + vocab * dim * 4
    return {
        "tokens": tokens,
        "vocab": vocab,
        "unfused_peak_gb": unfused_peak / GB,
        "unfused_held_through_backward_gb": unfused_held / GB,
        "chunked_peak_gb": chunked / GB,
        "saving_at_peak_gb": (unfused_peak - chunked) / GB,
    }


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--seq", type=int, default=2048)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", type=Path, help="also write the results as JSON here")
    ap.add_argument("--child", choices=["unfused", "chunked"], help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child, args.layers, args.batch, args.seq, args.threads)))
        return 0
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", TRITON_INTERPRET="0")
    rows = []
    for variant in ("unfused", "chunked"):
        cmd = [sys.executable, __file__, "--child", variant, "--layers", str(args.layers), "--batch", str(args.batch)]
        cmd += ["--seq", str(args.seq), "--threads", str(args.threads)]
        res = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if res.returncode:
            print(res.stderr[-3000:], file=sys.stderr)
            return 1
        rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        r = rows[-1]
        print(
            f"{variant:8s} {r['layers']} layers x 410M shapes, {r['tokens']} tokens (fp32, CPU): step peak "
            f"{r['step_peak_gb']:.2f} GB over {r['resident_before_gb']:.2f} GB resident, loss {r['loss']:.6f}, "
            f"{r['seconds']:.0f} s"
        )
    saved = rows[0]["step_peak_gb"] - rows[1]["step_peak_gb"]
    print(f"saving on this CPU step: {saved:.2f} GB ({saved / rows[0]['step_peak_gb']:.0%} of the step's peak)")
    g = gpu_arithmetic()
    print(
        f"GPU by arithmetic (bf16 autocast, {g['tokens']} tokens x vocab {g['vocab']}): the unfused loss holds "
        f"{g['unfused_held_through_backward_gb']:.1f} GB from its forward to its backward and peaks at "
        f"{g['unfused_peak_gb']:.1f} GB there; the chunked loss peaks at {g['chunked_peak_gb']:.2f} GB: "
        f"{g['saving_at_peak_gb']:.1f} GB less at the step's peak"
    )
    if args.out:
        args.out.write_text(json.dumps({"cpu": rows, "gpu_arithmetic": g}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
