"""A tiny run through the command line as a batch job would see it: one log line per log step on stderr,
then `fastgrow eval` and `fastgrow generate` on its checkpoint. (In-process `main()` with captured
stdout/stderr, which are not terminals, as in a batch job; a subprocess per call would cost ~8 s each.)"""

from __future__ import annotations

import contextlib
import io
import json
import math
import re
from dataclasses import dataclass

import pytest
from conftest import tiny_run_config

from fastgrow.cli import main
from fastgrow.config_toml import config_toml
from fastgrow.metrics import read_metrics

STEPS, LOG_EVERY, EVAL_EVERY = 20, 2, 10


@dataclass
class Proc:
    returncode: int
    stdout: str
    stderr: str


def run_cli(*args) -> Proc:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = main([str(a) for a in args])
    return Proc(rc, out.getvalue(), err.getvalue())


@pytest.fixture(scope="module")
def cli_run(tiny_data, tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    cfg = tiny_run_config(tiny_data, out, max_steps=STEPS, log_every=LOG_EVERY, eval_every=EVAL_EVERY, ckpt_every=0)
    f = out.parent / "run.toml"
    f.write_text(config_toml(cfg))
    # progress=true as configured, but stderr is not a terminal (a log file): lines, not a bar
    proc = run_cli("train", "--config", f, "--train.progress=true")
    assert proc.returncode == 0, proc.stderr
    return out, proc


LINE = re.compile(
    r"^step (\d+)/(\d+) \| loss (\S+) \| lr (\S+) \| grad norm (\S+) \| ([\d,]+) tok/s \| MFU (\S+)$", re.MULTILINE
)


def test_batch_run_prints_a_line_per_log_step(cli_run):
    out, proc = cli_run
    lines = LINE.findall(proc.stderr)
    assert [int(m[0]) for m in lines] == list(range(LOG_EVERY, STEPS + 1, LOG_EVERY)), proc.stderr
    assert "\r" not in proc.stderr  # no progress-bar redraws in a log file
    train = {r["step"]: r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "train"}
    for step, total, loss, lr, gnorm, tps, mfu in lines:
        rec = train[int(step)]
        assert int(total) == STEPS
        assert float(loss) == pytest.approx(rec["loss"], abs=6e-5)
        assert float(lr) == pytest.approx(rec["lr"], rel=6e-3)
        assert float(gnorm) == pytest.approx(rec["grad_norm"], abs=6e-4)
        assert int(tps.replace(",", "")) == pytest.approx(rec["tokens_per_s"], abs=1)
        assert mfu == "n/a"  # no known peak on a CPU
    vals = re.findall(r"^\[val\] step (\d+): val_loss (\S+)$", proc.stderr, re.MULTILINE)
    assert [int(s) for s, _ in vals] == [EVAL_EVERY, STEPS]
    # stdout stays one JSON object (the summary), for scripts
    assert json.loads(proc.stdout)["steps"] == STEPS


def test_eval_reproduces_the_runs_validation_loss(cli_run):
    out, _ = cli_run
    proc = run_cli("eval", out, "--device", "cpu")
    assert proc.returncode == 0, proc.stderr
    got = json.loads(proc.stdout)
    last_val = [r for r in read_metrics(out / "metrics.jsonl") if r["kind"] == "val"][-1]
    # same checkpoint weights, same fixed validation batches, same function: the same number
    assert got["val_loss"] == pytest.approx(last_val["val_loss"], rel=1e-6)
    assert got["perplexity"] == pytest.approx(math.exp(got["val_loss"]), rel=1e-12)
    cfg = tiny_run_config("d", "o")
    assert got["tokens"] == cfg.train.eval_batches * cfg.data.batch_size * cfg.data.seq_len
    assert got["checkpoint"].endswith(f"step-{STEPS:08d}") and got["step"] == STEPS
    more = json.loads(run_cli("eval", got["checkpoint"], "--batches", "5").stdout)
    assert more["tokens"] == 5 * cfg.data.batch_size * cfg.data.seq_len and more["val_loss"] != got["val_loss"]


def test_eval_refuses_data_from_another_tokenizer(cli_run, tmp_path):
    from fastgrow.data import prepare

    out, _ = cli_run
    other = tmp_path / "other"
    prepare("stdlib", other, vocab_size=300, max_bytes=40_000, progress=False)
    proc = run_cli("eval", out, "--data", other)
    assert proc.returncode == 2 and "another tokenizer" in proc.stderr and proc.stderr.count("\n") == 1


def test_generate_prints_text_from_the_checkpoint(cli_run):
    out, _ = cli_run
    args = ("generate", out, "--prompt", "def main(", "--max-new-tokens", "24", "--seed", "3", "--device", "cpu")
    first, again = run_cli(*args), run_cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout.startswith("def main(") and len(first.stdout) > len("def main(\n")
    assert first.stdout == again.stdout  # seeded
    assert re.search(r"\[generate\] .*: \d+ prompt tokens, \d+ new tokens", first.stderr)
    greedy = run_cli("generate", out, "--prompt", "import", "--temperature", "0", "--max-new-tokens", "8")
    assert greedy.returncode == 0 and greedy.stdout.startswith("import")
    too_long = run_cli("generate", out, "--prompt", "x", "--max-new-tokens", "1000")
    assert too_long.returncode == 2 and "max_seq_len" in too_long.stderr and too_long.stderr.count("\n") == 1
