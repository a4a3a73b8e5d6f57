#!/usr/bin/env bash
# The one command to run on the GPU machine. Installs the project without network, then runs the
# requested steps and writes logs and JSON under $OUT (default: ./gpu-out).
#
#   scripts/gpu_check.sh [steps...]      steps: info tests bench bench-bwd bench-fp8 sanitize overhead cli-bench
#                                        quality asv
#                                        (default: info tests bench bench-bwd)
#   PYTEST_ARGS="-k 'bf16'" scripts/gpu_check.sh tests
#   BENCH_ARGS="--dims 64 128 --seqs 2048 4096" scripts/gpu_check.sh bench
#   scripts/gpu_check.sh asv    # needs .whl/ (asv wheels) and .gitbundle carried along; ASV_MACHINE, ASV_ARGS optional
# Peers installed from wheels in .whl/peers/ when carried (no network there), e.g. SageAttention 1.x, pure Python +
# Triton: `pip download --no-deps -d .whl/peers sageattention==1.0.6` here, then carry .whl.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-$PWD/gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
steps=("$@")
[ ${#steps[@]} -eq 0 ] && steps=(info tests bench bench-bwd)

# No network there: build isolation would try to download setuptools.
python3 -m pip install -q --no-deps --no-build-isolation -e . >"$OUT/install.log" 2>&1 \
  || { echo "editable install failed (see install.log); using PYTHONPATH"; export PYTHONPATH=$PWD; }
status=0
shopt -s nullglob
peer_wheels=(.whl/peers/*.whl)
shopt -u nullglob
if [ ${#peer_wheels[@]} -gt 0 ]; then
  python3 -m pip install -q --no-deps --no-index "${peer_wheels[@]}" >>"$OUT/install.log" 2>&1 \
    || { echo "peer wheels ${peer_wheels[*]} failed to install (see install.log)"; status=1; }
fi
# Result files are named <date>-<GPU>-<what>.json.
gpu=$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -1 | tr ' ' '-' | tr -cd 'A-Za-z0-9_.-')
gpu=${gpu:-unknown-gpu}

# bench_step SCRIPT WHAT ARGS: one sweep into $OUT/<date>-<gpu>-WHAT.json, its log in $OUT/bench-WHAT.log.
bench_step() {
  eval python3 "benchmarks/$1" --out "'$OUT/$(date -u +%F)-$gpu-$2.json'" "$3" 2>&1 | tee "$OUT/bench-$2.log"
  [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
}

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
    bench) bench_step bench_forward.py fwd "${BENCH_ARGS:-}" ;;
    sanitize)
      for tool in memcheck racecheck synccheck; do
        for pass in forward backward; do
          compute-sanitizer --tool "$tool" --print-limit 20 --error-exitcode 9 python3 "scripts/sanitize_$pass.py" \
            2>&1 | grep -E "SUMMARY|calls done|launches|Error|error|Hazard" | tee -a "$OUT/sanitize.log" | tail -4
          [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
        done
      done ;;
    bench-bwd) bench_step bench_backward.py fwdbwd "${BENCH_BWD_ARGS:-}" ;;
    # fp8 against our bf16, torch flash/cuDNN and SageAttention (if its wheel was carried, see above).
    bench-fp8) bench_step bench_fp8.py fp8 "${BENCH_FP8_ARGS:-}" ;;
    overhead)
      python3 scripts/adapter_overhead.py --profile 2>&1 | tee "$OUT/overhead.txt" ;;
    quality)
      # Issue #9: train SDPA / AdaAttn-exact / SDPA-noise GPTs, evaluate every policy, capture activations,
      # then the GPU tests that read those activations (same call: the file stays on the device).
      eval python3 -m benchmarks.quality.run --out "$OUT/quality" "${QUALITY_ARGS:-}" 2>&1 | tee "$OUT/quality.log" \
        | grep -v "^step" | tail -40
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1
      python3 -m pytest -m gpu -q -p no:cacheprovider tests/test_quality.py tests/test_gpu_real_activations.py 2>&1 \
        | tee -a "$OUT/quality.log" | tail -5 ;;
    cli-bench)
      # The user's command (issue #8): progress bar, table, JSON and PNG under $OUT/cli-bench/.
      eval python3 -m adaattn_core.cli bench --out-dir "$OUT/cli-bench" "${CLI_BENCH_ARGS:-}" 2>&1 \
        | tee "$OUT/cli-bench.log" | tail -30
      [ "${PIPESTATUS[0]}" -eq 0 ] || status=1 ;;
    asv)
      # airspeed velocity from the wheels in .whl/ (no network here), results for HEAD under
      # asv_benchmarks/results/<machine>/, packed into $OUT/asv-results.tar.gz (untar at the repo root).
      (
        set -o pipefail
        shopt -s nullglob
        wheels=(.whl/*.whl)
        [ ${#wheels[@]} -gt 0 ] || { echo "asv: no wheels in .whl/ (download them, then carry .whl)"; exit 1; }
        site=/tmp/asv-site
        python3 -m pip install -q --no-index --no-deps --target "$site" "${wheels[@]}" || exit 1
        export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
        export ASV_PYTHONPATH="$PYTHONPATH"  # asv drops PYTHONPATH from benchmark processes, keeps this one
        # asv also needs tabulate and packaging; the image's copies are used, .whl/fallback/ fills a gap.
        for module in tabulate packaging; do
          python3 -c "import $module" 2>/dev/null || python3 -m pip install -q --no-index --no-deps \
            --target "$site" .whl/fallback/"$module"-*.whl || exit 1
        done
        python3 -m asv --version || { echo "asv: does not start (above)"; exit 1; }
        # asv reads commits through git; the copy may belong to another user than the one running here.
        export GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0=safe.directory GIT_CONFIG_VALUE_0='*'
        # The device copy has no .git: rebuild HEAD from a bundle made beforehand with
        # `git bundle create .gitbundle HEAD` (git-ignored, carried along).
        if [ -f .gitbundle ]; then
          rm -rf .git && git init -q -b main && git fetch -q .gitbundle HEAD && git reset -q FETCH_HEAD || exit 1
        fi
        head=$(git rev-parse HEAD 2>/dev/null) \
          || { echo "asv: no git history here: carry .gitbundle along (asv records results per commit)"; exit 1; }
        if [ -n "$(git status --porcelain -- adaattn_core cuda_src asv_benchmarks ':!asv_benchmarks/results' 2>/dev/null)" ]; then
          echo "asv: WARNING: the tree differs from HEAD $head; results are recorded for HEAD"
        fi
        machine=${ASV_MACHINE:-$(nvidia-smi --query-gpu=name --format=csv,noheader | head -1 | python3 -c \
          "import re,sys; w=sys.stdin.read().replace('NVIDIA','').split(); i=next((n for n,x in enumerate(w) if re.search(r'\d',x)),len(w)-1); print('-'.join(w[:i+1]).lower())")}
        echo "asv: machine $machine, commit $head"
        started=$SECONDS
        { python3 -m asv machine --yes --machine "$machine" || exit 1
          python3 -m asv run --python=same --launch-method spawn --machine "$machine" \
            --set-commit-hash "$head" --show-stderr ${ASV_ARGS:---quick}
          ran=$?  # non-zero when a benchmark failed: publish what there is all the same
          python3 -m asv publish && exit $ran; } 2>&1 | tee "$OUT/asv.log" | tail -60
        rc=${PIPESTATUS[0]}
        echo "asv: $((SECONDS - started)) s, exit $rc"
        tar -czf "$OUT/asv-results.tar.gz" asv_benchmarks/results
        [ -d asv_benchmarks/html ] && tar -czf "$OUT/asv-html.tar.gz" asv_benchmarks/html
        exit $rc
      ) || status=1 ;;
    *) echo "unknown step $step"; status=1 ;;
  esac
done
exit $status
