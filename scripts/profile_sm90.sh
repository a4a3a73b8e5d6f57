#!/usr/bin/env bash
# ncu on the wgmma forward (D=128, S=4096, non-causal): what limits it. Writes $OUT/ncu-sm90.txt.
set -uo pipefail
cd "$(dirname "$0")/.."
ADAATTN_FORWARD_KERNEL=sm90 ncu --clock-control none -k regex:attention_fwd_sm90 --launch-skip 1 -c 1 \
  --section SpeedOfLight --section Occupancy --section WarpStateStats --section ComputeWorkloadAnalysis \
  --metrics sm__pipe_tensor_op_gmma_cycles_active.avg.pct_of_peak_sustained_active,sm__inst_executed_pipe_xu.avg.pct_of_peak_sustained_active \
  python3 scripts/profile_forward.py 128 4096 0 > "$OUT/ncu-sm90.txt" 2>&1
grep -E "gmma|pipe_xu|Throughput|Issue Slots|Warp Cycles Per Issued|Achieved Occupancy|Theoretical Occupancy|Block Limit (Reg|Shared)|Duration" \
  "$OUT/ncu-sm90.txt" | head -24
