#!/usr/bin/env bash
# The one command to run on the GPU machine. Installs the project without network, then runs the
# requested steps and writes logs and JSON under $OUT (default: ./gpu-out).
#
#   scripts/gpu_check.sh [steps...]      steps: info tests bench sanitize overhead (default: info tests bench)
#   PYTEST_ARGS="-k 'bf16'" scripts/gpu_check.sh tests
#   BENCH_ARGS="--dims 64 128 --seqs 2048 4096" scripts/gpu_check.sh bench
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(info tests bench)

# No network there: build isolation would try to download setuptools.
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
  || { echo "editable install failed (see install.log); using PYTHONPATH"; export PYTHONPATH=$PWD; }

status=0
for step in "${steps[@]}"; do
  echo "=== $step ==="
  case "$step" in
    info)
      { nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv
        python3 -m adaattn_core.cli info; } 2>&1 | tee "$OUT/info.txt" ;;
    tests)
      eval python3 -m pytest -m gpu -q -p no:cacheprovider --maxfail=30 tests "${PYTEST_ARGS:-}" 2>&1 \
        | tee "$OUT/gpu-tests.log" | tail -40
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
    bench)
      gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | tr ' ' '-' | tr -cd 'A-Za-z0-9_.-')
      eval python3 benchmarks/bench_forward.py --out "$OUT/$(date -u +%F)-$gpu-fwd.json" "${BENCH_ARGS:-}" 2>&1 \
        | tee "$OUT/bench-fwd.log"
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
    sanitize)
      for tool in memcheck racecheck; do
        compute-sanitizer --tool "$tool" --print-limit 20 --error-exitcode 9 python3 scripts/sanitize_forward.py 2>&1 \
          | tee "$OUT/sanitize-$tool.log" | tail -6
        [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
      done ;;
    overhead)
      python3 scripts/host_overhead.py 2>&1 | head -40 | tee "$OUT/host-overhead.txt" ;;
    *) echo "unknown step $step"; status=1 ;;
  esac
done
exit $status
