#!/usr/bin/env bash
# Tuning sweep: the forward benchmark with tile overrides, then ncu on the shipped D=128 tile.
# Writes $OUT/tile-sweep.log and $OUT/ncu-d128.txt. Run on the GPU machine.
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1 || export PYTHONPATH=$PWD
bench() { python3 -W ignore benchmarks/bench_forward.py --warmup 3 --repeat 20 "$@" 2>&1 | grep -v '^#'; }
{
  for tile in "" 128:128,64,8 128:64,64,4 128:128,64,4; do
    echo "--- D=128 tile ${tile:-shipped}"; bench --dims 128 --seqs 512 2048 8192 ${tile:+--tile $tile}
  done
  for tile in "" 256:128,64,8 256:64,64,4; do
    echo "--- D=256 tile ${tile:-shipped}"; bench --dims 256 --seqs 2048 8192 ${tile:+--tile $tile}
  done
  for tile in "" 64:128,128,8 64:64,64,4; do
    echo "--- D=64 tile ${tile:-shipped}"; bench --dims 64 --seqs 2048 8192 ${tile:+--tile $tile}
  done
} | tee "$OUT/tile-sweep.log"
ncu --clock-control none -k regex:attention_fwd --launch-skip 1 -c 1 \
  --section SpeedOfLight --section Occupancy --section WarpStateStats --section ComputeWorkloadAnalysis \
  --metrics sm__pipe_tensor_op_hmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active \
  python3 scripts/profile_forward.py 128 4096 0 > "$OUT/ncu-d128.txt" 2>&1
tail -60 "$OUT/ncu-d128.txt"
