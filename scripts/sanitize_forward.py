"""Small-shape matrix of the fused forward, for compute-sanitizer (memcheck / racecheck).

Every instantiation (dtype × head dim × causal) on ragged sizes, GQA and Sq ≠ Sk both ways.
"""

import cupy as cp

import adaattn_core as aa
from adaattn_core.launch_config import all_forward_instantiations

SHAPES = [(1, 1), (17, 33), (129, 65), (65, 129), (200, 200)]

launches = 0
for dtype, dim, causal, _ in all_forward_instantiations():
    for seq_q, seq_k in SHAPES:
        q = cp.random.standard_normal((1, 4, seq_q, dim), dtype=cp.float32).astype(dtype)
        k = cp.random.standard_normal((1, 2, seq_k, dim), dtype=cp.float32).astype(dtype)
        v = cp.random.standard_normal((1, 2, seq_k, dim), dtype=cp.float32).astype(dtype)
        report = aa.Report()
        out = aa.attention(q, k, v, causal=causal, report=report)
        assert report.backend == "cuda"
        launches += 1
cp.cuda.Device().synchronize()
print(f"sanitize_forward: {launches} launches done")
