"""Benchmark session setup.

- Without CUDA, run Triton kernels through the interpreter (tiny sizes only, to keep the harness tested);
  this must happen before anything imports triton.
- A narrower default table: median, IQR and rounds, short names (pass --benchmark-columns /
  --benchmark-name to choose others).
- At the end of the session, the launch configs the kernels tuned on first use (and every candidate's
  time) are appended to $FASTGROW_BENCH_OUT/tuning.jsonl.
"""

import json
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    opt = config.option
    if hasattr(opt, "benchmark_columns") and opt.benchmark_columns in (None, []):
        opt.benchmark_columns = ["median", "iqr", "rounds"]
    if getattr(opt, "benchmark_name", None) == "normal":
        opt.benchmark_name = "short"


def pytest_sessionfinish(session, exitstatus):
    out = os.environ.get("FASTGROW_BENCH_OUT")
    if not out:
        return
    from fastgrow.kernels._tune import tuning_log

    log = tuning_log()
    if log:
        os.makedirs(out, exist_ok=True)
        with open(os.path.join(out, "tuning.jsonl"), "a") as f:
            for key, entry in log.items():
                f.write(json.dumps({"key": key, **entry}) + "\n")
