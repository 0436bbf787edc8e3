"""`fastgrow demo`: prepare the stdlib corpus, train the tiny base, stack it x4 mid-run, keep training,
then print a before/after table and write a loss-vs-tokens PNG with the growth marked."""

from __future__ import annotations

import shutil
import time
from pathlib import Path
from typing import Any

from fastgrow.config import RunConfig, preset
from fastgrow.config_files import apply_overrides

MARKER = ".fastgrow-demo"
# About 4 MB of standard-library source: enough text for a 4096-token BPE and a few hundred steps
# without repeating, small enough that `prepare` takes ~20 s on a 2-core CPU.
DEMO_BYTES = 4_000_000
DEMO_VOCAB = 4096
# Documents of at most ~8,000 characters (split at blank lines): the stdlib's 4 MB then holds 639
# documents instead of ~220 whole modules, so the 2% validation draw takes 14 of them, holding 2.2% of
# the tokens. With whole modules it drew 4 documents holding 4.7%, and prepare fell back to the tail
# split with a warning (measured with Python 3.11's stdlib).
DEMO_DOC_CHARS = 8000


def demo_config(out_dir: str, data_dir: str, steps: int, grow: bool) -> RunConfig:
    name = "tiny-base" if grow else "tiny"
    cfg = preset(name)
    d = cfg.to_dict()
    d["data"].update(data_dir=data_dir)
    d["train"].update(
        out_dir=out_dir,
        max_steps=steps,
        warmup_steps=max(1, steps // 20),
        log_every=max(1, steps // 60),
        eval_every=max(1, steps // 6),
        eval_batches=4,
        ckpt_every=0,
    )
    if grow:
        tokens_per_step = d["data"]["batch_size"] * d["data"]["seq_len"]
        # Grow after 30% of the steps (the base has learned the easy statistics by then), after at least
        # one step and before the last.
        at_step = min(max(1, int(0.3 * steps)), steps - 1)
        d["growth"] = [{"at_tokens": at_step * tokens_per_step, "op": "stack", "factor": 4}]
    return RunConfig.from_dict(d)


def _ensure_data(data_dir: str) -> None:
    if (Path(data_dir) / "meta.json").is_file():
        print(f"[demo] using the token shards in {data_dir}")
        return
    from fastgrow.data import prepare

    print(f"[demo] preparing {DEMO_BYTES / 1e6:.0f} MB of this Python's standard library into {data_dir}")
    prepare("stdlib", data_dir, vocab_size=DEMO_VOCAB, max_bytes=DEMO_BYTES, doc_chars=DEMO_DOC_CHARS)


def _check_run_dir(out_dir: str) -> None:
    """Refuse a run directory the demo did not create (before anything is prepared or deleted)."""
    out = Path(out_dir)
    if out.exists() and not (out / MARKER).is_file():
        raise FileExistsError(f"{out} exists and is not a fastgrow demo directory; choose another --out")


def _fresh_run_dir(out_dir: str) -> None:
    """Replace the demo's run directory (the caller has run _check_run_dir on it)."""
    out = Path(out_dir)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / MARKER).write_text("created by `fastgrow demo`; the next demo run replaces this directory\n")


def phase_table(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per-phase rows (before/after growth, or one row): layers, params, tokens, last loss, tokens/s."""
    train = [r for r in records if r["kind"] == "train"]
    grows = [r for r in records if r["kind"] == "growth"]
    cut = grows[0]["tokens"] if grows else None
    phases = [("before growth", lambda r: r["tokens"] <= cut), ("after growth", lambda r: r["tokens"] > cut)]
    if cut is None:
        phases = [("training", lambda r: True)]
    rows = []
    for name, sel in phases:
        rs = [r for r in train if sel(r)]
        if not rs:
            continue
        # The first window of each phase includes warm-up (and, after growth, the grow() call): skip it.
        timed = rs[1:] or rs
        tps = sum(r["tokens_per_s"] for r in timed) / len(timed)
        mfus = [r["mfu"] for r in timed if r.get("mfu") is not None]
        rows.append(
            {
                "phase": name,
                "layers": rs[-1]["layers"],
                "tokens": rs[-1]["tokens"],
                "loss": rs[-1]["loss"],
                "tokens_per_s": tps,
                "mfu": sum(mfus) / len(mfus) if mfus else None,
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]]) -> str:
    head = f"{'phase':<15} {'layers':>6} {'tokens seen':>11} {'loss':>7} {'tokens/s':>10} {'MFU':>6}"
    lines = [head, "-" * len(head)]
    for r in rows:
        m = f"{r['mfu']:.1%}" if r["mfu"] is not None else "n/a"
        lines.append(
            f"{r['phase']:<15} {r['layers']:>6} {r['tokens']:>11,} {r['loss']:>7.3f} {r['tokens_per_s']:>10,.0f} {m:>6}"
        )
    return "\n".join(lines)


def run_demo(
    out_dir: str = "runs/demo",
    data_dir: str = "data/demo-stdlib",
    steps: int | None = None,
    grow: bool = True,
    overrides: list[str] | tuple[str, ...] = (),
) -> dict[str, Any]:
    import torch

    from fastgrow.metrics import read_metrics
    from fastgrow.plots import plot_loss
    from fastgrow.train import train

    t0 = time.perf_counter()
    cuda = torch.cuda.is_available()
    if steps is None:
        steps = 2000 if cuda else 400
    if steps < (2 if grow else 1):
        why = " (one step before the growth and one after)" if grow else ""
        raise ValueError(f"--steps must be at least {2 if grow else 1}{why}, got {steps}")
    cfg = apply_overrides(demo_config(out_dir, data_dir, steps, grow), list(overrides))
    _check_run_dir(cfg.train.out_dir)
    _ensure_data(data_dir)
    _fresh_run_dir(cfg.train.out_dir)
    result = train(cfg)
    records = read_metrics(Path(cfg.train.out_dir) / "metrics.jsonl")
    rows = phase_table(records)
    title = "fastgrow demo: tiny-base (2 layers) stacked x4 to 8 layers" if grow else "fastgrow demo: tiny from scratch"
    png = plot_loss(records, Path(cfg.train.out_dir) / "loss.png", title=title)
    summary = result.summary()
    print()
    print(format_table(rows))
    if summary["final_val_loss"] is not None:
        print(f"\nfinal validation loss {summary['final_val_loss']:.3f} after {summary['tokens']:,} tokens")
    print(f"loss curve: {png}\nmetrics:    {Path(cfg.train.out_dir) / 'metrics.jsonl'}")
    print(f"checkpoint: {result.checkpoint}\ndemo took {time.perf_counter() - t0:.0f} s")
    return {"rows": rows, "summary": summary, "png": str(png)}
