"""`fastgrow demo` (what `make demo` runs), shortened to a few steps: the real corpus, the real split, the
growth and the report a new user sees."""

from __future__ import annotations

import json

import pytest

from fastgrow.cli import main

pytestmark = pytest.mark.slow


def test_demo_prepares_trains_grows_and_reports(tmp_path, capsys):
    out, data = tmp_path / "run", tmp_path / "data"
    rc = main(["demo", "--steps", "10", "--out", str(out), "--data", str(data), "--train.eval_every=5"])
    assert rc == 0
    printed = capsys.readouterr()
    assert "warning" not in printed.err.lower(), printed.err  # e.g. no fallback to a tail validation split
    meta = json.loads((data / "meta.json").read_text())
    assert meta["split"]["method"] == "documents"
    # Growth at 30% of the steps: step 3, tiny-base's 2 layers stacked x4.
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (growth,) = [r for r in records if r["kind"] == "growth"]
    assert (growth["step"], growth["layers_before"], growth["layers_after"]) == (3, 2, 8)
    table = [line.split() for line in printed.out.splitlines() if line.startswith(("before growth", "after growth"))]
    assert [row[2] for row in table] == ["2", "8"]  # the layers column of each phase
    assert (out / "loss.png").stat().st_size > 0
    assert "final validation loss" in printed.out

    # A second demo reuses the prepared shards and replaces its own run directory.
    assert main(["demo", "--steps", "4", "--out", str(out), "--data", str(data), "--no-growth"]) == 0
    assert "using the token shards" in capsys.readouterr().out
    assert not any(json.loads(x)["kind"] == "growth" for x in (out / "metrics.jsonl").read_text().splitlines())


def test_demo_refuses_a_directory_it_did_not_create(tmp_path, capsys):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    assert main(["demo", "--steps", "2", "--out", str(out), "--data", str(tmp_path / "data")]) == 2
    err = capsys.readouterr().err
    assert f"fastgrow: error: {out} exists and is not a fastgrow demo directory" in err
    assert (out / "notes.txt").read_text() == "keep me"
    assert not (tmp_path / "data").exists()  # refused before 4 MB were prepared


def test_demo_needs_a_step_before_and_after_the_growth(tmp_path, capsys):
    assert main(["demo", "--steps", "1", "--out", str(tmp_path / "r"), "--data", str(tmp_path / "d")]) == 2
    assert "fastgrow: error: --steps must be at least 2" in capsys.readouterr().err
    assert not (tmp_path / "d").exists()


def test_a_two_step_demo_grows_after_its_first_step():
    from fastgrow.demo import demo_config

    cfg = demo_config("runs/x", "data/x", steps=2, grow=True)
    (stage,) = cfg.growth
    assert stage.at_tokens == cfg.tokens_per_step  # after step 1 of 2
