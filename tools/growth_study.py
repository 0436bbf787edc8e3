"""Growth efficacy study: the target from scratch vs grown variants at the same training FLOPs.

    python tools/growth_study.py --config tools/study/cpu.toml --out runs/study-cpu
    python tools/growth_study.py --config tools/study/cpu.toml --out runs/study-cpu --list
    python tools/growth_study.py --config tools/study/gpu.toml --out runs/study-gpu --only stack,zero
    python tools/growth_study.py --config tools/study/gpu.toml --prepare-only      # make the data here
    python tools/growth_study.py --config tools/study/cpu.toml --out runs/study-cpu --report-only

Writes one run directory per variant under --out, and next to them runs.jsonl, study.md (the table) and
study.png (validation loss vs FLOPs). Running it again reuses finished runs and resumes an interrupted one
from its newest checkpoint. The method (equal-FLOPs budgets, speedup at equal loss) is documented in
fastgrow/study.py. Exit status: 0 done, 2 bad input, 143 interrupted by SIGTERM (run it again to go on).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _plan_text(study, out: Path) -> str:
    from fastgrow.study import plan_study, planner_tokens

    runs = plan_study(study, out)
    w = max(22, *(len(r.variant.name) for r in runs))
    lines = [
        f"study {study.name}: target {study.target.model.n_layers} layers "
        f"({study.target.model.num_params():,} params), "
        f"base {study.base.n_layers} layers, budget {study.budget_tokens:,} tokens (D), planner d = "
        f"{planner_tokens(study):,} tokens",
        f"{'variant':<{w}} {'op':<12} {'grow at tokens':>16} {'grow step(s)':>12} {'steps':>7} {'FLOPs/budget':>12}",
    ]
    for r in runs:
        steps = ",".join(map(str, r.growth_steps)) or str(r.growth_step)
        lines.append(
            f"{r.variant.name:<{w}} {r.variant.op:<12} {r.growth_tokens:>16,} {steps:>12} {r.max_steps:>7} "
            f"{r.planned_flops / r.budget_flops:>12.4f}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, type=Path, help="study TOML (see tools/study/*.toml)")
    p.add_argument("--out", type=Path, help="study directory (default runs/study-<name>)")
    p.add_argument("--only", help="comma-separated variant names to run (scratch is always included)")
    p.add_argument("--device", help="override train.device (cpu, cuda, cuda:1, ...)")
    p.add_argument("--threads", type=int, help="torch CPU threads (1 is fastest for tiny models on a busy machine)")
    p.add_argument("--quiet", action="store_true", help="no progress bars or per-run lines")
    p.add_argument("--list", action="store_true", help="print every run's plan (growth step, steps, FLOPs) and exit")
    p.add_argument("--prepare-only", action="store_true", help="prepare the study's data (if missing) and exit")
    p.add_argument("--report-only", action="store_true", help="rewrite runs.jsonl/study.md/study.png, train nothing")
    args = p.parse_args(argv)

    from fastgrow.config import ConfigError
    from fastgrow.data import DataError
    from fastgrow.study import ensure_data, load_study, run_study

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    try:
        study = load_study(args.config)
        out = args.out or Path("runs") / f"study-{study.name}"
        only = [s.strip() for s in args.only.split(",") if s.strip()] if args.only else None
        if args.list:
            print(_plan_text(study, out))
            return 0
        if args.prepare_only:
            ensure_data(study, echo=not args.quiet)
            print(f"data ready in {study.target.data.data_dir}")
            return 0
        result = run_study(
            study, out, only=only, device=args.device, echo=not args.quiet, train_runs=not args.report_only
        )
    except (ConfigError, DataError, FileNotFoundError, ImportError, ValueError) as e:
        if os.environ.get("FASTGROW_DEBUG"):
            raise
        print(f"growth_study: error: {e}", file=sys.stderr)
        return 2
    print(result.table.read_text())
    print(f"wrote {result.runs_jsonl}, {result.table}" + (f", {result.plot}" if result.plot.is_file() else ""))
    if result.interrupted:
        print("interrupted: run the same command again to resume", file=sys.stderr)
        return 143
    return 0


if __name__ == "__main__":
    sys.exit(main())
