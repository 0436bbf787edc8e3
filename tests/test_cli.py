"""The command line as a user meets it: fast help without torch, --print-config round trips, help that
lists the keys, one-line errors in the CLI's own words, and `grow` agreeing with the docs."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tiny_run_config

from fastgrow.cli import main
from fastgrow.config import RunConfig, preset, preset_names
from fastgrow.config_files import apply_overrides, load_toml
from fastgrow.config_toml import dumps_toml

REPO = Path(__file__).resolve().parents[1]


def _modules_after(code: str) -> set[str]:
    """Modules loaded by a fresh interpreter after running `code` (which must not exit)."""
    probe = code + "\nimport sys, json\nprint(json.dumps(sorted(sys.modules)))\n"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    p = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=REPO, env=env, timeout=60)
    assert p.returncode == 0, p.stderr
    return set(json.loads(p.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    "argv",
    [
        ["--help"],
        ["train", "--help"],
        ["plan", "--params", "410M", "--tokens", "100B"],
        ["plan", "--preset", "7B", "--tokens", "300B", "--json"],
        ["train", "--preset", "410M", "--print-config"],
    ],
)
def test_help_plan_and_print_config_do_not_import_torch(argv):
    code = (
        "import contextlib, io\n"
        "from fastgrow.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        f"        rc = main({argv!r})\n"
        "    except SystemExit as e:\n"
        "        rc = e.code\n"
        "assert rc == 0, rc\n"
    )
    loaded = _modules_after(code)
    assert "fastgrow.cli" in loaded and "fastgrow.config" in loaded
    heavy = {m for m in loaded if m.split(".")[0] in ("torch", "triton", "numpy")}
    assert not heavy, sorted(heavy)[:10]


def test_kernels_load_lazily_but_stay_reachable():
    loaded = _modules_after("import fastgrow")
    assert "torch" not in loaded and "fastgrow.kernels" not in loaded
    loaded = _modules_after("import fastgrow\nassert callable(fastgrow.kernels.rms_norm)")
    assert "fastgrow.kernels" in loaded
    loaded = _modules_after("from fastgrow.kernels import RMSNorm, attention, swiglu")
    assert "fastgrow.kernels.attention" in loaded
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        import fastgrow

        _ = fastgrow.nope


# --- --print-config -------------------------------------------------------------------------------------


def _print_config(capsys, *argv: str) -> str:
    assert main(["train", *argv, "--print-config"]) == 0
    return capsys.readouterr().out


@pytest.mark.parametrize("name", preset_names())
def test_print_config_is_toml_that_config_reads_back(capsys, tmp_path, name):
    overrides = [
        "--growth.at_tokens=auto",
        "--growth.op=partial",
        "--growth.spec=12-3456*5-56",
        "--train.lr=1.5e-3",
        "--train.min_lr=1.5e-5",
        "--train.eps=1e-12",
    ]
    text = _print_config(capsys, "--preset", name, *overrides)
    assert text.startswith("# ") and "\n[model]\n" in text and "\n[growth]\n" in text
    f = tmp_path / "printed.toml"
    f.write_text(text)
    expected = apply_overrides(preset(name), overrides)
    assert load_toml(f) == expected
    # and through the CLI again, with an override on top: the same text but for that key
    again = _print_config(capsys, "--config", str(f), "--train.max_steps=7")
    assert again == text.replace("max_steps = 200", "max_steps = 7")


def test_toml_writer_round_trips_awkward_values(tmp_path):
    from fastgrow.config_files import tomllib

    data = {
        "title": 'quote " backslash \\ tab \t newline \n del \x7f emoji 😀 é',
        "n": -3,
        "x": 1e-300,
        "big": 1.7976931348623157e308,
        "inf": math.inf,
        "flags": [True, False],
        "model": {"dim": 64, "sub": {"k": "v"}, "weird key": 1},
        "growth": [{"op": "stack", "factor": 2}, {"op": "width", "target_dim": 256}],
        "unset": None,
    }
    text = dumps_toml(data, header="two\nlines")
    back = tomllib.loads(text)
    expected = {k: v for k, v in data.items() if k != "unset"}
    assert back == expected
    assert text.count("[[growth]]") == 2 and "# unset is unset" in text


def test_growth_stages_print_as_growth_tables_and_read_back(capsys, tmp_path):
    stages = [
        "--growth.0.at_tokens=1000",
        "--growth.0.factor=2",
        "--growth.1.at_tokens=5000",
        "--growth.1.op=width",
        "--growth.1.target_dim=256",
        "--growth.1.width_op=zero",
    ]
    for overrides, tables, arrays in ((stages, 0, 2), (stages[:2], 1, 0), ([], 0, 0)):
        text = _print_config(capsys, "--preset", "tiny-base", *overrides)
        assert text.count("\n[growth]\n") == tables and text.count("\n[[growth]]\n") == arrays, text
        f = tmp_path / "stages.toml"
        f.write_text(text)
        assert load_toml(f) == apply_overrides(preset("tiny-base"), overrides)


def test_preset_and_config_naming_different_presets_is_an_error(tmp_path, capsys):
    f = tmp_path / "run.toml"
    f.write_text('preset = "410M-base"\n[train]\nlr = 2e-4\n')
    assert main(["train", "--preset", "7B", "--config", str(f), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--preset 7B conflicts with preset = '410M-base'" in err and str(f) in err
    # the same preset twice is no conflict; case does not matter
    assert "n_layers = 6" in _print_config(capsys, "--preset", "410m-base", "--config", str(f))


def test_train_help_explains_overrides_and_lists_every_key(capsys):
    import dataclasses

    from fastgrow.cli import CONFIG_SECTIONS

    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    assert "--section.key=value" in out and "--print-config" in out
    assert set(CONFIG_SECTIONS) == set(RunConfig().to_dict())
    for section, cls in CONFIG_SECTIONS.items():
        assert f"[{section}]" in out
        for f in dataclasses.fields(cls):
            assert f" {f.name}=" in out or f"] {f.name}=" in out, f"{section}.{f.name} missing from train --help"


# --- errors in the CLI's own words -----------------------------------------------------------------------


def test_cli_errors_name_flags_not_python_arguments(tiny_data, tmp_path, capsys):
    rc = main(["prepare", "stdlib", "--out", str(tiny_data), "--quiet"])  # refused before anything is read
    err = capsys.readouterr().err
    assert rc == 2 and "--overwrite" in err and "overwrite=True" not in err and err.count("\n") == 1
    cfg = tiny_run_config(tiny_data, tmp_path / "run")
    rc = main(["train", f"--data.data_dir={tiny_data}", f"--train.out_dir={tmp_path / 'run'}", "--resume"])
    err = capsys.readouterr().err
    assert rc == 2 and "--resume: no complete checkpoint" in err and "resume=True" not in err
    assert cfg.train.out_dir == str(tmp_path / "run")


def test_library_errors_keep_python_names(tiny_data, tmp_path):
    from fastgrow.train import train

    with pytest.raises(FileNotFoundError, match=r"^resume=True: no complete checkpoint"):
        train(tiny_run_config(tiny_data, tmp_path / "r"), resume=True, echo=False)


# --- grow agrees with growth.op ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def small_ckpt(tiny_data, tmp_path_factory):
    from fastgrow.train import train

    out = tmp_path_factory.mktemp("small")
    return train(tiny_run_config(tiny_data, out, max_steps=2, ckpt_every=0), echo=False).checkpoint


def _grow(capsys, small_ckpt, out, *flags):
    rc = main(["grow", str(small_ckpt), str(out), *flags])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_grow_defaults_to_factor_4_like_plan(capsys, small_ckpt, tmp_path):
    rc, out, err = _grow(capsys, small_ckpt, tmp_path / "x4")
    assert rc == 0, err
    assert json.loads(out)["layers"] == 4 * 2  # tiny_run_config has 2 layers


def _readme_growth_ops() -> list[str]:
    lines = (REPO / "README.md").read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| `growth.op`"))
    ops = []
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        ops.append(line.split("`")[1])
    return ops


def test_grow_accepts_every_op_of_the_readme_table(capsys, small_ckpt, tmp_path):
    import argparse

    from fastgrow.cli import build_parser

    ops = _readme_growth_ops()
    assert "stack" in ops and "width" in ops
    grow = next(a.choices["grow"] for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    choices = next(a.choices for a in grow._actions if a.dest == "op")
    assert set(ops) <= set(choices)
    rc, out, err = _grow(capsys, small_ckpt, tmp_path / "wide", "--op", "width", "--target-dim", "64")
    assert rc == 0, err
    from fastgrow.checkpoint import read_meta

    meta = read_meta(tmp_path / "wide")
    assert meta["model_config"]["dim"] == 64 and meta["model_config"]["n_layers"] == 2


def test_grow_on_a_missing_cuda_device_is_one_line(capsys, small_ckpt, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    rc, out, err = _grow(capsys, small_ckpt, tmp_path / "gpu", "--device", "cuda")
    assert (
        rc == 2 and err.startswith("fastgrow: error: --device 'cuda': CUDA is not available") and err.count("\n") == 1
    )
    rc, out, err = _grow(capsys, small_ckpt, tmp_path / "gpu", "--device", "tpu7")
    assert rc == 2 and "is not a device name" in err
    assert not (tmp_path / "gpu").exists() or not any((tmp_path / "gpu").iterdir())
