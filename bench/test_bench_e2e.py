"""End-to-end training-step throughput: fastgrow's model (our kernels) vs the same architecture in plain
PyTorch (SDPA + torch.nn.RMSNorm + eager SwiGLU), each eager and under torch.compile, in one run.

A step = forward + backward + AdamW (fused on CUDA) at bf16 autocast on CUDA. tokens/s = batch*seq /
median step time; MFU uses fastgrow's convention (6N + causal attention, see fastgrow/metrics.py).
GPU: the paper's 410M target (24 x 1024, seq 2048). CPU: a tiny config, eager only (harness check).
The variants run most important first (fastgrow eager, the plain+compile baseline, fastgrow compiled,
plain eager), so a run cut short by a time budget still answers the goals. Each row also records the
step's peak allocated GPU memory (the chunked cross-entropy's saving shows there).
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from kernel_harness import QUICK
from results_log import record

from bench.plain_llama import PlainLlama
from fastgrow.config import ModelConfig, preset
from fastgrow.metrics import mfu, peak_flops
from fastgrow.model import Transformer, flops_per_token

CUDA = torch.cuda.is_available()
DEV = torch.device("cuda" if CUDA else "cpu")

if CUDA:
    CFG = preset("410M").model
    BATCH, SEQ = 8, 2048
else:
    CFG = ModelConfig(vocab_size=512, dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=128)
    BATCH, SEQ = 4, 64

VARIANTS = [("fastgrow", False), ("plain", True), ("fastgrow", True), ("plain", False)]
if not CUDA:
    VARIANTS = [v for v in VARIANTS if not v[1]]


def build(kind: str, compile_: bool):
    torch.manual_seed(0)
    model = (Transformer(CFG) if kind == "fastgrow" else PlainLlama(CFG)).to(DEV)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=CUDA)
    fwd = torch.compile(model) if compile_ else model
    return model, opt, fwd


@pytest.mark.parametrize("kind,compile_", VARIANTS, ids=[f"{k}-{'compiled' if c else 'eager'}" for k, c in VARIANTS])
@pytest.mark.benchmark(group="e2e-train-step")
def test_train_step_throughput(benchmark, kind, compile_):
    model, opt, fwd = build(kind, compile_)
    x = torch.randint(0, CFG.vocab_size, (BATCH, SEQ), device=DEV)
    y = torch.randint(0, CFG.vocab_size, (BATCH, SEQ), device=DEV)
    amp = torch.autocast("cuda", dtype=torch.bfloat16) if CUDA else contextlib.nullcontext()

    def step():
        with amp:
            loss = fwd(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if CUDA:
            torch.cuda.synchronize()
        return loss

    if CUDA:
        torch.cuda.reset_peak_memory_stats()
    benchmark.pedantic(step, rounds=(6 if QUICK else 10) if CUDA else 2, warmup_rounds=3 if CUDA else 1)
    peak_gb = torch.cuda.max_memory_allocated() / 2**30 if CUDA else None
    tps = BATCH * SEQ / benchmark.stats.stats.median
    m = mfu(flops_per_token(CFG, SEQ), tps, peak_flops(DEV))
    benchmark.extra_info.update(tokens_per_s=tps, mfu=m, peak_mem_gb=peak_gb)
    record(
        "e2e",
        model=kind,
        compiled=compile_,
        layers=CFG.n_layers,
        dim=CFG.dim,
        batch=BATCH,
        seq=SEQ,
        median_s=benchmark.stats.stats.median,
        tokens_per_s=tps,
        mfu=m,
        mfu_6n=mfu(flops_per_token(CFG, SEQ, include_attention=False), tps, peak_flops(DEV)),
        peak_mem_gb=peak_gb,
    )
