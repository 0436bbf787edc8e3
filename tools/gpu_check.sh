#!/usr/bin/env bash
# Run every GPU check in one go on the GPU machine and collect the results in one folder.
#
#   bash tools/gpu_check.sh OUT_DIR
#
# Installs the project without dependencies (the GPU image has torch, triton, numpy, tokenizers,
# safetensors, tqdm, pytest, pytest-benchmark; it has no `datasets` and no registry access), then runs
# the gpu-marked tests and all benchmarks, writing:
#   OUT_DIR/env.json           device, driver, torch/triton versions, commit, date
#   OUT_DIR/tests.log          pytest -m gpu output
#   OUT_DIR/bench.log          pytest bench output
#   OUT_DIR/bench.json         pytest-benchmark JSON
#   OUT_DIR/*.jsonl            per-benchmark result lines (FASTGROW_BENCH_OUT)
set -uo pipefail
OUT=${1:?usage: tools/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
export PYTHONUNBUFFERED=1 FASTGROW_BENCH_OUT="$OUT"

$PY -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 || {
  echo "editable install failed, see $OUT/install.log"; exit 1; }

$PY - <<'PY' >"$OUT/env.json"
import json, subprocess, datetime, platform
import torch, triton
def sh(c):
    try: return subprocess.check_output(c, shell=True, text=True).strip()
    except Exception: return None
print(json.dumps({
    "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    "driver": sh("nvidia-smi --query-gpu=driver_version --format=csv,noheader"),
    "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
    "python": platform.python_version(), "commit": sh("git rev-parse HEAD"),
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
}, indent=1))
PY
cat "$OUT/env.json"

status=0
$PY -m pytest -q -m gpu tests 2>&1 | tee "$OUT/tests.log" || status=1
$PY -m pytest -q bench --benchmark-only --benchmark-json="$OUT/bench.json" \
  --benchmark-columns=median,iqr,rounds 2>&1 | tee "$OUT/bench.log" || status=1
echo "gpu_check: done (status $status); results in $OUT"
exit $status
