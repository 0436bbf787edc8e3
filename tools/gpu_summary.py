"""Summarise a tools/gpu_check.sh run: every number against its goal, pass/fail per goal.

    python tools/gpu_summary.py RESULTS_DIR [--out summary.md]

RESULTS_DIR holds the check's raw files: env.json, tiers.jsonl (one line per tier: rc, seconds, budget),
tests.xml (junit of the gpu-marked tests) and the benchmarks' JSON lines (ceilings, rmsnorm, swiglu,
attention, e2e, growth, tuning). A goal whose numbers are missing (its tier was cut by the time budget or
failed) is PENDING, never guessed. Goals (the project's targets):

- RMSNorm / fused residual RMSNorm / SwiGLU forward >= 95% and forward+backward >= 80% of the measured
  copy bandwidth (GB/s counted as in bench/README.md), at every benchmarked shape;
- our attention >= SDPA's default dispatch (TFLOP/s), per model shape and pass;
- 410M end-to-end MFU >= 55%, and tokens/s >= 1.3x the plain-PyTorch + torch.compile baseline (the
  faster of fastgrow eager / compiled);
- grow() <= 1.2x the copy floor and <= 1.3x allocate + `_foreach_copy_` of the same bytes, its peak memory
  over its input <= 1.1x the bytes it copies (the old state is taken over, not doubled), its host
  overhead < 3 ms for 24 layers; tokens/s after growth >= 0.99x the same model trained from scratch.
"""

from __future__ import annotations

import argparse
import json
import sys
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

PASS, FAIL, PENDING = "PASS", "FAIL", "PENDING"


@dataclass
class Verdict:
    goal: str
    measured: str
    target: str
    status: str


def read_jsonl(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text().splitlines():
        line = line.strip()
        if line:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                continue  # a line cut off by a killed tier: the others still count
    return rows


def _status(ok: bool) -> str:
    return PASS if ok else FAIL


def _pending(goal: str, target: str, why: str) -> Verdict:
    return Verdict(goal, f"no data ({why})", target, PENDING)


def bandwidth_goals(rows: dict[str, list[dict]]) -> list[Verdict]:
    copy = [r for r in rows.get("ceilings", []) if r.get("op") == "copy" and r.get("gbps")]
    out = []
    for op, src in (("rms_norm", "rmsnorm"), ("add_rms_norm", "rmsnorm"), ("swiglu", "swiglu")):
        for mode, frac in (("fwd", 0.95), ("fwdbwd", 0.80)):
            goal = f"{op} {'fwd' if mode == 'fwd' else 'fwd+bwd'} vs copy bandwidth"
            target = f">= {frac:.0%} of copy"
            ours = [r for r in rows.get(src, []) if r.get("op") == op and r.get("mode") == mode]
            ours = [r for r in ours if r.get("impl") == "fastgrow" and r.get("gbps")]
            if not copy:
                out.append(_pending(goal, target, "copy bandwidth not measured"))
                continue
            if not ours:
                out.append(_pending(goal, target, "benchmark not run"))
                continue
            ref = max(r["gbps"] for r in copy)
            worst = min(ours, key=lambda r: r["gbps"])
            shapes = ", ".join(f"{'x'.join(map(str, r['shape']))}: {r['gbps'] / ref:.0%}" for r in ours)
            out.append(Verdict(goal, f"worst {worst['gbps'] / ref:.0%} ({shapes}; copy {ref:.0f} GB/s)", target,
                               _status(worst["gbps"] / ref >= frac)))  # fmt: skip
    return out


def attention_goals(rows: dict[str, list[dict]]) -> list[Verdict]:
    att = [r for r in rows.get("attention", []) if r.get("tflops") and "model" in r]
    cases = sorted({(r["model"], r["pass"]) for r in att})
    out = []
    for model, which in cases:
        by = {r["backend"]: r["tflops"] for r in att if r["model"] == model and r["pass"] == which}
        goal = f"attention {model} {which} vs SDPA default"
        if "triton" not in by or "sdpa" not in by:
            out.append(_pending(goal, ">= 1.00x SDPA", "one backend missing"))
            continue
        ratio = by["triton"] / by["sdpa"]
        measured = f"{ratio:.2f}x ({by['triton']:.0f} vs {by['sdpa']:.0f} TFLOP/s)"
        out.append(Verdict(goal, measured, ">= 1.00x SDPA", _status(ratio >= 1.0)))
    if not cases:
        out.append(_pending("attention vs SDPA default", ">= 1.00x SDPA", "benchmark not run"))
    return out


def e2e_goals(rows: dict[str, list[dict]]) -> list[Verdict]:
    e2e = [r for r in rows.get("e2e", []) if r.get("tokens_per_s")]
    ours = [r for r in e2e if r.get("model") == "fastgrow"]
    best = max(ours, key=lambda r: r["tokens_per_s"]) if ours else None
    base = [r for r in e2e if r.get("model") == "plain" and r.get("compiled")]
    out = []
    if best is None or best.get("mfu") is None:
        out.append(_pending("410M train step MFU", ">= 55%", "fastgrow e2e not run (or no known peak)"))
    else:
        kind = "compiled" if best.get("compiled") else "eager"
        out.append(Verdict("410M train step MFU", f"{best['mfu']:.1%} (fastgrow {kind}, {best['tokens_per_s']:,.0f} "
                           "tokens/s)", ">= 55%", _status(best["mfu"] >= 0.55)))  # fmt: skip
    if best is None or not base:
        out.append(_pending("410M tokens/s vs plain PyTorch + compile", ">= 1.30x", "a variant is missing"))
    else:
        ratio = best["tokens_per_s"] / base[-1]["tokens_per_s"]
        out.append(Verdict("410M tokens/s vs plain PyTorch + compile", f"{ratio:.2f}x", ">= 1.30x",
                           _status(ratio >= 1.3)))  # fmt: skip
    return out


def growth_goals(rows: dict[str, list[dict]]) -> list[Verdict]:
    g = rows.get("growth", [])
    t = [r for r in g if r.get("kind") == "grow_time" and r.get("grow_vs_floor")]
    host = [r for r in g if r.get("kind") == "grow_host" and r.get("host_ms") is not None]
    th = [r for r in g if r.get("kind") == "throughput" and r.get("ratio_grown_vs_scratch")]
    out = []
    if t:
        r = t[-1]
        out.append(Verdict("grow() time vs copy floor", f"{r['grow_vs_floor']:.2f}x ({r['grow_s']:.3f} s)",
                           "<= 1.20x", _status(r["grow_vs_floor"] <= 1.2)))  # fmt: skip
        if r.get("grow_vs_alloc_copy"):
            ratio = r["grow_vs_alloc_copy"]
            out.append(Verdict("grow() time vs allocate + _foreach_copy_", f"{ratio:.2f}x ({r['alloc_copy_s']:.3f} s)",
                               "<= 1.30x", _status(ratio <= 1.3)))  # fmt: skip
        if r.get("peak_extra_bytes") is not None and r.get("bytes_copied"):
            ratio = r["peak_extra_bytes"] / r["bytes_copied"]
            out.append(Verdict("grow() peak memory over its input vs the bytes it copies",
                               f"{ratio:.2f}x ({r['peak_extra_bytes'] / 1e9:.2f} GB; copying all: "
                               f"{r.get('peak_extra_copy_all_bytes', 0) / 1e9:.2f} GB)", "<= 1.10x",
                               _status(ratio <= 1.1)))  # fmt: skip
    else:
        out.append(_pending("grow() time vs copy floor", "<= 1.20x", "benchmark not run"))
    if host:
        r = host[-1]
        out.append(Verdict("grow() host overhead, 6 -> 24 layers", f"{r['host_ms']:.2f} ms", "< 3 ms",
                           _status(r["host_ms"] < 3.0)))  # fmt: skip
    else:
        out.append(_pending("grow() host overhead, 6 -> 24 layers", "< 3 ms", "benchmark not run"))
    if th:
        r = th[-1]
        out.append(Verdict("tokens/s after growth vs from scratch", f"{r['ratio_grown_vs_scratch']:.3f}x",
                           ">= 0.99x", _status(r["ratio_grown_vs_scratch"] >= 0.99)))  # fmt: skip
    else:
        out.append(_pending("tokens/s after growth vs from scratch", ">= 0.99x", "benchmark not run"))
    return out


KINDS = ("ceilings", "rmsnorm", "swiglu", "attention", "e2e", "growth", "tuning")


def evaluate(results: Path) -> list[Verdict]:
    rows = {k: read_jsonl(results / f"{k}.jsonl") for k in KINDS}
    return bandwidth_goals(rows) + attention_goals(rows) + e2e_goals(rows) + growth_goals(rows)


def _tests_line(results: Path) -> str:
    xml = results / "tests.xml"
    if not xml.is_file():
        return "gpu-marked tests: no junit report (tier not run or cut)"
    try:
        root = ET.parse(xml).getroot()
    except ET.ParseError:
        return "gpu-marked tests: junit report unreadable (tier cut while writing it?)"
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    a = suite.attrib if suite is not None else {}
    n, fail, err, skip = (int(a.get(k, 0)) for k in ("tests", "failures", "errors", "skipped"))
    return f"gpu-marked tests: {n - fail - err - skip} passed, {fail} failed, {err} errors, {skip} skipped"


def render(results: Path) -> str:
    env = json.loads((results / "env.json").read_text()) if (results / "env.json").is_file() else {}
    dry = bool(env.get("dry_run"))
    verdicts = evaluate(results)
    lines = ["# GPU check summary", ""]
    if dry:
        lines += [
            "**DRY RUN on a CPU** (Triton interpreter, tiny sizes): this exercises the script only. The numbers "
            "below mean nothing and no verdict is a measurement.",
            "",
        ]
    keys = ("device", "driver", "torch", "triton", "cuda", "python", "commit", "date")
    lines += ["- " + ", ".join(f"{k}: {env.get(k)}" for k in keys if k in env), ""]
    lines += ["| tier | rc | seconds | budget | note |", "|---|---|---|---|---|"]
    for t in read_jsonl(results / "tiers.jsonl"):
        lines.append(f"| {t['tier']} | {t['rc']} | {t['seconds']} | {t['budget']} | {t.get('note', '')} |")
    lines += ["", _tests_line(results), ""]
    lines += ["| goal | measured | target | status |", "|---|---|---|---|"]
    for v in verdicts:
        status = f"{v.status} (dry run)" if dry and v.status != PENDING else v.status
        lines.append(f"| {v.goal} | {v.measured} | {v.target} | {status} |")
    counts = {s: sum(v.status == s for v in verdicts) for s in (PASS, FAIL, PENDING)}
    lines += ["", f"goals: {counts[PASS]} pass, {counts[FAIL]} fail, {counts[PENDING]} pending"]
    e2e = read_jsonl(results / "e2e.jsonl")
    if e2e:
        lines += ["", "| e2e variant | tokens/s | MFU | peak GB |", "|---|---|---|---|"]
        for r in e2e:
            mfu = f"{r['mfu']:.1%}" if r.get("mfu") is not None else "-"
            peak = f"{r['peak_mem_gb']:.1f}" if r.get("peak_mem_gb") is not None else "-"
            variant = f"{r['model']} {'compiled' if r.get('compiled') else 'eager'}"
            lines.append(f"| {variant} | {r['tokens_per_s']:,.0f} | {mfu} | {peak} |")
    tuning = read_jsonl(results / "tuning.jsonl")
    if tuning:
        lines += ["", f"launch configs tuned on first use: {len(tuning)} keys (tuning.jsonl in the archive)"]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--out", type=Path)
    args = ap.parse_args(argv)
    if not args.results.is_dir():
        print(f"gpu_summary: error: {args.results} is not a directory", file=sys.stderr)
        return 2
    text = render(args.results)
    if args.out:
        args.out.write_text(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
