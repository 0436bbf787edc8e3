"""Plot a run's loss vs tokens and vs FLOPs (growth events marked) from its metrics.jsonl.

python tools/plot_run.py runs/tiny            # writes runs/tiny/loss.png
python tools/plot_run.py runs/tiny -o out.png
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from fastgrow.metrics import read_metrics
from fastgrow.plots import plot_loss


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("run_dir", type=Path)
    p.add_argument("-o", "--out", type=Path, help="PNG path (default RUN_DIR/loss.png)")
    args = p.parse_args(argv)
    try:
        records = read_metrics(args.run_dir / "metrics.jsonl")
        png = plot_loss(records, args.out or args.run_dir / "loss.png", title=str(args.run_dir))
    except (OSError, ValueError) as e:
        print(f"plot_run: error: {e}", file=sys.stderr)
        return 2
    print(png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
