"""Compile the Triton attention kernels for an H100 (sm_90a) on a machine WITHOUT a GPU and report, per
kernel and launch config: registers, spill bytes, shared memory, and whether the main loops were
software-pipelined (async copies) and use Hopper wgmma. This is how the fixed launch table in
kernels/attention.py was checked; timings still need a GPU (bench/test_bench_attention.py).

    TRITON_INTERPRET=0 python tools/attention_sm90_report.py [--dtype bf16|fp16|fp32] [--head-dims 64 128]
        [--config fwd:128,64,8,3 dkdv:32,128,8,2 ...]   (extra configs: kernel:block_m,block_n,warps,stages)

The compile mimics the JIT's specialisation for the usual inputs: head-dim strides of 1 become
constants, pointers and the other strides are marked divisible by 16. Needs triton's NVIDIA backend
(bundled ptxas); no driver.
"""

from __future__ import annotations

import argparse
import importlib
import os
import re
import subprocess
import tempfile

os.environ["TRITON_INTERPRET"] = "0"  # must precede the kernels' import: the compiler, not the interpreter

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

A = importlib.import_module("fastgrow.kernels.attention")  # the package re-exports a function of that name
from fastgrow.kernels.attention_bwd import attn_bwd_dkdv_kernel, attn_bwd_dq_kernel  # noqa: E402
from fastgrow.kernels.attention_fwd import attn_fwd_kernel  # noqa: E402

KERNELS = {"fwd": attn_fwd_kernel, "dkdv": attn_bwd_dkdv_kernel, "dq": attn_bwd_dq_kernel}
PTR = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32"}
TARGET = GPUTarget("cuda", 90, 32)


def _compile(fn, ptr_ty: str, consts: dict, warps: int, stages: int):
    consts = dict(consts)
    consts.update({n: 1 for n in fn.arg_names if n.startswith("stride_") and n.endswith("d")})
    sig = {}
    for n in fn.arg_names:
        if n in consts:
            sig[n] = "constexpr"
        elif n in ("LSE", "DELTA"):
            sig[n] = "*fp32"
        elif n in ("Q", "K", "V", "O", "DO", "DQ", "DK", "DV"):
            sig[n] = ptr_ty
        else:
            sig[n] = "fp32" if n.endswith("scale") else "i32"
    attrs = {
        (i,): [["tt.divisibility", 16]]
        for i, n in enumerate(fn.arg_names)
        if sig[n] != "constexpr" and (sig[n].startswith("*") or n.startswith("stride_"))
    }
    src = ASTSource(fn, sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=TARGET, options={"num_warps": warps, "num_stages": stages})


def _ptxas(ptx: str) -> tuple[int, int]:
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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", default="bf16", choices=sorted(PTR))
    ap.add_argument("--head-dims", type=int, nargs="+", default=[64, 128])
    ap.add_argument("--config", nargs="*", default=[], help="extra configs, e.g. dkdv:16,128,8,2")
    args = ap.parse_args()
    print(f"triton {triton.__version__}, target sm_90a, {args.dtype}")
    for d in args.head_dims:
        table = A._GPU_CFGS[(args.dtype == "fp32", d <= 64)]
        runs = [(k, getattr(table, k), "table") for k in KERNELS]
        for spec in args.config:
            kern, nums = spec.split(":")
            runs.append((kern, A._Cfg(*map(int, nums.split(","))), "extra"))
        for kern, c, origin in runs:
            bd = triton.next_power_of_2(d)
            consts = dict(
                HEAD_DIM=d, BLOCK_D=bd, PAD_D=bd != d, BLOCK_M=c.block_m, BLOCK_N=c.block_n, CAUSAL=True,
                DOT_PREC=A._dot_precision({"fp32": A.torch.float32}.get(args.dtype, A.torch.bfloat16)),
            )  # fmt: skip
            k = _compile(KERNELS[kern], PTR[args.dtype], consts, c.num_warps, c.num_stages)
            regs, spill = _ptxas(k.asm["ptx"])
            ttgir = k.asm["ttgir"]
            print(
                f"hd{d:<4d}{kern:5s} {origin:5s} {c.block_m}x{c.block_n} w{c.num_warps} s{c.num_stages}: "
                f"{regs} regs, {spill} B spill, {k.metadata.shared // 1024} KB smem, "
                f"pipelined={'async_copy_global_to_local' in ttgir or 'async_tma' in ttgir}, "
                f"wgmma={'wgmma' in k.asm['ptx']}"
            )


if __name__ == "__main__":
    main()
