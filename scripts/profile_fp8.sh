#!/usr/bin/env bash
# ncu on the fp8 path (D=128, S=4096, non-causal): the two quantisation kernels and the attention kernel of the
# second call (the first call's three launches compile and are skipped). What limits the quantisers (DRAM
# throughput against the H200's 4.8 TB/s, occupancy, stalls) is the open question of issue #6 at 4k.
# Writes $OUT/ncu-fp8.txt and prints its summary lines.
set -uo pipefail
cd "$(dirname "$0")/.."
ncu --clock-control none -k regex:"quantize_fp8|attention_fwd_fp8" --launch-skip 3 -c 3 \
  --section SpeedOfLight --section MemoryWorkloadAnalysis --section Occupancy --section WarpStateStats \
  --section LaunchStats --metrics dram__bytes_read.sum,dram__bytes_write.sum,dram__throughput.avg.pct_of_peak_sustained_elapsed \
  python3 scripts/profile_forward.py 128 4096 0 fp8 > "$OUT/ncu-fp8.txt" 2>&1
grep -E "quantize_fp8|attention_fwd_fp8|dram__|Duration|Memory Throughput|Achieved Occupancy|Theoretical Occupancy|Block Limit (Reg|Shared)|Registers Per|Warp Cycles Per Issued" \
  "$OUT/ncu-fp8.txt" | head -60
