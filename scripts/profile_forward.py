"""One fused-forward launch per listed config, for `ncu` (compile and warm-up happen before the profiled call).

    ncu --clock-control none -k regex:attention_fwd --launch-skip 1 -c 1 python3 scripts/profile_forward.py 128 4096 0
"""

import sys

import cupy as cp

import adaattn_core as aa
from adaattn_core import bench

dim, seq, causal = int(sys.argv[1]), int(sys.argv[2]), bool(int(sys.argv[3]))
case = bench.paper_case(seq, dim, causal)
q, k, v = bench.make_input_sets(case, "gpu", sets=1, seed=bench.case_seed(case))[0]
for _ in range(2):  # the first call compiles; ncu skips it with --launch-skip 1
    aa.attention(q, k, v, causal=causal)
cp.cuda.Device().synchronize()
