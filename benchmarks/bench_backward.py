"""Forward + backward attention sweep: AdaAttn's fused kernels beside torch SDPA's flash and cuDNN backends.

FlashAttention-paper setup: B·S = 16k tokens, H·D = 2048, bf16, S ∈ {1k … 16k}, D ∈ {64, 128}, causal and
not. One timed call = forward and backward of one attention: ours through `adaattn_core.attention`
(return_lse=True) and `attention_backward` on CuPy arrays; torch's through `scaled_dot_product_attention`
on tensors requiring grad, then `torch.autograd.grad(out, (q, k, v), dout)` (no .grad accumulation). TFLOP/s =
3.5 × forward FLOPs / t (forward 4·B·H·S²·D, backward 2.5× that; halved when causal). Inputs and dout are
fresh random sets rotated so that they exceed L2; timing is `bench_forward._median_ms` (warm-up calls, then
the median of CUDA events on torch's current stream). Writes JSON with device, driver and versions.

    python benchmarks/bench_backward.py --out benchmarks/results/<date>-<gpu>-bwd.json
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Callable
from typing import Any

import cupy
import torch
import torch.nn.functional as F
from bench_forward import HIDDEN, TOKENS, _median_ms, environment  # benchmarks/ is the script's directory
from torch.nn.attention import SDPBackend, sdpa_kernel

import adaattn_core as aa
from adaattn_core import bench
from adaattn_core.launch_config import BACKWARD_DQ_TILES, BACKWARD_TILES

#: The torch SDPA backends timed beside AdaAttn (names as in the forward results).
PEERS = {"torch-flash": SDPBackend.FLASH_ATTENTION, "torch-cudnn": SDPBackend.CUDNN_ATTENTION}
#: Forward + backward FLOPs per forward FLOP (FlashAttention-2 paper's count: backward = 2.5 × forward).
FWD_BWD_FLOP_FACTOR = 3.5


def _input_sets(case: bench.Case, seed: int) -> list[tuple[Any, Any, Any, Any]]:
    """(q, k, v, dout) CuPy sets of `case`, enough of them that together they exceed L2."""
    set_bytes = 4 * math.prod(case.shape) * 2
    count = bench.input_set_count(set_bytes, bench.cache_bytes("gpu"))
    rng = cupy.random.default_rng(seed)
    return [tuple(rng.standard_normal(case.shape, dtype=cupy.float32).astype(case.dtype) for _ in range(4))
            for _ in range(count)]


def _ours(sets: list[tuple[Any, ...]], causal: bool) -> Callable[[int], tuple[Any, ...]]:
    def call(i: int) -> tuple[Any, ...]:
        q, k, v, dout = sets[i % len(sets)]
        out, lse = aa.attention(q, k, v, causal=causal, return_lse=True)
        return aa.attention_backward(dout, q, k, v, out, lse, causal=causal)

    return call


def _peer(sets: list[tuple[Any, ...]], causal: bool, backend: SDPBackend) -> Callable[[int], tuple[Any, ...]]:
    tensors = [[bench.to_torch(x) for x in s] for s in sets]
    for s in tensors:
        for x in s[:3]:
            x.requires_grad_(True)

    def call(i: int) -> tuple[Any, ...]:
        q, k, v, dout = tensors[i % len(tensors)]
        with sdpa_kernel(backend):
            out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)
        return torch.autograd.grad(out, (q, k, v), dout)

    return call


def _rel_l2(ours: Any, theirs: torch.Tensor) -> float:
    a = bench.to_torch(ours).float()
    b = theirs.float()
    return float((a - b).norm() / b.norm())


def run_config(seq: int, dim: int, causal: bool, warmup: int, repeat: int) -> dict[str, Any]:
    """One row: forward + backward of AdaAttn and the torch SDPA backends on B = 16384 // S, H = 2048 // D."""
    case = bench.Case(seq=seq, dim=dim, causal=causal, batch=TOKENS // seq, heads=HIDDEN // dim, dtype="bfloat16")
    flops = FWD_BWD_FLOP_FACTOR * bench.forward_flops(case.batch, case.heads, seq, seq, dim, causal)
    row: dict[str, Any] = {"seq": seq, "dim": dim, "causal": causal, "batch": case.batch, "heads": case.heads,
                           "flops": flops, "tflops": {}, "ms": {}}
    with cupy.cuda.Stream.from_external(torch.cuda.current_stream()):
        sets = _input_sets(case, seed=seq * 1000 + dim * 2 + causal)
        impls = {"adaattn": _ours(sets, causal)}
        impls.update({name: _peer(sets, causal, backend) for name, backend in PEERS.items()})
        reference = None
        for name, fn in impls.items():
            try:
                grads = fn(0)
                torch.cuda.synchronize()
            except RuntimeError as error:  # backend does not support this shape
                row["ms"][name] = row["tflops"][name] = None
                row.setdefault("unsupported", {})[name] = str(error).splitlines()[0][:200]
                continue
            if name == "adaattn":
                reference = grads
            elif name == "torch-flash" and reference is not None:
                row["rel_l2_vs_torch_flash"] = {g: _rel_l2(a, b) for g, a, b in zip(("dq", "dk", "dv"), reference,
                                                                                      grads)}
            del grads
            ms = _median_ms(fn, warmup, repeat)
            row["ms"][name] = ms
            row["tflops"][name] = bench.tflops(flops, ms)
    ours = row["tflops"]["adaattn"]
    row["ratio"] = {name: (ours / t if t and ours else None) for name, t in row["tflops"].items() if name != "adaattn"}
    del sets, impls, reference
    bench.free_memory("gpu")  # CuPy's pool and torch's cache
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--out", default=None, help="JSON file to write")
    args = parser.parse_args()

    results = {"env": environment(), "setup": f"B*S={TOKENS}, H*D={HIDDEN}, bf16, [B,H,S,D], forward + backward",
               "rows": [],
               "tiles": {"dkdv": {d: vars(t) for d, t in BACKWARD_TILES.items() if d in args.dims},
                         "dq": {d: vars(t) for d, t in BACKWARD_DQ_TILES.items() if d in args.dims}}}
    print(f"# {results['env']['gpu']}, driver {results['env']['driver']}, torch {results['env']['torch']}")
    print(f"{'D':>4} {'S':>6} {'causal':>6} | {'ours':>6} {'flash':>6} {'cudnn':>6} | {'/flash':>6} {'/cudnn':>6} | "
          "rel_l2 dq dk dv vs flash")

    def fmt(x: float | None, spec: str) -> str:
        return "   n/a" if x is None else format(x, spec)

    for dim in args.dims:
        for causal in (False, True):
            for seq in args.seqs:
                row = run_config(seq, dim, causal, args.warmup, args.repeat)
                results["rows"].append(row)
                t, r = row["tflops"], row["ratio"]
                errors = " ".join(f"{e:.1e}" for e in row.get("rel_l2_vs_torch_flash", {}).values())
                print(f"{dim:>4} {seq:>6} {causal!s:>6} | {fmt(t['adaattn'], '6.1f')} {fmt(t['torch-flash'], '6.1f')} "
                      f"{fmt(t['torch-cudnn'], '6.1f')} | {fmt(r['torch-flash'], '6.2f')} "
                      f"{fmt(r['torch-cudnn'], '6.2f')} | {errors}", flush=True)
    if args.out:
        print(f"wrote {bench.write_json(results, args.out)}")


if __name__ == "__main__":
    main()
