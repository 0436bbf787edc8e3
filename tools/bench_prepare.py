"""Measure `fastgrow prepare` at scale, side by side with a plain tokenizers loop (CPU; writes JSON).

    python tools/bench_prepare.py --work /tmp/prep-bench --out bench/results/prepare-cpu.json

1. Peak RSS: one plain-text file of --text-mb MB (the stdlib's .py files concatenated, blank line between
   files, like a nanoGPT input.txt) prepared from scratch (BPE vocab 4096 trained on it, then encoded),
   measured with wait4's ru_maxrss of the child process.
2. Throughput: a jsonl file of --jsonl-mb MB (records = stdlib files cut into ~2 KB pieces, repeated)
   encoded with one given tokenizer.json by (a) `fastgrow prepare --tokenizer`, (b) a plain loop: read
   lines, json.loads, `Tokenizer.encode_batch` on 512 records, append ids + EOS to a uint16 file, and
   (c) the same loop with `encode_batch_fast`. Each runs --repeats times, in alternating order, in
   fresh processes; MB/s = input file bytes / wall seconds.
The corpora are generated locally from this Python's standard library (no network).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

BASELINE = r"""
import json, sys, time
import numpy as np
from tokenizers import Tokenizer
src, tok_path, out, method = sys.argv[1:5]
tok = Tokenizer.from_file(tok_path)
tok.encode_special_tokens = True
eos = tok.token_to_id("<|endoftext|>")
encode = getattr(tok, method)
with open(src, "rb") as f, open(out, "wb") as o:
    batch = []
    def flush():
        for e in encode(batch, add_special_tokens=False):
            np.asarray(e.ids + [eos], dtype=np.uint16).tofile(o)
        batch.clear()
    for line in f:
        batch.append(json.loads(line)["text"])
        if len(batch) == 512:
            flush()
    if batch:
        flush()
"""


def stdlib_texts() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts)
    out = []
    for p in files:
        try:
            out.append(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return out


def make_text_file(path: Path, mb: float, texts: list[str]) -> None:
    target = int(mb * 1e6)
    rng = random.Random(0)
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            t = rng.choice(texts)
            f.write(t + "\n\n")
            size += len(t.encode()) + 2


def make_jsonl(path: Path, mb: float, texts: list[str]) -> None:
    pieces = [t[i : i + 2000] for t in texts for i in range(0, len(t), 2000)]
    rng = random.Random(1)
    target = int(mb * 1e6)
    size = 0
    with open(path, "w", encoding="utf-8") as f:
        while size < target:
            line = json.dumps({"id": size, "text": rng.choice(pieces)}) + "\n"
            f.write(line)
            size += len(line.encode())


def run(cmd: list[str]) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    err = proc.stderr.read().decode()
    proc.stderr.close()
    if status != 0:
        raise SystemExit(f"failed ({status}): {' '.join(cmd)}\n{err[-2000:]}")
    return {"wall_s": wall, "peak_rss_mb": usage.ru_maxrss / 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", type=Path, required=True, help="scratch folder for corpora and outputs")
    ap.add_argument("--out", type=Path, required=True, help="JSON results file")
    ap.add_argument("--text-mb", type=float, default=30)
    ap.add_argument("--jsonl-mb", type=float, default=400)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--machine", default="2-core CPU dev machine, shared")
    args = ap.parse_args()
    w = args.work
    w.mkdir(parents=True, exist_ok=True)
    texts = stdlib_texts()
    txt, jl = w / "input.txt", w / "corpus.jsonl"
    if not txt.is_file():
        make_text_file(txt, args.text_mb, texts)
    if not jl.is_file():
        make_jsonl(jl, args.jsonl_mb, texts)
    fg = [sys.executable, "-m", "fastgrow.cli", "prepare", "--quiet", "--overwrite"]
    results: dict = {
        "machine": args.machine,
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "tokenizers": __import__("tokenizers").__version__,
        "text_file_mb": txt.stat().st_size / 1e6,
        "jsonl_file_mb": jl.stat().st_size / 1e6,
    }
    r = run([*fg, str(txt), "--out", str(w / "txt-data"), "--vocab-size", "4096"])
    meta = json.loads((w / "txt-data" / "meta.json").read_text())
    results["text_prepare"] = {**r, "documents": meta["num_documents"], "tokens": meta["num_tokens"]}
    print("text", results["text_prepare"], flush=True)
    tok = w / "txt-data" / "tokenizer.json"
    runs: dict[str, list] = {"fastgrow_prepare": [], "encode_batch_loop": [], "encode_batch_fast_loop": []}
    for rep in range(args.repeats):
        order = list(runs) if rep % 2 == 0 else list(reversed(runs))
        for name in order:
            if name == "fastgrow_prepare":
                cmd = [*fg, str(jl), "--tokenizer", str(tok), "--out", str(w / "jl-data")]
            else:
                method = "encode_batch" if name == "encode_batch_loop" else "encode_batch_fast"
                cmd = [sys.executable, "-c", BASELINE, str(jl), str(tok), str(w / "baseline.bin"), method]
            r = run(cmd)
            r["mb_per_s"] = results["jsonl_file_mb"] / r["wall_s"]
            runs[name].append(r)
            print(name, r, flush=True)
    results["jsonl_encode"] = runs
    results["jsonl_tokens"] = json.loads((w / "jl-data" / "meta.json").read_text())["num_tokens"]
    results["baseline_tokens"] = (w / "baseline.bin").stat().st_size // 2
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2) + "\n")
    print(args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
