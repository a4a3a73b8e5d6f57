"""Forward attention sweep: AdaAttn's fused kernel beside torch SDPA's backends, same process, same GPU.

FlashAttention-paper setup: B·S = 16k tokens, H·D = 2048, bf16, S ∈ {512 … 16k}, D ∈ {64, 128, 256},
causal and not. TFLOP/s = 4·B·H·Sq·Sk·D / t (halved when causal). The mechanics live in
`adaattn_core.bench` (shared with `adaattn bench` and the asv suite): fresh random inputs rotated among
sets that together exceed L2, warm-up calls, then the median of CUDA-event timings, all on torch's current
stream, the implementations taking turns call by call (so the GPU's clock drift falls on all alike).
Writes JSON with device, driver and versions (the format `readme_table.py` reads).

    python benchmarks/bench_forward.py --out benchmarks/results/<date>-<gpu>-fwd.json

What the scripts share beyond `adaattn_core.bench` (environment, command line, loop, output) is in `_common.py`.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from _common import PAPER_SIZES, environment, headline, paper_grid, prefix, run_grid, save, sweep_parser

from adaattn_core import bench, cuda_forward, launch_config
from adaattn_core.bench import format_number
from adaattn_core.launch_config import (
    FORWARD_TILES,
    FORWARD_TILES_SM90,
    SHORT_TILES_SM90,
    ForwardTile,
    Sm90Tile,
)

#: The torch SDPA backends timed beside AdaAttn (names as in `adaattn_core.bench.PEERS` and the JSON).
PEERS = ("torch-flash", "torch-cudnn", "torch-efficient")


def run_config(seq: int, dim: int, causal: bool, warmup: int, repeat: int) -> dict[str, Any]:
    """One row: AdaAttn and the torch SDPA backends on B = 16384 // S, H = 2048 // D, bf16 inputs."""
    case = bench.paper_case(seq, dim, causal)
    return bench.run_case(case, device="gpu", peers=[bench.PEERS[name] for name in PEERS], warmup=warmup,
                          repeat=repeat, seed=bench.case_seed(case))


def _line(row: dict[str, Any]) -> str:
    t, r = row["tflops"], row.get("ratio", {})
    return (f"{prefix(row)} | {format_number(t.get('adaattn'), '6.1f')} "
            f"{format_number(t.get('torch-flash'), '6.1f')} {format_number(t.get('torch-cudnn'), '6.1f')} "
            f"{format_number(t.get('torch-efficient'), '6.1f')} | {format_number(r.get('torch-flash'), '6.2f')} "
            f"{format_number(r.get('torch-cudnn'), '6.2f')} | {row.get('rel_l2_vs_torch_flash', float('nan')):.1e}")


def tile_type(kind: type, syntax: str, least: int, most: int) -> Callable[[str], tuple[list[tuple[int, bool]], Any]]:
    """An argparse type for a tile override "D[c|n]:N,N,...": its (head dim, causal) keys (both unless c or n
    follows D) and the tile `kind`(*numbers) of `least` to `most` numbers >= 1 (argparse names the option)."""

    def parse(text: str) -> tuple[list[tuple[int, bool]], Any]:
        dim, _, numbers = text.partition(":")
        suffix = dim[-1:] if dim[-1:] in ("c", "n") else ""
        head_dim, fields = dim[: len(dim) - len(suffix)], numbers.split(",")
        positive = all(f.isdigit() and int(f) > 0 for f in fields)
        if not (head_dim.isdigit() and least <= len(fields) <= most and positive):
            raise argparse.ArgumentTypeError(f"{text!r}: expected {syntax} with numbers >= 1")
        causal = {"c": (True,), "n": (False,)}.get(suffix, (False, True))
        return [(int(head_dim), c) for c in causal], kind(*map(int, fields))

    parse.__name__ = syntax
    return parse


def _tiles(table: dict[tuple[int, bool], Any], dims: list[int]) -> dict[str, dict[str, Any]]:
    """A tile table as the results file records it: {"64": {...}, "64c": {...}} for the swept head dims."""
    return {f"{d}{'c' if c else ''}": vars(t) for (d, c), t in table.items() if d in dims}


def main() -> None:
    parser = sweep_parser(__doc__, seqs=[512, 1024, 2048, 4096, 8192, 16384], dims=[64, 128, 256], repeat=30)
    parser.add_argument("--plot", action="store_true", help="also write a PNG next to --out (needs matplotlib)")
    parser.add_argument("--tile", action="append", default=[], metavar="D[c|n]:BM,BN,WARPS",
                        type=tile_type(ForwardTile, "D[c|n]:BM,BN,WARPS", 3, 3),
                        help="tuning only: override the mma.sync forward tiles of head dim D, causal (c) or "
                             "non-causal (n) only with a suffix (repeatable)")
    parser.add_argument("--tile90", action="append", default=[], metavar="D[c|n]:BN[,STAGES[,BM]]",
                        type=tile_type(Sm90Tile, "D[c|n]:BN[,STAGES[,BM]]", 1, 3),
                        help="tuning only: override the sm_90a forward tiles of head dim D, causal (c) or "
                             "non-causal (n) only with a suffix (repeatable)")
    parser.add_argument("--causal-section-bytes", type=bench.count_type(0), default=None, metavar="BYTES",
                        help="tuning only: the causal wgmma forward's L2 budget per section of heads "
                             "(launch_config.CAUSAL_SECTION_BYTES; 0: one (batch, head) pair per section)")
    parser.add_argument("--kernel", choices=cuda_forward.KERNEL_CHOICES, default=None,
                        help="force one forward kernel (sets ADAATTN_FORWARD_KERNEL)")
    args = parser.parse_args()
    if args.kernel:
        os.environ["ADAATTN_FORWARD_KERNEL"] = args.kernel
    for keys, tile in args.tile90:
        for key in keys:  # one tile at every length: the override replaces the short-sequence tile too
            FORWARD_TILES_SM90[key] = tile
            SHORT_TILES_SM90.pop(key, None)
    for keys, tile in args.tile:
        FORWARD_TILES.update(dict.fromkeys(keys, tile))
    if args.causal_section_bytes is not None:
        launch_config.CAUSAL_SECTION_BYTES = args.causal_section_bytes

    results = {"env": environment(timing=bench.TIMING), "setup": f"{PAPER_SIZES}, bf16, [B,H,S,D]", "rows": [],
               "kernel": cuda_forward.kernel_choice(), "causal_section_bytes": launch_config.CAUSAL_SECTION_BYTES,
               "tiles": _tiles(FORWARD_TILES, args.dims),
               "tiles_sm90": _tiles(FORWARD_TILES_SM90, args.dims),
               "short_tiles_sm90": _tiles(SHORT_TILES_SM90, args.dims)}
    print(headline(results["env"]))
    print(f"{'D':>4} {'S':>6} {'causal':>6} | {'ours':>6} {'flash':>6} {'cudnn':>6} {'effic':>6} | "
          f"{'/flash':>6} {'/cudnn':>6} | rel_l2")
    results["rows"] = run_grid(paper_grid(args), run_config, _line, warmup=args.warmup, repeat=args.repeat)
    save(results, args.out)
    if args.out and args.plot:
        bench.plot_results(results, Path(args.out).with_suffix(".png"))


if __name__ == "__main__":
    main()
