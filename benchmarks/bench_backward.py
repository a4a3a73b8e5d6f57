"""Forward + backward attention sweep: AdaAttn's fused kernels beside torch SDPA's flash and cuDNN backends.

FlashAttention-paper setup: B·S = 16k tokens, H·D = 2048, bf16, S ∈ {1k … 16k}, D ∈ {64, 128}, causal and
not. One timed call = forward and backward of one attention: ours through `adaattn_core.attention`
(return_lse=True) and `attention_backward` on CuPy arrays; torch's through `scaled_dot_product_attention`
on tensors requiring grad, then `torch.autograd.grad(out, (q, k, v), dout)` (no .grad accumulation). TFLOP/s =
3.5 × forward FLOPs / t (forward 4·B·H·S²·D, backward 2.5× that; halved when causal). Inputs and dout are
fresh random sets rotated so that they exceed L2 (`adaattn_core.bench.make_input_sets`); timing is
`adaattn_core.bench.time_row` (warm-up calls, then the median of CUDA events on torch's current stream,
the implementations taking turns call by call).
Writes JSON with device, driver and versions.

    python benchmarks/bench_backward.py --out benchmarks/results/<date>-<gpu>-bwd.json
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from _common import PAPER_SIZES, environment, headline, paper_grid, prefix, run_grid, save, sweep_parser
from torch.nn.attention import SDPBackend, sdpa_kernel

import adaattn_core as aa
from adaattn_core import bench
from adaattn_core.bench import format_number
from adaattn_core.launch_config import BACKWARD_DQ_TILES, BACKWARD_TILES

#: The torch SDPA backends timed beside AdaAttn (names as in the forward results).
PEERS = {"torch-flash": SDPBackend.FLASH_ATTENTION, "torch-cudnn": SDPBackend.CUDNN_ATTENTION}


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


def run_config(seq: int, dim: int, causal: bool, warmup: int, repeat: int) -> dict[str, Any]:
    """One row: forward + backward of AdaAttn and the torch SDPA backends on B = 16384 // S, H = 2048 // D."""
    case = bench.paper_case(seq, dim, causal)
    flops = bench.FWD_BWD_FLOP_FACTOR * case.flops
    row: dict[str, Any] = {"seq": seq, "dim": dim, "causal": causal, "batch": case.batch, "heads": case.heads,
                           "flops": flops, "tflops": {}, "ms": {}}
    # (q, k, v, dout) sets that together exceed L2
    sets = bench.make_input_sets(case, "gpu", seed=bench.case_seed(case), arrays=4)
    impls = {"adaattn": _ours(sets, causal)}
    impls.update({name: _peer(sets, causal, backend) for name, backend in PEERS.items()})
    reference = None
    runs = {}
    for name, fn in impls.items():
        try:
            grads = fn(0)
            torch.cuda.synchronize()
        except RuntimeError as error:  # backend does not support this shape
            bench.unsupported(row, name, error)
            continue
        if name == "adaattn":
            reference = grads
        elif name == "torch-flash" and reference is not None:
            row["rel_l2_vs_torch_flash"] = {g: bench.device_rel_l2(a, b)
                                            for g, a, b in zip(("dq", "dk", "dv"), reference, grads)}
        del grads
        runs[name] = fn
    bench.time_row(row, runs, flops=flops, warmup=warmup, repeat=repeat, device="gpu")
    ours = row["tflops"]["adaattn"]
    row["ratio"] = {name: (ours / t if t and ours else None) for name, t in row["tflops"].items() if name != "adaattn"}
    return row


def _line(row: dict[str, Any]) -> str:
    t, r = row["tflops"], row["ratio"]
    errors = " ".join(f"{e:.1e}" for e in row.get("rel_l2_vs_torch_flash", {}).values())
    return (f"{prefix(row)} | {format_number(t['adaattn'], '6.1f')} "
            f"{format_number(t['torch-flash'], '6.1f')} {format_number(t['torch-cudnn'], '6.1f')} | "
            f"{format_number(r['torch-flash'], '6.2f')} {format_number(r['torch-cudnn'], '6.2f')} | {errors}")


def main() -> None:
    parser = sweep_parser(__doc__, seqs=[1024, 2048, 4096, 8192, 16384], dims=[64, 128], repeat=20)
    args = parser.parse_args()

    results = {"env": environment(timing=bench.TIMING),
               "setup": f"{PAPER_SIZES}, bf16, [B,H,S,D], forward + backward", "rows": [],
               "tiles": {"dkdv": {d: vars(t) for d, t in BACKWARD_TILES.items() if d in args.dims},
                         "dq": {d: vars(t) for d, t in BACKWARD_DQ_TILES.items() if d in args.dims}}}
    print(headline(results["env"]))
    print(f"{'D':>4} {'S':>6} {'causal':>6} | {'ours':>6} {'flash':>6} {'cudnn':>6} | {'/flash':>6} {'/cudnn':>6} | "
          "rel_l2 dq dk dv vs flash")
    results["rows"] = run_grid(paper_grid(args), run_config, _line, warmup=args.warmup, repeat=args.repeat)
    save(results, args.out)


if __name__ == "__main__":
    main()
