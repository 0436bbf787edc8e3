"""Running `fastgrow` as a user does, in a new process, from tests: a run config written as the TOML
`--config` reads, the CLI run to completion, or a training run interrupted by a signal."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def write_toml(cfg, path):
    lines = []
    for section, values in cfg.to_dict().items():
        tables = values if isinstance(values, list) else [values]  # growth: a list of [[growth]] stages
        for table in tables:
            lines.append(f"[[{section}]]" if isinstance(values, list) else f"[{section}]")
            lines += [f"{k} = {json.dumps(v)}" for k, v in table.items() if v is not None]
    path.write_text("\n".join(lines) + "\n")
    return path


def run_cli(*args, timeout=300, **kw):
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    return subprocess.run(
        [sys.executable, "-m", "fastgrow.cli", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=REPO,
        env=env,
        **kw,
    )


def interrupt_cli_train(cfg_file, metrics, *, after_records: int, sig: signal.Signals, timeout: float = 120):
    """`fastgrow train --config cfg_file` in a new process, sent `sig` once its metrics.jsonl holds
    `after_records` records; returns (exit code, stdout, stderr)."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "fastgrow.cli", "train", "--config", str(cfg_file)],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    metrics = Path(metrics)
    deadline = time.time() + timeout
    while time.time() < deadline and not (metrics.exists() and metrics.read_text().count("\n") >= after_records):
        time.sleep(0.05)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err
