"""Forward attention sweep: AdaAttn's fused kernel beside torch SDPA's backends, same process, same GPU.

FlashAttention-paper setup: B·S = 16k tokens, H·D = 2048, bf16, S ∈ {512 … 16k}, D ∈ {64, 128, 256},
causal and not. TFLOP/s = 4·B·H·Sq·Sk·D / t (halved when causal). The mechanics live in
`adaattn_core.bench` (shared with `adaattn bench` and the asv suite): fresh random inputs rotated among
sets that together exceed L2, warm-up calls, then the median of CUDA-event timings, all on torch's current
stream. Writes JSON with device, driver and versions (the format `readme_table.py` reads).

    python benchmarks/bench_forward.py --out benchmarks/results/<date>-<gpu>-fwd.json

`benchmarks/bench_backward.py` and `bench_fp8.py` import the problem size (TOKENS, HIDDEN), `environment` and
`_median_ms` from here.
"""

from __future__ import annotations

import argparse
import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cupy
import torch
from torch.nn.attention import SDPBackend

from adaattn_core import bench, cuda_forward
from adaattn_core.launch_config import FORWARD_TILES, FORWARD_TILES_SM90, ForwardTile, Sm90Tile

#: The torch SDPA backends timed beside AdaAttn (names as in `adaattn_core.bench.PEERS` and the JSON).
PEERS = {
    "torch-flash": SDPBackend.FLASH_ATTENTION,
    "torch-cudnn": SDPBackend.CUDNN_ATTENTION,
    "torch-efficient": SDPBackend.EFFICIENT_ATTENTION,
}
TOKENS, HIDDEN = 16384, 2048


def _median_ms(fn: Callable[[int], object], warmup: int, repeat: int) -> float:
    """Median milliseconds of ``fn(i)`` (CUDA events on torch's current stream, after `warmup` calls)."""
    with cupy.cuda.Stream.from_external(torch.cuda.current_stream()):
        return bench.median_ms(fn, warmup=warmup, repeat=repeat, device="gpu")


def run_config(seq: int, dim: int, causal: bool, warmup: int, repeat: int) -> dict[str, Any]:
    """One row: AdaAttn and the torch SDPA backends on B = 16384 // S, H = 2048 // D, bf16 inputs."""
    case = bench.Case(seq=seq, dim=dim, causal=causal, batch=TOKENS // seq, heads=HIDDEN // dim, dtype="bfloat16")
    with cupy.cuda.Stream.from_external(torch.cuda.current_stream()):
        row = bench.run_case(case, device="gpu", peers=[bench.PEERS[name] for name in PEERS], warmup=warmup,
                             repeat=repeat, seed=seq * 1000 + dim * 2 + causal)
    bench.free_memory("gpu")
    return row


def environment() -> dict[str, Any]:
    """`adaattn_core.bench.environment` for the GPU, plus the CUDA version torch was built with."""
    env = bench.environment("gpu")
    env["torch"] = torch.__version__
    env["torch_cuda"] = torch.version.cuda
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--out", default=None, help="JSON file to write")
    parser.add_argument("--plot", action="store_true", help="also write a PNG next to --out (needs matplotlib)")
    parser.add_argument("--tile", action="append", default=[], metavar="D:BM,BN,WARPS",
                        help="tuning only: override the forward tiles of head dim D (repeatable)")
    parser.add_argument("--tile90", action="append", default=[], metavar="D[c|n]:BN[,STAGES[,BM]]",
                        help="tuning only: override the sm_90a forward tiles of head dim D, causal (c) or "
                             "non-causal (n) only with a suffix (repeatable)")
    parser.add_argument("--kernel", choices=cuda_forward.KERNEL_CHOICES, default=None,
                        help="force one forward kernel (sets ADAATTN_FORWARD_KERNEL)")
    args = parser.parse_args()
    if args.kernel:
        os.environ["ADAATTN_FORWARD_KERNEL"] = args.kernel
    for override in args.tile90:
        dim, tile = override.split(":")
        which = {"c": (True,), "n": (False,)}.get(dim[-1], (False, True))
        for causal in which:
            FORWARD_TILES_SM90[(int(dim.rstrip("cn")), causal)] = Sm90Tile(*(int(x) for x in tile.split(",")))
    for override in args.tile:
        dim, tile = override.split(":")
        for causal in (False, True):
            FORWARD_TILES[(int(dim), causal)] = ForwardTile(*(int(x) for x in tile.split(",")))

    results = {"env": environment(), "setup": f"B*S={TOKENS}, H*D={HIDDEN}, bf16, [B,H,S,D]", "rows": [],
               "tiles": {f"{d}{'c' if c else ''}": vars(t) for (d, c), t in FORWARD_TILES.items() if d in args.dims},
               "tiles_sm90": {f"{d}{'c' if c else ''}": vars(t) for (d, c), t in FORWARD_TILES_SM90.items()
                              if d in args.dims}}
    print(f"# {results['env']['gpu']}, driver {results['env']['driver']}, torch {results['env']['torch']}")
    print(f"{'D':>4} {'S':>6} {'causal':>6} | {'ours':>6} {'flash':>6} {'cudnn':>6} {'effic':>6} | "
          f"{'/flash':>6} {'/cudnn':>6} | rel_l2")
    for dim in args.dims:
        for causal in (False, True):
            for seq in args.seqs:
                row = run_config(seq, dim, causal, args.warmup, args.repeat)
                results["rows"].append(row)
                t, r = row["tflops"], row["ratio"]

                def fmt(x: float | None) -> str:
                    return "   n/a" if x is None else f"{x:6.1f}"

                def fmt_ratio(x: float | None) -> str:
                    return "   n/a" if x is None else f"{x:6.2f}"

                print(f"{dim:>4} {seq:>6} {causal!s:>6} | {fmt(t['adaattn'])} {fmt(t['torch-flash'])} "
                      f"{fmt(t['torch-cudnn'])} {fmt(t['torch-efficient'])} | {fmt_ratio(r['torch-flash'])} "
                      f"{fmt_ratio(r['torch-cudnn'])} | {row.get('rel_l2_vs_torch_flash', float('nan')):.1e}",
                      flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)
        if args.plot:
            bench.plot_results(results, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
