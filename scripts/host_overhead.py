"""Host overhead per call: many back-to-back calls on a tiny problem, µs per call (ours vs torch SDPA)."""

import time

import cupy as cp
import torch
import torch.nn.functional as F

import adaattn_core as aa

q, k, v = (torch.randn(1, 1, 64, 64, device="cuda", dtype=torch.bfloat16) for _ in range(3))
cq, ck, cv = (cp.from_dlpack(x) for x in (q, k, v))


def per_call_us(fn, calls=2000):
    fn()
    torch.cuda.synchronize()
    began = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - began) / calls * 1e6


print(f"adaattn core call (CuPy arrays): {per_call_us(lambda: aa.attention(cq, ck, cv)):.1f} us")
print(f"torch SDPA call:                 {per_call_us(lambda: F.scaled_dot_product_attention(q, k, v)):.1f} us")

if __name__ == "__main__":
    import cProfile
    import pstats

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(2000):
        aa.attention(cq, ck, cv)
    profiler.disable()
    pstats.Stats(profiler).sort_stats("tottime").print_stats(22)
