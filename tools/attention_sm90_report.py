"""Compile the Triton kernels for an H100/H200 (sm_90a) on a machine WITHOUT a GPU and report, per kernel and
launch config: registers, spill bytes, shared memory, and whether the main loops were software-pipelined
(async copies) and use Hopper wgmma. Every candidate of the attention launch tables
(kernels/attention_configs.py GPU_CANDIDATES, tuned on the GPU at first use) is compiled; with --norms also the
RMSNorm candidates (kernels/rmsnorm_configs.py). Timings still need a GPU (bench/, tools/gpu_check.sh).

    TRITON_INTERPRET=0 python tools/attention_sm90_report.py [--dtype bf16|fp16|fp32] [--head-dims 64 128]
        [--config fwd:128,64,8,3 dkdv:32,128,8,2 ...] [--norms] [--markdown bench/results/...md]

The committed table, bench/results/attention-sm90-report.md, is made with triton 3.6 (the GPU machine's):
    TRITON_INTERPRET=0 python tools/attention_sm90_report.py --dtype bf16 fp32 --both-causal --norms \
        --markdown bench/results/attention-sm90-report.md

The compile mimics the JIT's specialisation for the usual inputs: head-dim strides of 1 become
constants, pointers and the other strides are marked divisible by 16, the dK/dV group split is 1 (a
constant, as the JIT specialises it; one extra row compiles the split variant). Needs triton's NVIDIA
backend (bundled ptxas); no driver.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # must precede the kernels' import: the compiler, not the interpreter

import torch  # noqa: E402
import triton  # noqa: E402
from fastgrow.kernels import attention_configs as A  # noqa: E402  (the attention launch tables)
from fastgrow.kernels.attention_bwd import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel  # noqa: E402
from fastgrow.kernels.attention_fwd import attn_fwd_kernel  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

KERNELS = {"fwd": attn_fwd_kernel, "dkdv": attn_bwd_dkdv_kernel, "dq": attn_bwd_dq_kernel}
PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
TARGET = GPUTarget("cuda", 90, 32)


def compile_sm90(fn, signature: dict, consts: dict, aligned: set, warps: int, stages: int):
    """triton.compile `fn` for sm_90a with `signature` (arg -> type; constexprs from `consts`) and 16-byte
    divisibility on the `aligned` args (what the JIT infers for aligned pointers and strides)."""
    sig = {n: ("constexpr" if n in consts else signature[n]) for n in fn.arg_names}
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(fn.arg_names) if n in aligned and n not in consts}
    src = ASTSource(fn, sig, constexprs={k: v for k, v in consts.items() if k in fn.arg_names}, attrs=attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": warps, "num_stages": stages})


def ptxas_usage(ptx: str) -> tuple[int, int]:
    """(registers per thread, spill-store bytes) from the bundled ptxas -v."""
    bindir = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")
    ptxas = next(
        p for p in (os.path.join(bindir, "ptxas-blackwell"), os.path.join(bindir, "ptxas")) if os.path.exists(p)
    )
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    try:
        err = subprocess.run(
            [ptxas, "-v", "--gpu-name=sm_90a", f.name, "-o", os.devnull], capture_output=True, text=True
        )
    finally:
        os.unlink(f.name)
    if err.returncode:
        raise RuntimeError(err.stderr[-500:])
    regs = max(int(x) for x in re.findall(r"Used (\d+) registers", err.stderr))
    spill = sum(int(x) for x in re.findall(r"(\d+) bytes spill stores", err.stderr))
    return regs, spill


def _attn_signature(fn, ptr_ty: str) -> tuple[dict, set]:
    sig, aligned = {}, set()
    for n in fn.arg_names:
        if n in ("LSE", "DELTA"):
            sig[n] = "*fp32"
        elif n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
            sig[n] = ptr_ty
        else:
            sig[n] = "fp32" if n.endswith("scale") else "i32"
        if sig[n].startswith("*") or n.startswith("stride_"):
            aligned.add(n)
    return sig, aligned


def attention_row(kern: str, d: int, dtype: str, cfg, causal: bool, split_const: bool = True) -> dict:
    fn = KERNELS[kern]
    sig, aligned = _attn_signature(fn, PTR[dtype])
    bd = A._block_d(d)  # as the launcher pads head_dim
    consts = dict(
        HEAD_DIM=d, BLOCK_D=bd, PAD_D=bd != d, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, CAUSAL=causal,
        DOT_PREC=A._dot_precision({"fp32": torch.float32}.get(dtype, torch.bfloat16)),
    )  # fmt: skip
    consts.update({n: 1 for n in fn.arg_names if n.startswith("stride_") and n.endswith("d")})
    if kern == "dkdv" and split_const:
        consts["SPLIT"] = 1
    k = compile_sm90(fn, sig, consts, aligned, cfg.num_warps, cfg.num_stages)
    regs, spill = ptxas_usage(k.asm["ptx"])
    ttgir = k.asm["ttgir"]
    return {
        "kernel": kern if split_const or kern != "dkdv" else "dkdv (group split)",
        "head_dim": d,
        "dtype": dtype,
        "causal": causal,
        "config": repr(cfg),
        "regs": regs,
        "spill_bytes": spill,
        "smem_kb": k.metadata.shared // 1024,
        "pipelined": "async_copy_global_to_local" in ttgir or "async_tma" in ttgir,
        "wgmma": "wgmma" in k.asm["ptx"],
    }


def norm_rows() -> list[dict]:
    """Every RMSNorm forward/backward candidate at the model widths (bf16; backward with the fused
    residual and the autocast fp32 stream, the heaviest variant)."""
    R = importlib.import_module("fastgrow.kernels.rmsnorm")
    C = importlib.import_module("fastgrow.kernels.rmsnorm_configs")
    rows = []
    for n in (1024, 2048, 4096, 8192):
        block_n = C._launch_config(n)[0]  # as the launchers pick it
        for cand in R.fwd_candidates(n):
            sig = {k: "*bf16" for k in ("X", "R", "H", "Y", "W")}
            sig.update(RSTD="*fp32", stride_xm="i32", stride_rm="i32", M="i32", N="i32", eps="fp32")
            consts = dict(stride_xn=1, stride_rn=1, HAS_RES=True, HAS_W=True, ROWS=cand.rows, BLOCK_N=block_n)
            aligned = {"X", "R", "H", "Y", "W", "RSTD", "stride_xm", "stride_rm", "N"}
            k = compile_sm90(R._rms_norm_fwd_kernel, sig, consts, aligned, cand.num_warps, 1)
            regs, spill = ptxas_usage(k.asm["ptx"])
            rows.append(
                dict(kernel="add_rms_norm fwd", width=n, config=repr(cand), regs=regs, spill_bytes=spill, pipelined="-")
            )
        for cand in R.bwd_candidates(n):
            sig = {k: "*fp32" for k in ("DY", "X", "DH", "W", "DR")}
            sig.update(DX="*bf16", RSTD="*fp32", DW_PART="*fp32", M="i32", N="i32", tiles_per_prog="i32")
            sig.update(stride_dym="i32", stride_xm="i32", stride_dhm="i32")
            consts = dict(stride_dyn=1, stride_xn=1, stride_dhn=1, HAS_W=True, HAS_DH=True, HAS_DR=True)
            consts.update(COMPUTE_DW=True, RELOAD_W=block_n >= C._RELOAD_W_MIN_BLOCK, NUM_STAGES=2)
            consts.update(ROWS=cand.rows, BLOCK_N=block_n)
            aligned = {"DY", "X", "DH", "W", "RSTD", "DX", "DR", "DW_PART", "stride_dym", "stride_xm", "stride_dhm"}
            k = compile_sm90(R._rms_norm_bwd_kernel, sig, consts, aligned | {"N"}, cand.num_warps, 1)
            regs, spill = ptxas_usage(k.asm["ptx"])
            pipelined = "async_copy_global_to_local" in k.asm["ttgir"]
            rows.append(
                dict(
                    kernel="add_rms_norm bwd",
                    width=n,
                    config=repr(cand),
                    regs=regs,
                    spill_bytes=spill,
                    pipelined=pipelined,
                )
            )
    return rows


def _line(r: dict, origin: str) -> str:
    return (
        f"hd{r['head_dim']:<4d}{r['kernel']:5s} {'causal' if r['causal'] else 'full':6s} {origin:8s} "
        f"{r['config']}: {r['regs']} regs, {r['spill_bytes']} B spill, "
        f"{r['smem_kb']} KB smem, pipelined={r['pipelined']}, wgmma={r['wgmma']}"
    )


def _markdown(rows: list[dict], norms: list[dict], args) -> str:
    out = [
        "# sm_90a offline compile report (no GPU)",
        "",
        f"`TRITON_INTERPRET=0 python tools/attention_sm90_report.py {' '.join(args.argv)}` with triton "
        f"{triton.__version__} (the GPU machine's version is 3.6), target sm_90a, ptxas -v. Registers are per "
        "thread (255 = the cap); spills are ptxas spill-store bytes; smem is the kernel's static + dynamic "
        "shared memory; pipelined = the main loop's loads became async copies; wgmma = Hopper tensor-core "
        "instructions. `origin`: fallback = the config used without tuning (FASTGROW_TUNE=0), candidate = "
        "timed on the GPU at first use. fp32 rows are the exact-fp32 accuracy path (only with "
        "backend='triton'; backend='auto' sends fp32 CUDA inputs to SDPA): ieee dots on CUDA cores, no wgmma, "
        "heavy spills, which is why auto avoids them.",
        "",
        "| kernel | head_dim | dtype | causal | config (BMxBN, warps, stages) | origin | regs | spill B | smem KB "
        "| pipelined | wgmma |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        out.append(
            f"| {r['kernel']} | {r['head_dim']} | {r['dtype']} | {r['causal']} | {r['config']} | {r['origin']} | "
            f"{r['regs']} | {r['spill_bytes']} | {r['smem_kb']} | {r['pipelined']} | {r['wgmma']} |"
        )
    if norms:
        out += [
            "",
            "RMSNorm candidates (bf16 output; backward of the fused residual with an fp32 stream, its heaviest "
            "variant). Config: ROWS x warps.",
            "",
            "| kernel | width | config | regs | spill B | row loop pipelined |",
            "|---|---|---|---|---|---|",
        ]
        out += [
            f"| {r['kernel']} | {r['width']} | {r['config']} | {r['regs']} | {r['spill_bytes']} | {r['pipelined']} |"
            for r in norms
        ]
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", nargs="+", default=["bf16"], choices=sorted(PTR))
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--config", nargs="*", default=[], help="extra configs, e.g. dkdv:16,128,8,2")
    ap.add_argument("--kernels", nargs="+", default=list(KERNELS), choices=list(KERNELS))
    ap.add_argument("--fallback-only", action="store_true", help="only the fallback config of each table")
    ap.add_argument("--both-causal", action="store_true", help="also compile the non-causal variants")
    ap.add_argument("--norms", action="store_true", help="also the RMSNorm candidates")
    ap.add_argument("--markdown", help="also write the table to this markdown file")
    args = ap.parse_args(argv)
    args.argv = argv if argv is not None else __import__("sys").argv[1:]
    print(f"triton {triton.__version__}, target sm_90a, {' '.join(args.dtype)}", flush=True)
    rows = []
    for dtype, d in ((t, d) for t in args.dtype for d in args.head_dims):
        cands = A.GPU_CANDIDATES[(dtype == "fp32", d <= 64)]
        runs = []
        for kern in args.kernels:
            cfgs = getattr(cands, kern)
            runs += [(kern, c, "fallback" if i == 0 else "candidate") for i, c in enumerate(cfgs)]
            if args.fallback_only:
                runs = runs[: len(runs) - len(cfgs) + 1]
        for spec in args.config:
            kern, nums = spec.split(":")
            runs.append((kern, A._Cfg(*map(int, nums.split(","))), "extra"))
        for causal in (True, False) if args.both_causal else (True,):
            for kern, c, origin in runs:
                r = attention_row(kern, d, dtype, c, causal)
                rows.append({**r, "origin": origin})
                print(_line(r, origin), flush=True)
            if "dkdv" in args.kernels and not args.fallback_only:
                r = attention_row("dkdv", d, dtype, cands.dkdv[0], causal, split_const=False)
                rows.append({**r, "kernel": "dkdv (group split)", "origin": "fallback"})
                print(_line({**r, "kernel": "dkdvS"}, "fallback") + " (group split)", flush=True)
    norms = norm_rows() if args.norms else []
    for r in norms:
        print(f"{r['kernel']} {r['width']} {r['config']}: {r['regs']} regs, {r['spill_bytes']} B spill", flush=True)
    for dtype in args.dtype:
        worst = max((r["spill_bytes"] for r in rows if r["dtype"] == dtype), default=0)
        print(f"attention {dtype}: worst spill over all configs: {worst} B", flush=True)
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(_markdown(rows, norms, args))


if __name__ == "__main__":
    main()
