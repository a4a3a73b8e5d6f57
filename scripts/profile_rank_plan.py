"""Steady-state profile of `RankPolicy.plan` on the GPU: where its milliseconds go once everything is compiled.

    python3 scripts/profile_rank_plan.py [--seqs 8192 32768] [--kind diffuse] [--calls 20]

Per sequence length (B=1, H=16, D=128, bf16, the rank benchmark's synthetic heads): after warm-up plans,
`cupyx.profiler.benchmark` splits a plan's time into host (CPU) and device (GPU) time, then the plan's stages
(those of `RankPolicy._decide` without `spectral`, then the low-rank forward of every head) one at a time, each
started on an idle GPU: its host time (until the call returns), its GPU time (CUDA events around it) and its wall
time (until the GPU is done), medians over `--calls`; a stage whose GPU time is near its host time waits for
launches. Then cProfile lists the host functions of `--calls` plans by own time.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cupy
from cupyx.profiler import benchmark

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]  # bench_rank imports _common as a script would
from adaattn_core import estimators, lowrank  # noqa: E402
from adaattn_core._arrays import to_host64  # noqa: E402
from adaattn_core.problem import AttentionProblem, describe  # noqa: E402
from adaattn_core.rank_policy import RankPolicy  # noqa: E402
from benchmarks.bench_rank import KINDS, make_inputs  # noqa: E402


def stage_times(policy: RankPolicy, problem: AttentionProblem, q: Any, k: Any, v: Any, calls: int) -> None:
    """Prints each plan stage's host, GPU and wall milliseconds (medians; see the module docstring)."""
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    times: dict[str, list[tuple[float, float, float]]] = {}

    def timed(name: str, stage: Callable[..., Any], *args: Any) -> Any:
        cupy.cuda.Device().synchronize()
        begin = time.perf_counter()
        start.record()
        result = stage(*args)
        host = time.perf_counter() - begin
        end.record()
        end.synchronize()
        wall = time.perf_counter() - begin
        times.setdefault(name, []).append((host * 1e3, cupy.cuda.get_elapsed_time(start, end), wall * 1e3))
        return result

    def transfer(stats: Any, errors: Any) -> Any:
        return to_host64(cupy.concatenate([stats, errors[:, None]], axis=1))

    heads = list(range(problem.heads_q))
    rank = min(policy.max_rank, lowrank.balanced_rank(problem.seqlen_q, problem.seqlen_k))
    out = cupy.empty_like(q)
    lse = cupy.empty(q.shape[:3], dtype=cupy.float32)
    for _ in range(calls + 3):  # the first three warm up
        rows = estimators.probe_rows(problem, policy.probe_rows, policy.seed)
        probe = timed("probe (3 Numba kernels)", estimators.probe, problem, q, k, v, rows)
        stats, sinks = timed("head statistics", policy._head_stats, problem, problem.keys_seen(rows), probe)
        prepared = timed("prepare (keys, landmarks)", lowrank.prepare, problem, k, v, heads, rank, sinks)
        errors = timed("guard rows and errors", policy._guard_errors, problem, q, rows, probe, prepared)
        timed("transfer", transfer, stats, errors)
        timed("low-rank forward", lowrank.forward, problem, q, k, v, out, lse, heads, [rank] * len(heads),
              {"prepared": [prepared]})
    print(f"{'stage':>28} | {'host ms':>8} {'GPU ms':>8} {'wall ms':>8}")
    for name, samples in times.items():
        host, gpu, wall = (statistics.median(x[i] for x in samples[3:]) for i in range(3))
        print(f"{name:>28} | {host:8.3f} {gpu:8.3f} {wall:8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, nargs="+", default=[8192, 32768])
    parser.add_argument("--kind", choices=list(KINDS), default="diffuse")
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--probe-only", action="store_true",
                        help="only run the probe --calls times (for ncu: ncu --metrics gpu__time_duration.sum ...)")
    args = parser.parse_args()
    policy = RankPolicy()
    for seq in args.seqs:
        q, k, v = make_inputs(KINDS[args.kind], 1, 16, seq, 128, seed=seq)
        problem = describe(q, k, v, causal=False, scale=None, layout="bhsd")
        if args.probe_only:
            rows = estimators.probe_rows(problem, policy.probe_rows, policy.seed)
            for _ in range(args.calls):
                estimators.probe(problem, q, k, v, rows)
            cupy.cuda.Device().synchronize()
            continue
        timing = benchmark(policy.plan, (problem, q, k, v, None), n_repeat=args.calls, n_warmup=5)
        cpu_ms, gpu_ms = timing.cpu_times.mean() * 1e3, timing.gpu_times.mean() * 1e3
        print(f"== {args.kind} S={seq}: plan {cpu_ms:.3f} ms host (CPU), {gpu_ms:.3f} ms device (GPU) per call")
        stage_times(policy, problem, q, k, v, args.calls)
        profiler = cProfile.Profile()
        profiler.enable()
        for _ in range(args.calls):
            policy.plan(problem, q, k, v, None)
        cupy.cuda.Device().synchronize()
        profiler.disable()
        pstats.Stats(profiler).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
