"""Compile the RMSNorm / SwiGLU kernels for an H100 (sm_90) on a machine without a GPU.

The interpreter runs the kernels' Python, not the compiler: type or constexpr mistakes that only the
real code generator rejects, and performance properties of the generated code, are invisible to it.
Triton's bundled ptxas/cuobjdump compile and inspect a cubin with no GPU present, so this checks, at
the launch configs the launchers actually use and with the specialisations a real launch gets (16-byte
aligned pointers, unit column stride, widths divisible by 16):
  - every kernel variant compiles;
  - global loads are 16-byte vectorised (ld.global.v4, or 16-byte cp.async in a pipelined loop);
  - no register spills (local-memory stack) at the widths the model uses (<= 8192; the backward at
    16384 spills a little and 32K-64K rows spill by design of the whole-row-in-registers scheme), also
    for the tuner's other candidates at 8192;
  - the backward's row loop prefetches the next tile (async copies into shared memory).
The compiles run in one child process without TRITON_INTERPRET (this test session sets it, and an
interpreting process patches parts of triton.language that the real compiler then trips over).
Skipped when this Triton lacks the internals used here (they are not a public API).
"""

import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

import pytest

RMS_WIDTHS = (1024, 4096, 8192)
FFN_WIDTHS = (2816, 11008)


V4_LOAD = r"ld\.global[\w.]*\.v4|cp\.async\.cg\.shared\.global[^;]*, 0x10,"


def compile_sm90(kernel, types: dict, consts: dict, num_warps: int, aligned: tuple) -> dict:
    """Compile `kernel` for sm_90: vectorised global loads, stack bytes and registers per thread."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    names = kernel.arg_names
    signature = {n: ("constexpr" if n in consts else types[n]) for n in names}
    consts = {k: v for k, v in consts.items() if k in names}
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in aligned if n in names}
    src = ASTSource(fn=kernel, signature=signature, constexprs=consts, attrs=attrs)
    compiled = triton.compile(src, target=GPUTarget("cuda", 90, 32), options={"num_warps": num_warps})
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile("wb", suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        usage = subprocess.run([cuobjdump, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    return {
        # 16-byte loads: direct (ld.global.v4) or, in a pipelined loop, async copies into shared memory
        "v4_loads": len(
            re.findall(r"ld\.global[\w.]*\.v4|cp\.async\.cg\.shared\.global[^;]*, 0x10,", compiled.asm["ptx"])
        ),
        "stack": int(re.search(r"STACK:(\d+)", usage).group(1)),
        "regs": int(re.search(r"REG:(\d+)", usage).group(1)),
        "async": "async_copy_global_to_local" in compiled.asm["ttgir"],
    }


def compile_candidates(R, n: int) -> dict:
    """The non-fallback tuning candidates at width n: forward with the residual, backward in its heaviest
    (autocast: fp32 stream, gradient stored twice) variant."""
    block_n = R._launch_config(n)[0]
    out = {}
    for cand in R.fwd_candidates(n)[1:]:
        types = {k: "*bf16" for k in ("X", "R", "H", "Y", "W")}
        types.update(RSTD="*fp32", stride_xm="i32", stride_rm="i32", M="i32", N="i32", eps="fp32")
        consts = dict(stride_xn=1, stride_rn=1, HAS_RES=True, HAS_W=True, ROWS=cand.rows, BLOCK_N=block_n)
        aligned = ("X", "R", "H", "Y", "W", "RSTD", "stride_xm", "stride_rm", "N")
        out[f"cand_fwd-{n}-{cand!r}"] = compile_sm90(R._rms_norm_fwd_kernel, types, consts, cand.num_warps, aligned)
    for cand in R.bwd_candidates(n)[1:]:
        types = {k: "*fp32" for k in ("DY", "X", "DH", "W", "DR")}
        types.update(DX="*bf16", RSTD="*fp32", DW_PART="*fp32", M="i32", N="i32", tiles_per_prog="i32")
        types.update(stride_dym="i32", stride_xm="i32", stride_dhm="i32")
        consts = dict(stride_dyn=1, stride_xn=1, stride_dhn=1, HAS_W=True, HAS_DH=True, HAS_DR=True)
        consts.update(COMPUTE_DW=True, RELOAD_W=block_n >= 8192, ROWS=cand.rows, BLOCK_N=block_n, NUM_STAGES=2)
        aligned = ("DY", "X", "DH", "W", "RSTD", "DX", "DR", "DW_PART", "stride_dym", "stride_xm", "stride_dhm", "N")
        out[f"cand_bwd-{n}-{cand!r}"] = compile_sm90(R._rms_norm_bwd_kernel, types, consts, cand.num_warps, aligned)
    return out


def compile_all() -> dict:
    """Child-process entry: compile every variant the tests look at."""
    R = importlib.import_module("fastgrow.kernels.rmsnorm")
    S = importlib.import_module("fastgrow.kernels.swiglu")
    out = {}
    for n in RMS_WIDTHS:
        block_n, rows, fwd_warps, bwd_warps = R._launch_config(n)
        if n >= 4096:  # the tuner's other candidates, at the widest model widths (where spills start)
            out.update(compile_candidates(R, n))
        for residual in (False, True):
            types = {k: "*bf16" for k in ("X", "R", "H", "Y", "W")}
            types.update(RSTD="*fp32", stride_xm="i32", stride_rm="i32", M="i32", N="i32", eps="fp32")
            consts = dict(stride_xn=1, stride_rn=1, HAS_RES=residual, HAS_W=True, ROWS=rows, BLOCK_N=block_n)
            aligned = ("X", "R", "H", "Y", "W", "RSTD", "stride_xm", "stride_rm", "N")
            out[f"rms_fwd-{n}-{residual}"] = compile_sm90(R._rms_norm_fwd_kernel, types, consts, fwd_warps, aligned)
        # bf16 throughout without / with the fused residual; "autocast": fp32 h (bf16 block output +
        # fp32 residual stream) whose gradient is stored twice, bf16 for x and fp32 for the residual.
        for variant in ("plain", "residual", "autocast"):
            act = "*fp32" if variant == "autocast" else "*bf16"
            types = {k: act for k in ("DY", "X", "DH", "W", "DR")}
            types.update(DX="*bf16", RSTD="*fp32", DW_PART="*fp32", M="i32", N="i32", tiles_per_prog="i32")
            types.update(stride_dym="i32", stride_xm="i32", stride_dhm="i32")
            consts = dict(stride_dyn=1, stride_xn=1, stride_dhn=1, HAS_W=True, HAS_DH=variant != "plain")
            consts.update(HAS_DR=variant == "autocast", COMPUTE_DW=True, RELOAD_W=block_n >= 8192)
            consts.update(ROWS=rows, BLOCK_N=block_n, NUM_STAGES=2)
            aligned = ("DY", "X", "DH", "W", "RSTD", "DX", "DR", "DW_PART", "stride_dym", "stride_xm")
            aligned += ("stride_dhm", "N")
            out[f"rms_bwd-{n}-{variant}"] = compile_sm90(R._rms_norm_bwd_kernel, types, consts, bwd_warps, aligned)
    types = {"PART": "*fp32", "DW": "*bf16", "P": "i32", "N": "i32"}
    out["dw_sum"] = compile_sm90(R._dw_sum_kernel, types, dict(BLOCK_P=32, BLOCK_C=64), 4, ("PART", "DW", "N"))
    for f in FFN_WIDTHS:
        block_m, block_f = S._launch_config(f)
        types = {k: "*bf16" for k in ("G", "U", "O", "DO", "DG", "DU")}
        types.update({k: "i32" for k in ("stride_gm", "stride_um", "stride_dom", "stride_dm", "M", "F")})
        consts = dict(stride_gn=1, stride_un=1, stride_don=1, BLOCK_M=block_m, BLOCK_F=block_f)
        aligned = ("G", "U", "O", "DO", "DG", "DU", "stride_gm", "stride_um", "stride_dom", "stride_dm", "F")
        out[f"swiglu_fwd-{f}"] = compile_sm90(S._swiglu_fwd_kernel, types, consts, S._NUM_WARPS, aligned)
        out[f"swiglu_bwd-{f}"] = compile_sm90(S._swiglu_bwd_kernel, types, consts, S._NUM_WARPS, aligned)
    return out


@pytest.fixture(scope="module")
def sm90():
    try:
        import triton
        from triton.backends.compiler import GPUTarget  # noqa: F401
        from triton.compiler import ASTSource  # noqa: F401
    except ImportError:  # pragma: no cover - depends on the Triton version
        pytest.skip("this Triton has no ASTSource/GPUTarget")
    if not os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")):
        pytest.skip("Triton's bundled NVIDIA tools are missing")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, __file__], env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("n", RMS_WIDTHS)
@pytest.mark.parametrize("residual", [False, True])
def test_rms_norm_fwd_compiles_vectorised_without_spills(sm90, n, residual):
    r = sm90[f"rms_fwd-{n}-{residual}"]
    assert r["v4_loads"] >= (2 if residual else 1), r
    assert r["stack"] == 0, f"forward spills at width {n}: {r}"


@pytest.mark.parametrize("n", RMS_WIDTHS)
@pytest.mark.parametrize("variant", ["plain", "residual", "autocast"])
def test_rms_norm_bwd_compiles_vectorised_without_spills(sm90, n, variant):
    r = sm90[f"rms_bwd-{n}-{variant}"]
    assert r["v4_loads"] >= (2 if variant == "plain" else 3), r
    assert r["stack"] == 0, f"backward spills at width {n}: {r}"
    assert r["async"], f"backward row loop not pipelined (no async prefetch) at width {n}: {r}"


def test_tuning_candidates_compile_without_spills(sm90):
    cands = {k: v for k, v in sm90.items() if k.startswith("cand_")}
    assert len(cands) >= 3, sorted(sm90)
    for name, r in cands.items():
        assert r["stack"] == 0, f"{name} spills: {r}"


def test_dw_reduction_compiles_vectorised_without_spills(sm90):
    assert sm90["dw_sum"]["v4_loads"] >= 1 and sm90["dw_sum"]["stack"] == 0, sm90["dw_sum"]


@pytest.mark.parametrize("f", FFN_WIDTHS)
def test_swiglu_compiles_vectorised_without_spills(sm90, f):
    for name, streams in (("fwd", 2), ("bwd", 3)):
        r = sm90[f"swiglu_{name}-{f}"]
        assert r["v4_loads"] >= streams, (name, r)
        assert r["stack"] == 0, (name, r)


if __name__ == "__main__":
    print(json.dumps(compile_all()))
