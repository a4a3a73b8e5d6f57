"""RMSE against float64 of the fp8 kernel on FlashAttention-3's outlier test, over several draws.

Q, K, V ~ N(0, 1) with 0.1% of the entries from N(0, 100) (`adaattn_core.bench.outlier_normal`), B=2, H=4,
S=1024, D=128, non-causal, bf16: the inputs of tests/test_gpu_fp8.py::test_rmse_against_float64, drawn DRAWS
times from SEED, so that two source trees run with the same seed see the same inputs (paired draws). From the
root of a tree:

    PYTHONPATH=$PWD python3 scripts/fp8_outlier_draws.py SEED LABEL [DRAWS]

Prints LABEL, the mean and max RMSE, then each draw's. Needs an sm_90 GPU.
"""

import sys

import cupy
import numpy as np

from adaattn_core import attention_reference, cuda_fp8
from adaattn_core.bench import outlier_normal
from adaattn_core.problem import describe


def main() -> None:
    seed, label = int(sys.argv[1]), sys.argv[2]
    draws = int(sys.argv[3]) if len(sys.argv) > 3 else 10
    rng = np.random.default_rng(seed)
    rmses = []
    for _ in range(draws):
        q, k, v = (cupy.asarray(outlier_normal(rng, (2, 4, 1024, 128))).astype("bfloat16") for _ in range(3))
        problem = describe(q, k, v, causal=False, scale=None, layout="bhsd")
        out = cupy.full(q.shape, cupy.nan, q.dtype)
        lse = cupy.full(q.shape[:3], cupy.nan, cupy.float32)
        cuda_fp8.forward(problem, q, k, v, out, lse, list(range(4)))
        ref = cupy.asarray(attention_reference(q, k, v, causal=False)[0], dtype=cupy.float64)
        rmses.append(float(cupy.sqrt(cupy.mean((out.astype(cupy.float64) - ref) ** 2))))
    print(label, f"mean {np.mean(rmses):.4e} max {np.max(rmses):.4e}", " ".join(f"{r:.3e}" for r in rmses))


if __name__ == "__main__":
    main()
