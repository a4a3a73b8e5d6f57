"""Small-shape matrix of the fused backward kernels, for compute-sanitizer (memcheck / racecheck).

Every instantiation (dtype × head dim × causal × dQ path: atomic default and deterministic) on ragged
sizes, GQA and Sq ≠ Sk both ways (including fully masked causal rows), through the launcher directly.
`python3 scripts/sanitize_backward.py [HEAD_DIM ...]` limits the head dims (racecheck is slow).
"""

import sys

import cupy as cp

import adaattn_core as aa
from adaattn_core import cuda_backward
from adaattn_core.launch_config import BACKWARD_TILES, CUDA_TYPES
from adaattn_core.problem import describe_backward

SHAPES = [(1, 1), (17, 33), (129, 65), (65, 129), (200, 200)]

launches = 0
for dtype in CUDA_TYPES:
    for dim in [int(d) for d in sys.argv[1:]] or BACKWARD_TILES:
        for causal in (False, True):
            for seq_q, seq_k in SHAPES:
                q = cp.random.standard_normal((1, 4, seq_q, dim), dtype=cp.float32).astype(dtype)
                k = cp.random.standard_normal((1, 2, seq_k, dim), dtype=cp.float32).astype(dtype)
                v = cp.random.standard_normal((1, 2, seq_k, dim), dtype=cp.float32).astype(dtype)
                out, lse = aa.attention(q, k, v, causal=causal, return_lse=True)
                dout = cp.random.standard_normal(out.shape, dtype=cp.float32).astype(dtype)
                problem = describe_backward(dout, q, k, v, out, lse, causal=causal, scale=None, layout="bhsd")
                assert cuda_backward.unsupported_reason(problem) is None
                for deterministic in (False, True):
                    grads = [cp.empty_like(x) for x in (q, k, v)]
                    cuda_backward.backward(problem, dout, q, k, v, out, lse, *grads, deterministic=deterministic)
                    launches += 1
cp.cuda.Device().synchronize()
print(f"sanitize_backward: {launches} backward calls done")
