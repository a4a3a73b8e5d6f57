"""Two forward calls of one config through the public API, for `ncu` (the first compiles: skip its launches).

    python3 scripts/profile_forward.py D S CAUSAL [POLICY]      (POLICY default "exact"; "fp8": the fp8 path)
    ncu --clock-control none -k regex:attention_fwd --launch-skip 1 -c 1 python3 scripts/profile_forward.py 128 4096 0
"""

import sys

import cupy as cp

import adaattn_core as aa
from adaattn_core import bench

dim, seq, causal = int(sys.argv[1]), int(sys.argv[2]), bool(int(sys.argv[3]))
policy = sys.argv[4] if len(sys.argv) > 4 else "exact"
case = bench.paper_case(seq, dim, causal)
q, k, v = bench.make_input_sets(case, "gpu", sets=1, seed=bench.case_seed(case))[0]
for _ in range(2):  # the first call compiles; ncu skips its launches with --launch-skip
    aa.attention(q, k, v, causal=causal, policy=policy)
cp.cuda.Device().synchronize()
