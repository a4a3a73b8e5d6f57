"""One fused-forward launch per listed config, for `ncu` (compile and warm-up happen before the profiled call).

    ncu --clock-control none -k regex:attention_fwd --launch-skip 1 -c 1 python3 scripts/profile_forward.py 128 4096 0
"""

import sys

import cupy as cp

import adaattn_core as aa
from adaattn_core import bench

dim, seq, causal = int(sys.argv[1]), int(sys.argv[2]), bool(int(sys.argv[3]))
shape = bench.paper_case(seq, dim, causal).shape
q, k, v = (cp.random.standard_normal(shape, dtype=cp.float32).astype("bfloat16") for _ in range(3))
for _ in range(2):  # the first call compiles; ncu skips it with --launch-skip 1
    aa.attention(q, k, v, causal=causal)
cp.cuda.Device().synchronize()
