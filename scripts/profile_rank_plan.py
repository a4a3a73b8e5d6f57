"""Steady-state profile of `RankPolicy.plan` on the GPU: where its milliseconds go once everything is compiled.

    python3 scripts/profile_rank_plan.py [--seqs 8192 32768] [--kind diffuse] [--calls 20]

Per sequence length (B=1, H=16, D=128, bf16, the rank benchmark's synthetic heads): after warm-up plans,
`cupyx.profiler.benchmark` splits a plan's time into host (CPU) and device (GPU) time, then cProfile lists the
host functions of `--calls` plans by own time. A plan's wall time near its CPU time means launch and Python
overhead, near its GPU time means kernels.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
from pathlib import Path

import cupy
from cupyx.profiler import benchmark

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from adaattn_core.problem import describe  # noqa: E402
from adaattn_core.rank_policy import RankPolicy  # noqa: E402
from benchmarks.bench_rank import KINDS, make_inputs  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--kind", choices=list(KINDS), default="diffuse")
    parser.add_argument("--calls", type=int, default=20)
    args = parser.parse_args()
    policy = RankPolicy()
    for seq in args.seqs:
        q, k, v = make_inputs(KINDS[args.kind], 1, 16, seq, 128, seed=seq)
        problem = describe(q, k, v, causal=False, scale=None, layout="bhsd")
        timing = benchmark(policy.plan, (problem, q, k, v, None), n_repeat=args.calls, n_warmup=5)
        cpu_ms, gpu_ms = timing.cpu_times.mean() * 1e3, timing.gpu_times.mean() * 1e3
        print(f"== {args.kind} S={seq}: plan {cpu_ms:.3f} ms host (CPU), {gpu_ms:.3f} ms device (GPU) per call")
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.calls):
            policy.plan(problem, q, k, v, None)
        cupy.cuda.Device().synchronize()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
