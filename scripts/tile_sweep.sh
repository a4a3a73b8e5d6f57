#!/usr/bin/env bash
# Tuning sweep on the GPU machine: the forward benchmark once per tile override (and once with the
# shipped table), then ncu on one config and the host overhead per call. Writes under $OUT.
#
#   DIMS="128" SEQS="2048 8192" TILES="128:64,32,4 128:64,64,4" NCU="128 4096 0" scripts/tile_sweep.sh
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH=$PWD
bench() { python3 -W ignore benchmarks/bench_forward.py --warmup 3 --repeat 20 --dims $DIMS --seqs $SEQS "$@" 2>&1 \
  | grep -v '^#'; }
{
  for tile in shipped ${TILES:-} shipped; do
    echo "--- tile $tile"
    if [ "$tile" = shipped ]; then bench; else bench --tile "$tile"; fi
  done
} | tee "$OUT/tile-sweep.log"
if [ -n "${NCU:-}" ]; then
  ncu --clock-control none -k regex:attention_fwd --launch-skip 1 -c 1 \
    --section SpeedOfLight --section Occupancy --section WarpStateStats --section ComputeWorkloadAnalysis \
    --metrics sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active \
    python3 scripts/profile_forward.py $NCU > "$OUT/ncu.txt" 2>&1
  grep -E "Throughput|Tensor|hmma|pipe_xu|Occupancy|Registers|Stall|Warp Cycles|Block Limit|Duration" "$OUT/ncu.txt" | head -40
fi
python3 scripts/adapter_overhead.py --profile 2>&1 | tee "$OUT/overhead.txt"
