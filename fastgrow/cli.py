"""`fastgrow` command line: prepare | train | demo (and the growth / interchange commands).

Configuration: `--preset NAME` and/or `--config FILE.toml`, then `--section.key=value` overrides, e.g.

    fastgrow train --preset tiny --data.data_dir=data/stdlib --train.max_steps=500 --train.lr=1e-3

Errors in user input print one line (`fastgrow: error: ...`) and exit with status 2; set
FASTGROW_DEBUG=1 for the full traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from fastgrow import __version__
from fastgrow.config import RunConfig, apply_overrides, load_toml, parse_count, preset, preset_names


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help=f"start from a named preset: {', '.join(preset_names())}")
    p.add_argument("--config", help="TOML file (sections [model] [data] [train] [growth]; optional preset = ...)")


def build_config(args: argparse.Namespace, overrides: Sequence[str], default_preset: str = "tiny") -> RunConfig:
    cfg = preset(args.preset or default_preset)
    if args.config:
        cfg = load_toml(args.config, base=cfg if args.preset else None)
    return apply_overrides(cfg, list(overrides))


def _split_overrides(rest: list[str], parser: argparse.ArgumentParser) -> list[str]:
    bad = [a for a in rest if not (a.startswith("--") and "=" in a and "." in a.split("=", 1)[0])]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides look like --train.lr=1e-3)")
    return rest


# --- prepare ---------------------------------------------------------------------------------------------


def cmd_prepare(args: argparse.Namespace, rest: list[str]) -> int:
    from fastgrow.data import describe, prepare

    sources = args.sources or ["stdlib"]
    meta = prepare(
        sources if len(sources) > 1 else sources[0],
        args.out,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        text_field=args.text_field,
        max_bytes=parse_count(args.max_bytes) if args.max_bytes else None,
        overwrite=args.overwrite,
        progress=not args.quiet,
    )
    print(describe(meta, args.out))
    return 0


# --- train -----------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace, rest: list[str]) -> int:
    from fastgrow.distributed import env_rank
    from fastgrow.train import train

    cfg = build_config(args, rest)
    if args.print_config:
        if env_rank() == 0:
            print(json.dumps(cfg.to_dict(), indent=2))
        return 0
    result = train(cfg, resume=args.resume, until_step=args.steps)
    if env_rank() == 0:  # under torchrun only rank 0 talks
        print(json.dumps(result.summary(), indent=2))
    return 143 if result.interrupted else 0


# --- demo ------------------------------------------------------------------------------------------------


def cmd_demo(args: argparse.Namespace, rest: list[str]) -> int:
    from fastgrow.demo import run_demo

    run_demo(
        out_dir=args.out,
        data_dir=args.data,
        steps=args.steps,
        grow=not args.no_growth,
        overrides=rest,
    )
    return 0


# --- Hugging Face interchange ---------------------------------------------------------------------------


def cmd_export(args: argparse.Namespace, rest: list[str]) -> int:
    from fastgrow.hf import export_checkpoint

    out = export_checkpoint(
        args.ckpt, args.out_dir, special_token=args.eos_token, torch_dtype=args.dtype, overwrite=args.overwrite
    )
    print(f"wrote a LlamaForCausalLM folder to {out}")
    return 0


def cmd_import(args: argparse.Namespace, rest: list[str]) -> int:
    from dataclasses import replace

    from fastgrow.hf import import_checkpoint

    # The run config the imported model will train with ([model] is replaced by the HF architecture);
    # `fastgrow train --resume` with the same --preset/--config/overrides then accepts the checkpoint.
    cfg = build_config(args, rest)
    cfg = replace(cfg, train=replace(cfg.train, out_dir=args.out_ckpt))
    ckpt = import_checkpoint(args.hf_dir, args.out_ckpt, run_config=cfg)
    print(f"wrote {ckpt}")
    return 0


# --- benchmarks ------------------------------------------------------------------------------------------


def cmd_bench(args: argparse.Namespace, rest: list[str]) -> int:
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    if not (root / "bench").is_dir():
        raise FileNotFoundError(f"no bench/ folder next to the package ({root}): benchmarks run from a source checkout")
    cmd = [sys.executable, "-m", "pytest", "bench", "-q", "--benchmark-only"]
    if args.k:
        cmd += ["-k", args.k]
    env = dict(os.environ)
    if args.out:
        env["FASTGROW_BENCH_OUT"] = str(Path(args.out).resolve())
        cmd += [f"--benchmark-json={Path(args.out).resolve() / 'bench.json'}"]
    return subprocess.call(cmd, cwd=root, env=env)


# --- parser ----------------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fastgrow",
        description="Pre-train LLaMA-style models on one node, and grow them in place while they train.",
    )
    parser.add_argument("--version", action="version", version=f"fastgrow {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("prepare", help="tokenize a corpus into token shards (default source: stdlib)")
    p.add_argument(
        "sources",
        nargs="*",
        help="'stdlib' (this Python's standard library .py files), local files/folders (.txt .md .py .jsonl "
        ".json .parquet), or hf:NAME[:CONFIG][@SPLIT] for a Hugging Face Hub dataset",
    )
    p.add_argument("--out", default="data/stdlib", help="output directory (default: data/stdlib)")
    p.add_argument("--tokenizer", help="use this tokenizer.json instead of training a byte-level BPE")
    p.add_argument("--vocab-size", type=int, default=4096, help="BPE vocabulary size to train (default 4096)")
    p.add_argument("--text-field", default="text", help="field holding the text in jsonl/parquet (default text)")
    p.add_argument("--max-bytes", help="take at most this much text, e.g. 20M (default: all)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser("train", help="train (or --resume) a model; growth per the [growth] section")
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest complete checkpoint")
    p.add_argument("--steps", type=int, help="stop after this many total steps (schedule still uses max_steps)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("demo", help="prepare the stdlib corpus, train tiny, grow it, report throughput")
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--data", default="data/demo-stdlib", help="token shards to use/create (default data/demo-stdlib)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: about two minutes on a CPU)")
    p.add_argument("--no-growth", action="store_true", help="train the target from scratch, no growth")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face LlamaForCausalLM folder")
    p.add_argument("ckpt", help="a checkpoint (step-N directory) or a run directory (its newest checkpoint)")
    p.add_argument("out_dir", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast the weights (default: as saved)")
    p.add_argument("--eos-token", help="the tokenizer's EOS token (default <|endoftext|> or its only special token)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("import", help="turn a local LlamaForCausalLM folder into a fastgrow checkpoint (step 0)")
    p.add_argument("hf_dir", help="Hugging Face model folder (config.json + safetensors or pytorch_model.bin)")
    p.add_argument("out_ckpt", help="run directory to create the checkpoint in (becomes train.out_dir)")
    _add_config_args(p)
    p.set_defaults(func=cmd_import)

    p = sub.add_parser("bench", help="run the benchmarks (pytest bench --benchmark-only) from a source checkout")
    p.add_argument("-k", help="only benchmarks matching this pytest -k expression (e.g. rmsnorm, attention, e2e)")
    p.add_argument("--out", help="also write JSON results (pytest-benchmark + per-benchmark JSONL) to this folder")
    p.set_defaults(func=cmd_bench)

    from fastgrow.grow_cli import add_growth_commands

    add_growth_commands(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    """Exceptions that mean bad input or a failed run, reported as one line rather than a traceback."""
    from fastgrow.checkpoint import CheckpointError
    from fastgrow.distributed import RankFailed
    from fastgrow.train import TrainingAborted

    return (ValueError, OSError, CheckpointError, TrainingAborted, RankFailed)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    rest = _split_overrides(rest, parser)
    if rest and args.command not in ("train", "demo", "import"):
        parser.error(f"config overrides are only accepted by train and demo, got {' '.join(rest)}")
    try:
        return int(args.func(args, rest) or 0)
    except KeyboardInterrupt:
        print("fastgrow: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line for the user's mistakes; tracebacks for our bugs
        if os.environ.get("FASTGROW_DEBUG") or not isinstance(e, _user_errors()):
            raise
        from fastgrow.distributed import RankFailed, env_rank, env_world_size

        if isinstance(e, RankFailed) and env_rank() != 0:
            return 1  # under torchrun rank 0 reports another rank's failure; the rest stay quiet
        where = f"rank {env_rank()}: " if env_world_size() > 1 and not isinstance(e, RankFailed) else ""
        print(f"fastgrow: error: {where}{e}", file=sys.stderr)
        return 2 if isinstance(e, (ValueError, OSError)) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
