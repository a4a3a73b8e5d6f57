"""Host overhead of each adapter: µs per call at B=1, H=1, S=64, D=64 (bf16, GPU), back-to-back calls.

Prints each path's µs per call (best of 5 rounds) and its extra over the core call on CuPy arrays and over torch SDPA
(issue #5's target: adapter − SDPA ≤ 15 µs). `--profile` adds cProfile's top entries for the torch adapter
and the core call. Run on the GPU machine: `python3 scripts/adapter_overhead.py [--calls N] [--profile]`.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import time
from collections.abc import Callable

import cupy as cp
import numpy as np
import torch
import torch.nn.functional as F
from adaattn_adapters import numpy as ada_np
from adaattn_adapters import torch as ada_torch

import adaattn_core as aa

ROUNDS = 5


def per_call_us(fn: Callable[[], object], sync: Callable[[], None], calls: int) -> float:
    """Best of ROUNDS rounds of `calls` back-to-back calls (the host is shared: the minimum is the cost,
    the rest is interference)."""
    for _ in range(20):
        fn()
    best = float("inf")
    for _ in range(ROUNDS):
        sync()
        began = time.perf_counter()
        for _ in range(calls // ROUNDS):
            fn()
        sync()
        best = min(best, (time.perf_counter() - began) / (calls // ROUNDS) * 1e6)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--profile", action="store_true", help="cProfile the torch adapter and the core call")
    args = parser.parse_args()
    calls = args.calls

    shape = (1, 1, 64, 64)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    cq, ck, cv = (cp.from_dlpack(x) for x in (q, k, v))
    qg, kg, vg = (x.clone().requires_grad_() for x in (q, k, v))
    rows: list[tuple[str, float]] = []
    sync = torch.cuda.synchronize

    rows.append(("torch SDPA", per_call_us(lambda: F.scaled_dot_product_attention(q, k, v), sync, calls)))
    rows.append(("core on CuPy arrays", per_call_us(lambda: aa.attention(cq, ck, cv), sync, calls)))
    rows.append(("torch adapter attention", per_call_us(lambda: ada_torch.attention(q, k, v), sync, calls)))
    rows.append(("torch adapter, requires_grad", per_call_us(lambda: ada_torch.attention(qg, kg, vg), sync, calls)))
    rows.append(("torch adapter SDPA drop-in",
                 per_call_us(lambda: ada_torch.scaled_dot_product_attention(q, k, v), sync, calls)))

    for name, fn in (("torch SDPA, CUDA graph replay", lambda: F.scaled_dot_product_attention(q, k, v)),
                     ("torch adapter, CUDA graph replay", lambda: ada_torch.attention(q, k, v))):
        graph = torch.cuda.CUDAGraph()
        with torch.no_grad(), torch.cuda.graph(graph):
            fn()
        rows.append((name, per_call_us(graph.replay, sync, calls)))

    os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")   # leave GPU memory to CuPy and torch
    try:
        import jax
        import jax.numpy as jnp
        from adaattn_adapters import jax as ada_jax

        jq, jk, jv = (jnp.asarray(np.asarray(x.float().cpu()).transpose(0, 2, 1, 3), jnp.bfloat16) for x in (q, k, v))
        ours = jax.jit(lambda q, k, v: ada_jax.attention(q, k, v))
        theirs = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v))
        box: list = [None]

        def jax_sync() -> None:
            if box[0] is not None:
                box[0].block_until_ready()

        def call(fn: Callable) -> Callable[[], None]:
            def run() -> None:
                box[0] = fn(jq, jk, jv)
            return run

        rows.append(("jax.nn.dot_product_attention (jit)", per_call_us(call(theirs), jax_sync, calls)))
        rows.append(("jax adapter (jit)", per_call_us(call(ours), jax_sync, calls)))
    except ImportError as error:
        print(f"jax skipped: {error}")

    hq, hk, hv = (np.asarray(x.float().cpu()) for x in (q, k, v))
    rows.append(("numpy adapter, float32 host arrays (2 copies)",
                 per_call_us(lambda: ada_np.attention(hq, hk, hv), lambda: None, max(calls // 10, 50))))

    if args.profile:
        # Where the torch adapter's time goes, piece by piece (µs per call, no synchronisation needed).
        out_t, lse_t = ada_torch._forward(q, k, v, False, None, "bhsd", "exact", False)
        co, cl = ada_torch._to_core(out_t), ada_torch._to_core(lse_t)

        def stream_context() -> None:
            with ada_torch._on_callers_stream(q):
                pass

        pieces = {
            "torch.empty (out)": lambda: torch.empty(q.shape, dtype=q.dtype, device=q.device),
            "_on_callers_stream enter+exit": stream_context,
            "torch.cuda.current_stream()": lambda: torch.cuda.current_stream(0),
            "_to_core (one tensor)": lambda: ada_torch._to_core(q),
            "cupy.from_dlpack(tensor) (protocol)": lambda: cp.from_dlpack(q),
            "core with out= and lse_out=": lambda: aa.attention(cq, ck, cv, out=co, lse_out=cl),
            "describe (remembered)": lambda: aa.problem.describe(cq, ck, cv, causal=False, scale=None,
                                                                 layout="bhsd"),
        }
        for name, fn in pieces.items():
            print(f"piece {name:40s} {per_call_us(fn, sync, calls):8.2f} us")
        for name, fn in (("torch adapter attention", lambda: ada_torch.attention(q, k, v)),
                         ("core on CuPy arrays", lambda: aa.attention(cq, ck, cv))):
            profiler = cProfile.Profile()
            profiler.runcall(lambda fn=fn: [fn() for _ in range(calls)])
            print(f"--- cProfile: {name}, {calls} calls")
            pstats.Stats(profiler).sort_stats("tottime").print_stats(14)

    base = dict(rows)
    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, CuPy {cp.__version__}; "
          f"B,H,S,D = {shape}, bf16 (numpy row: float32); {calls} calls")
    print(f"{'path':48s} {'us/call':>9s} {'- core':>9s} {'- SDPA':>9s}")
    for name, us in rows:
        print(f"{name:48s} {us:9.1f} {us - base['core on CuPy arrays']:9.1f} {us - base['torch SDPA']:9.1f}")


if __name__ == "__main__":
    main()
