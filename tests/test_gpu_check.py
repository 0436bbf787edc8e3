"""tools/gpu_check.sh and tools/gpu_summary.py: the GPU check must be known to work before it meets a GPU.

The dry run executes the real script on this CPU (Triton interpreter, tiny sizes, `datasets` blocked as on
the GPU machine) and checks what comes back; the summary's goal verdicts are checked on hand-made result
lines whose expected verdicts follow from the documented goals.
"""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tools"))
import gpu_summary  # noqa: E402


@pytest.mark.slow
def test_dry_run_runs_every_tier_and_returns_few_files(tmp_path):
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k not in ("FASTGROW_BENCH_OUT", "FASTGROW_BENCH_QUICK")}
    env.update(PYTHON=sys.executable, TMPDIR=str(tmp_path))
    res = subprocess.run(
        ["bash", str(ROOT / "tools" / "gpu_check.sh"), "--dry-run", str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert files == ["env.json", "gpu_check.log", "results.tgz", "summary.md"]  # the device tool returns <= 8
    assert json.loads((out / "env.json").read_text())["dry_run"] is True
    with tarfile.open(out / "results.tgz") as tar:
        names = {Path(n).name for n in tar.getnames()}
        tiers = [json.loads(line) for line in tar.extractfile("./tiers.jsonl").read().decode().splitlines()]
    assert [t["tier"] for t in tiers] == ["tests", "kernels", "e2e", "growth", "study"]
    assert all(t["rc"] == 0 for t in tiers), tiers
    for kind in ("ceilings", "rmsnorm", "swiglu", "attention", "e2e", "growth"):
        assert f"{kind}.jsonl" in names, names
    assert {"tests.xml", "tests.log", "kernels.log", "e2e.log", "growth.log", "study.log"} <= names
    summary = (out / "summary.md").read_text()
    assert "DRY RUN" in summary
    for goal in ("rms_norm fwd vs copy", "swiglu fwd+bwd vs copy", "vs SDPA default", "410M train step MFU",
                 "grow() time vs copy floor", "grow() time vs allocate + _foreach_copy_", "grow() peak memory",
                 "grow() host overhead", "tokens/s after growth"):  # fmt: skip
        assert goal in summary, goal
    assert not list(tmp_path.glob("gpu_check.*")), "the work folder was not removed"


def _write(d: Path, name: str, rows: list[dict]) -> None:
    (d / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_summary_verdicts(tmp_path):
    _write(tmp_path, "ceilings", [{"op": "copy", "gbps": 4000.0}])
    _write(
        tmp_path,
        "rmsnorm",
        [
            {"op": "rms_norm", "mode": "fwd", "impl": "fastgrow", "gbps": 3900.0, "shape": [16384, 1024]},  # 97.5%
            {"op": "rms_norm", "mode": "fwd", "impl": "fastgrow", "gbps": 3700.0, "shape": [16384, 4096]},  # 92.5%
            {"op": "rms_norm", "mode": "fwd", "impl": "eager", "gbps": 100.0, "shape": [16384, 1024]},  # not ours
            {"op": "rms_norm", "mode": "fwdbwd", "impl": "fastgrow", "gbps": 3300.0, "shape": [16384, 1024]},  # 82.5%
        ],
    )
    _write(
        tmp_path,
        "attention",
        [
            {"model": "410M", "pass": "fwd", "backend": "triton", "tflops": 400.0},
            {"model": "410M", "pass": "fwd", "backend": "sdpa", "tflops": 380.0},
            {"model": "410M", "pass": "fwd_bwd", "backend": "triton", "tflops": 250.0},
            {"model": "410M", "pass": "fwd_bwd", "backend": "sdpa", "tflops": 300.0},
            {"model": "3B", "pass": "fwd", "backend": "sdpa", "tflops": 300.0},
        ],
    )
    _write(
        tmp_path,
        "e2e",
        [
            {"model": "fastgrow", "compiled": False, "tokens_per_s": 200000.0, "mfu": 0.50},
            {"model": "fastgrow", "compiled": True, "tokens_per_s": 230000.0, "mfu": 0.575},
            {"model": "plain", "compiled": True, "tokens_per_s": 200000.0, "mfu": 0.5},
        ],
    )
    grow_time = {"kind": "grow_time", "grow_vs_floor": 1.1, "grow_s": 0.05, "grow_vs_alloc_copy": 1.4}
    grow_time.update(alloc_copy_s=0.036, peak_extra_bytes=1.05e9, bytes_copied=1e9, peak_extra_copy_all_bytes=2.1e9)
    _write(tmp_path, "growth", [grow_time, {"kind": "grow_host", "host_ms": 2.5}])
    v = {x.goal: x for x in gpu_summary.evaluate(tmp_path)}
    assert v["rms_norm fwd vs copy bandwidth"].status == "FAIL"  # the worst shape (92.5%) decides
    assert "92%" in v["rms_norm fwd vs copy bandwidth"].measured
    assert v["rms_norm fwd+bwd vs copy bandwidth"].status == "PASS"
    assert v["add_rms_norm fwd vs copy bandwidth"].status == "PENDING"
    assert v["attention 410M fwd vs SDPA default"].status == "PASS"
    assert v["attention 410M fwd_bwd vs SDPA default"].status == "FAIL"
    assert v["attention 3B fwd vs SDPA default"].status == "PENDING"
    assert v["410M train step MFU"].status == "PASS"  # the faster variant (compiled, 57.5%)
    assert v["410M tokens/s vs plain PyTorch + compile"].status == "FAIL"  # 1.15x < 1.3x
    assert v["grow() time vs copy floor"].status == "PASS"
    assert v["grow() time vs allocate + _foreach_copy_"].status == "FAIL"  # 1.4x > 1.3x
    peak = v["grow() peak memory over its input vs the bytes it copies"]
    assert peak.status == "PASS" and peak.measured.startswith("1.05x")
    assert v["grow() host overhead, 6 -> 24 layers"].status == "PASS"
    assert v["tokens/s after growth vs from scratch"].status == "PENDING"
    text = gpu_summary.render(tmp_path)
    assert "goals: 6 pass, 4 fail" in text and "DRY RUN" not in text


def test_summary_of_an_empty_run_is_all_pending(tmp_path):
    (tmp_path / "rmsnorm.jsonl").write_text('{"op": "rms_norm", "mode": "fwd", "impl": "fastg')  # cut off mid-line
    verdicts = gpu_summary.evaluate(tmp_path)
    assert verdicts and all(x.status == "PENDING" for x in verdicts)
    assert gpu_summary.main([str(tmp_path / "missing")]) == 2
