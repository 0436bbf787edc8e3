"""`fastgrow` command line: prepare | train | demo | generate | eval (and the growth / interchange commands).

Configuration: `--preset NAME` and/or `--config FILE.toml`, then `--section.key=value` overrides, e.g.

    fastgrow train --preset tiny --data.data_dir=data/stdlib --train.max_steps=500 --train.lr=1e-3

Errors in user input print one line (`fastgrow: error: ...`) and exit with status 2; set
FASTGROW_DEBUG=1 for the full traceback.

Nothing at module level imports torch: each command imports what it needs when it runs, so
`fastgrow --help` and `fastgrow plan` answer in a fraction of a second.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import textwrap
from collections.abc import Sequence

from fastgrow import __version__
from fastgrow.config import (
    DataConfig,
    GrowthConfig,
    ModelConfig,
    RunConfig,
    TrainConfig,
    parse_count,
    preset,
    preset_names,
)
from fastgrow.config_files import apply_overrides, load_toml
from fastgrow.errors import cli_message

# The config sections and the dataclass that holds each one's keys (for `train --help`).
CONFIG_SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig, "growth": GrowthConfig}


def _add_config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", help=f"start from a named preset: {', '.join(preset_names())} (default tiny)")
    p.add_argument("--config", help="TOML file (sections [model] [data] [train] [growth]; optional preset = ...)")


def config_epilog() -> str:
    """The `--help` text on settings: how overrides work, then every section's keys with their defaults."""
    intro = (
        "configuration:\n"
        "  Settings start from --preset NAME (default tiny) or a --config FILE.toml (which may name its own\n"
        "  preset = ...), then --section.key=value overrides apply on top, in order. Values are TOML scalars\n"
        "  or plain text: --train.lr=1e-3 --train.compile=true --data.data_dir=data/mine, and counts take\n"
        "  suffixes: --growth.at_tokens=100k. Growth stages: --growth.KEY=V sets the single stage (making one\n"
        "  if there is none), --growth.N.KEY=V stage N (0-based; N = the number of stages adds one).\n"
        "  --print-config prints the resolved settings as a TOML file that --config reads back.\n"
        "  README.md (Configuration) explains the keys.\n\n"
        "sections and keys (built-in defaults; presets change the model sizes, seq_len, batch_size and lr):"
    )
    lines = [intro]
    for section, cls in CONFIG_SECTIONS.items():
        items = " ".join(f"{f.name}={_show(f.default)}" for f in dataclasses.fields(cls))
        lines.append(textwrap.fill(items, width=100, initial_indent=f"  [{section}] ", subsequent_indent=" " * 4))
    return "\n".join(lines)


def _show(v: object) -> str:
    return json.dumps(v) if isinstance(v, (str, bool)) else str(v)


def build_config(args: argparse.Namespace, overrides: Sequence[str], default_preset: str = "tiny") -> RunConfig:
    cfg = preset(args.preset or default_preset)
    if args.config:
        cfg = load_toml(args.config, base=cfg if args.preset else None, preset_name=args.preset)
    return apply_overrides(cfg, list(overrides))


def _split_overrides(rest: list[str], parser: argparse.ArgumentParser) -> list[str]:
    bad = [a for a in rest if not (a.startswith("--") and "=" in a and "." in a.split("=", 1)[0])]
    if bad:
        parser.error(f"unrecognized arguments: {' '.join(bad)} (overrides look like --train.lr=1e-3)")
    return rest


# --- prepare ---------------------------------------------------------------------------------------------


def cmd_prepare(args: argparse.Namespace, rest: list[str]) -> int:
    from fastgrow.data import default_out_dir, describe, prepare

    sources = args.sources or ["stdlib"]
    source = sources if len(sources) > 1 else sources[0]
    out = args.out or default_out_dir(source)
    meta = prepare(
        source,
        out,
        tokenizer=args.tokenizer,
        vocab_size=args.vocab_size,
        text_field=args.text_field,
        max_bytes=parse_count(args.max_bytes) if args.max_bytes else None,
        overwrite=args.overwrite,
        progress=not args.quiet,
        eos_token=args.eos_token,
        skip_missing=args.skip_missing,
        val_fraction=args.val_fraction,
        seed=args.seed,
        doc_chars=args.doc_chars,
    )
    print(describe(meta, out))
    return 0


# --- train -----------------------------------------------------------------------------------------------


def cmd_train(args: argparse.Namespace, rest: list[str]) -> int:
    from fastgrow.launch_env import env_rank

    cfg = build_config(args, rest)
    if args.print_config:
        from fastgrow.config_toml import config_toml

        if env_rank() == 0:  # under torchrun only rank 0 talks
            header = "fastgrow train: the resolved config; run it with `fastgrow train --config THIS_FILE`"
            print(config_toml(cfg, header), end="")
        return 0
    from fastgrow.train import train

    result = train(cfg, resume=args.resume, resume_from=args.resume_from, until_step=args.steps)
    if env_rank() == 0:
        print(json.dumps(result.summary(), indent=2))
    return 128 + (result.stop_signal or 15) if result.interrupted else 0


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


# --- generate / eval ------------------------------------------------------------------------------------


def cmd_generate(args: argparse.Namespace, rest: list[str]) -> int:
    from fastgrow.generate import generate_text

    out = generate_text(
        args.ckpt,
        args.prompt,
        args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k or None,
        seed=args.seed,
        num_samples=args.num_samples,
        device=args.device,
        tokenizer=args.tokenizer,
        stop_at_eos=not args.ignore_eos,
    )
    for i, text in enumerate(out.texts):
        if i:
            print("-" * 40)
        print(text)
    new = sum(out.new_tokens)
    print(
        f"[generate] {out.checkpoint}: {out.prompt_tokens} prompt tokens, {new} new tokens in {out.seconds:.2f} s "
        f"({new / out.seconds if out.seconds > 0 else float('nan'):,.1f} tokens/s)",
        file=sys.stderr,
    )
    return 0


def cmd_eval(args: argparse.Namespace, rest: list[str]) -> int:
    from fastgrow.evaluate import evaluate_checkpoint

    result = evaluate_checkpoint(args.ckpt, data_dir=args.data, batches=args.batches, device=args.device)
    print(json.dumps(result, indent=2))
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
    p.add_argument("--out", help="output directory (default: data/<name of the first source>, e.g. data/stdlib)")
    p.add_argument("--tokenizer", help="use this tokenizer.json instead of training a byte-level BPE")
    p.add_argument("--vocab-size", type=int, help="BPE vocabulary size to train (default 4096; not with --tokenizer)")
    p.add_argument("--eos-token", default="<|endoftext|>", help="end-of-text token (default <|endoftext|>)")
    p.add_argument("--text-field", help="field holding the text in jsonl/json/parquet/hf records (default text)")
    p.add_argument("--skip-missing", action="store_true", help="skip (and count) records without the text field")
    p.add_argument("--max-bytes", help="take at most this much text, e.g. 20M (default: all)")
    p.add_argument("--val-fraction", type=float, default=0.02, help="share of documents held out (default 0.02)")
    p.add_argument("--seed", type=int, default=0, help="seed of the validation draw (default 0)")
    p.add_argument(
        "--doc-chars",
        type=int,
        default=1_000_000,
        help="split text files longer than this into documents at blank lines (default 1000000)",
    )
    p.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_prepare)

    p = sub.add_parser(
        "train",
        help="train (or --resume) a model; growth per the [growth] section",
        description="Train (or --resume) a model; it grows per the [growth] section. Progress goes to stderr "
        "(a bar on a terminal, else one line per log step), metrics to OUT_DIR/metrics.jsonl, and a JSON "
        "summary to stdout at the end.",
        epilog=config_epilog(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    _add_config_args(p)
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint (it must verify)")
    p.add_argument(
        "--resume-from",
        metavar="STEP",
        help="continue from this checkpoint of train.out_dir (step-N or N), e.g. when the newest is damaged; "
        "newer step folders are moved aside, not deleted",
    )
    p.add_argument("--steps", type=int, help="stop after this many total steps (schedule still uses max_steps)")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "demo",
        help="prepare the stdlib corpus, train tiny, grow it, report throughput",
        epilog="--section.key=value overrides apply to the demo's run config (see `fastgrow train --help`).",
    )
    p.add_argument("--out", default="runs/demo", help="run directory (default runs/demo)")
    p.add_argument("--data", default="data/demo-stdlib", help="token shards to use/create (default data/demo-stdlib)")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: about two minutes on a CPU)")
    p.add_argument("--no-growth", action="store_true", help="train the target from scratch, no growth")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser("generate", help="sample text from a checkpoint (KV cache, CPU or GPU)")
    p.add_argument("ckpt", help="a checkpoint (step-N directory) or a run directory (its newest checkpoint)")
    p.add_argument("--prompt", default="", help="text to continue (default: empty, a new document)")
    p.add_argument("--max-new-tokens", type=int, default=200, help="tokens to generate per sample (default 200)")
    p.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default 0.8)")
    p.add_argument(
        "--top-k", type=int, default=200, help="sample among the k most likely tokens; 0 = all (default 200)"
    )
    p.add_argument("--seed", type=int, help="random seed, for the same text again (default: a fresh draw)")
    p.add_argument("--num-samples", type=int, default=1, help="independent samples of the same prompt (default 1)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:N")
    p.add_argument("--tokenizer", help="tokenizer.json to use (default: the checkpoint's, else the run's data's)")
    p.add_argument("--ignore-eos", action="store_true", help="keep going past the end-of-text token")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("eval", help="validation loss and perplexity of a checkpoint (one JSON object)")
    p.add_argument("ckpt", help="a checkpoint (step-N directory) or a run directory (its newest checkpoint)")
    p.add_argument("--data", help="a prepared data folder: evaluate its held-out split (default: the run's data)")
    p.add_argument(
        "--batches", type=int, help="batches of the run's batch_size x seq_len (default: train.eval_batches)"
    )
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda, cuda:N")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("export", help="write a checkpoint as a Hugging Face LlamaForCausalLM folder")
    p.add_argument("ckpt", help="a checkpoint (step-N directory) or a run directory (its newest checkpoint)")
    p.add_argument("out_dir", help="output folder (must not exist unless --overwrite)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], help="cast the weights (default: as saved)")
    p.add_argument("--eos-token", help="the tokenizer's EOS token (default <|endoftext|> or its only special token)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser(
        "import",
        help="turn a local LlamaForCausalLM folder into a fastgrow checkpoint (step 0)",
        epilog="--preset/--config/--section.key=value give the run config the imported model will train with "
        "(see `fastgrow train --help`).",
    )
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
    """Exceptions that mean bad input or a failed run, reported as one line rather than a traceback.

    Only modules already imported are asked: an exception of a module that was never loaded cannot have
    been raised, and importing it here would pull in torch for nothing."""
    errors: list[type[BaseException]] = [ValueError, OSError]
    for module, name in (
        ("fastgrow.checkpoint", "CheckpointError"),
        ("fastgrow.train", "TrainingAborted"),
        ("fastgrow.distributed", "RankFailed"),
    ):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    rest = _split_overrides(rest, parser)
    if rest and args.command not in ("train", "demo", "import"):
        parser.error(
            f"config overrides (--section.key=value) are only accepted by train, demo and import, got {' '.join(rest)}"
        )
    try:
        return int(args.func(args, rest) or 0)
    except KeyboardInterrupt:
        print("fastgrow: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line for the user's mistakes; tracebacks for our bugs
        if os.environ.get("FASTGROW_DEBUG") or not isinstance(e, _user_errors()):
            raise
        from fastgrow.launch_env import env_rank, env_world_size

        rank_failed = getattr(sys.modules.get("fastgrow.distributed"), "RankFailed", ())
        if isinstance(e, rank_failed) and env_rank() != 0:
            return 1  # under torchrun rank 0 reports another rank's failure; the rest stay quiet
        where = f"rank {env_rank()}: " if env_world_size() > 1 and not isinstance(e, rank_failed) else ""
        print(f"fastgrow: error: {where}{cli_message(e)}", file=sys.stderr)
        return 2 if isinstance(e, (ValueError, OSError)) else 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
