#!/usr/bin/env bash
# The GPU check, tiered to a short lease: most important first, each tier stopped at its time budget.
#
#   bash tools/gpu_check.sh OUT_DIR              # on the GPU machine (one H100/H200): ~9 minutes at most
#   bash tools/gpu_check.sh --dry-run OUT_DIR    # on a CPU: same script and tiers, Triton interpreter,
#                                                # tiny sizes, seconds per tier (tests/test_gpu_check.py)
#
# Tiers (budget in seconds on the GPU; a tier also stops when the total, GPU_CHECK_BUDGET=540, runs out):
#   1 tests     gpu-marked correctness tests (pytest -m gpu tests)                             100
#   2 kernels   copy/matmul ceilings; RMSNorm, SwiGLU vs eager/compile; attention vs SDPA     150
#   3 e2e       410M train step tokens/s + MFU: fastgrow vs plain PyTorch, eager and compiled 170
#   4 growth    grow() vs copy floor and alloc+copy, its peak memory and host overhead;       90
#               tokens/s before/after growth vs from scratch (bench/test_bench_growth.py)
#   5 study     the growth study (tools/study/gpu.toml), only if data/study-gpu was carried    what is left
# A tier cut by its budget keeps what it wrote: every benchmark appends its JSON line as it finishes.
#
# OUT_DIR receives at most 4 files (the device tool brings back 8):
#   summary.md     every number against its goal, PASS / FAIL / PENDING, tier times (tools/gpu_summary.py)
#   env.json       device, driver, torch/triton/CUDA versions, commit, date
#   results.tgz    everything else: tier logs, tests.xml, *.jsonl per benchmark, bench JSON, tuning.jsonl,
#                  the study's metrics (no checkpoints)
#   gpu_check.log  this script's own log
# Unpack into the repository: mkdir -p bench/results/DATE-GPU && tar xzf results.tgz -C bench/results/DATE-GPU
#
# The GPU machine has torch, triton, pytest, pytest-benchmark, numpy, tokenizers; no `datasets`, no
# registry: the project is installed with `pip install --no-deps --no-build-isolation -e .`. The dry run
# blocks `import datasets` so the same code paths are proven not to need it.
set -uo pipefail

DRY=0
if [ "${1:-}" = "--dry-run" ]; then
  DRY=1
  shift
fi
OUT=${1:?usage: bash tools/gpu_check.sh [--dry-run] OUT_DIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
WORK=$(mktemp -d "${TMPDIR:-/tmp}/gpu_check.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
LOG="$OUT/gpu_check.log"
: >"$LOG"
say() { echo "gpu_check: $*" | tee -a "$LOG"; }

export PYTHONUNBUFFERED=1 FASTGROW_BENCH_OUT="$WORK" FASTGROW_BENCH_QUICK=1
if [ "$DRY" = 1 ]; then
  TOTAL=${GPU_CHECK_BUDGET:-300}
  B_TESTS=60 B_KERNELS=90 B_E2E=60 B_GROWTH=60
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
  # The GPU machine has no `datasets`: make every import of it fail here too.
  mkdir -p "$WORK/nodatasets/datasets"
  echo 'raise ModuleNotFoundError("No module named datasets (not on the GPU machine; gpu_check --dry-run)", name="datasets")' \
    >"$WORK/nodatasets/datasets/__init__.py"
  export PYTHONPATH="$WORK/nodatasets${PYTHONPATH:+:$PYTHONPATH}"
else
  TOTAL=${GPU_CHECK_BUDGET:-540}
  B_TESTS=100 B_KERNELS=150 B_E2E=170 B_GROWTH=90
  export TRITON_INTERPRET=0
fi
START=$(date +%s)

if [ "$DRY" = 0 ]; then
  $PY -m pip install -q --no-deps --no-build-isolation -e . >"$WORK/install.log" 2>&1 || {
    say "editable install failed:"; tail -20 "$WORK/install.log" | tee -a "$LOG"; }
fi

$PY - "$DRY" >"$WORK/env.json" <<'PY'
import datetime, json, platform, subprocess, sys
import torch, triton
def sh(c):
    try: return subprocess.check_output(c, shell=True, text=True, stderr=subprocess.DEVNULL).strip() or None
    except Exception: return None
cuda = torch.cuda.is_available()
print(json.dumps({
    "dry_run": sys.argv[1] == "1",
    "device": torch.cuda.get_device_name(0) if cuda else "cpu",
    "driver": sh("nvidia-smi --query-gpu=driver_version --format=csv,noheader") if cuda else None,
    "torch": torch.__version__, "triton": triton.__version__, "cuda": torch.version.cuda,
    "python": platform.python_version(), "commit": sh("git rev-parse HEAD"),
    "dirty": bool(sh("git status --porcelain --untracked-files=no")),
    "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
}, indent=1))
PY
cp "$WORK/env.json" "$OUT/env.json"
tee -a "$LOG" <"$WORK/env.json"

# tier NAME BUDGET CMD...: run CMD with a wall-clock limit (the smaller of BUDGET and what is left of
# TOTAL), its output in $WORK/NAME.log, and one line in tiers.jsonl.
tier() {
  local name=$1 budget=$2
  shift 2
  local left=$((TOTAL - ($(date +%s) - START)))
  [ "$budget" -gt "$left" ] && budget=$left
  if [ "$budget" -lt 15 ]; then
    say "tier $name: skipped, ${left}s left"
    echo "{\"tier\": \"$name\", \"rc\": null, \"seconds\": 0, \"budget\": $budget, \"note\": \"skipped: no time left\"}" \
      >>"$WORK/tiers.jsonl"
    return
  fi
  say "tier $name: up to ${budget}s: $*"
  local t0 rc note=""
  t0=$(date +%s)
  timeout -k 10 "$budget" "$@" >"$WORK/$name.log" 2>&1
  rc=$?
  if [ "$rc" = 124 ] || [ "$rc" = 137 ]; then
    note="cut at the time budget"
  elif [ "$rc" != 0 ]; then
    FAILED="$FAILED $name"
  fi
  echo "{\"tier\": \"$name\", \"rc\": $rc, \"seconds\": $(($(date +%s) - t0)), \"budget\": $budget, \"note\": \"$note\"}" \
    >>"$WORK/tiers.jsonl"
  tail -3 "$WORK/$name.log" | tee -a "$LOG"
  say "tier $name: rc $rc after $(($(date +%s) - t0))s ${note}"
}

FAILED=""
BENCH=(-m pytest -q -p no:cacheprovider --benchmark-only)
# Only the files that hold gpu-marked tests (collecting the whole suite costs seconds for nothing).
mapfile -t GPU_TEST_FILES < <(grep -l -E "mark\.gpu|pytestmark" tests/test_*.py)
tier tests "$B_TESTS" $PY -m pytest -q -p no:cacheprovider -m gpu "${GPU_TEST_FILES[@]}" --junitxml="$WORK/tests.xml"
tier kernels "$B_KERNELS" $PY "${BENCH[@]}" --benchmark-json="$WORK/bench-kernels.json" \
  bench/test_bench_ceilings.py bench/test_bench_rmsnorm.py bench/test_bench_swiglu.py bench/test_bench_attention.py
tier e2e "$B_E2E" $PY "${BENCH[@]}" --benchmark-json="$WORK/bench-e2e.json" bench/test_bench_e2e.py
tier growth "$B_GROWTH" $PY "${BENCH[@]}" --benchmark-json="$WORK/bench-growth.json" bench/test_bench_growth.py
if [ "$DRY" = 1 ]; then
  # No prepared data on a CPU test machine: plan the GPU study (loads and checks the config).
  tier study 60 $PY tools/growth_study.py --config tools/study/gpu.toml --list
elif [ -f data/study-gpu/meta.json ]; then
  # Stopped with SIGTERM at the budget: the trainer checkpoints and exits (the study resumes when run
  # again with the same --out); 30 s stay for the summary and the archive.
  tier study $((TOTAL - ($(date +%s) - START) - 30)) \
    $PY tools/growth_study.py --config tools/study/gpu.toml --out "$WORK/study-gpu" --quiet
else
  say "tier study: skipped, data/study-gpu not carried (see tools/study/README.md)"
  echo '{"tier": "study", "rc": null, "seconds": 0, "budget": 0, "note": "skipped: data/study-gpu not carried"}' \
    >>"$WORK/tiers.jsonl"
fi

$PY tools/gpu_summary.py "$WORK" --out "$OUT/summary.md" | tee -a "$LOG"
tar czf "$OUT/results.tgz" --exclude='step-*' --exclude='*.pt' --exclude='nodatasets' -C "$WORK" .
say "done in $(($(date +%s) - START))s; $(ls "$OUT" | wc -l) files in $OUT"
if [ -n "$FAILED" ]; then
  say "failed tiers:$FAILED (see their logs in results.tgz)"
  exit 1
fi
