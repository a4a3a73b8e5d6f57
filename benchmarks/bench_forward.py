"""Forward attention sweep: AdaAttn's fused kernel beside torch SDPA's backends, same process, same GPU.

FlashAttention-paper setup: B·S = 16k tokens, H·D = 2048, bf16, S ∈ {512 … 16k}, D ∈ {64, 128, 256},
causal and not. TFLOP/s = 4·B·H·Sq·Sk·D / t (halved when causal). Each implementation is timed with
CUDA events on torch's current stream: fresh random inputs (rotated among 2 sets, each larger than L2),
warm-up calls, then the median of the timed calls. Writes JSON with device, driver and versions.

    python benchmarks/bench_forward.py --out benchmarks/results/<date>-<gpu>-fwd.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
from collections.abc import Callable

import cupy
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

import adaattn_core as aa
from adaattn_core import cuda_forward
from adaattn_core.launch_config import FORWARD_TILES, FORWARD_TILES_SM90, ForwardTile, Sm90Tile

PEERS = {
    "torch-flash": SDPBackend.FLASH_ATTENTION,
    "torch-cudnn": SDPBackend.CUDNN_ATTENTION,
    "torch-efficient": SDPBackend.EFFICIENT_ATTENTION,
}


def _median_ms(fn: Callable[[int], object], warmup: int, repeat: int) -> float:
    for i in range(warmup):
        fn(i)
    start = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    stop = [torch.cuda.Event(enable_timing=True) for _ in range(repeat)]
    for i in range(repeat):
        start[i].record()
        fn(i)
        stop[i].record()
    torch.cuda.synchronize()
    return statistics.median(a.elapsed_time(b) for a, b in zip(start, stop))


def _ours(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, causal: bool) -> torch.Tensor:
    out = torch.empty_like(q)
    with cupy.cuda.Stream.from_external(torch.cuda.current_stream()):
        aa.attention(cupy.from_dlpack(q), cupy.from_dlpack(k), cupy.from_dlpack(v), causal=causal,
                     out=cupy.from_dlpack(out))
    return out


def run_config(seq: int, dim: int, causal: bool, warmup: int, repeat: int) -> dict:
    batch, heads = 16384 // seq, 2048 // dim
    gen = torch.Generator(device="cuda").manual_seed(seq * 1000 + dim * 2 + causal)
    sets = [
        [torch.randn(batch, heads, seq, dim, device="cuda", dtype=torch.bfloat16, generator=gen) for _ in range(3)]
        for _ in range(2)
    ]
    flops = 4.0 * batch * heads * seq * seq * dim / (2 if causal else 1)
    row = {"seq": seq, "dim": dim, "causal": causal, "batch": batch, "heads": heads, "tflops": {}, "ms": {}}

    impls: dict[str, Callable[[int], object]] = {"adaattn": lambda i: _ours(*sets[i % 2], causal)}
    for name, backend in PEERS.items():
        def peer(i: int, backend: SDPBackend = backend) -> object:
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(*sets[i % 2], is_causal=causal)
        impls[name] = peer

    reference = None
    for name, fn in impls.items():
        try:
            result = fn(0)
            torch.cuda.synchronize()
        except RuntimeError as error:  # backend does not support this shape
            row["ms"][name] = None
            row["tflops"][name] = None
            row.setdefault("unsupported", {})[name] = str(error).splitlines()[0][:200]
            continue
        if name == "adaattn":
            reference = result
        elif name == "torch-flash" and reference is not None:
            diff = (reference.float() - result.float()).norm() / result.float().norm()
            row["rel_l2_vs_torch_flash"] = float(diff)
        ms = _median_ms(fn, warmup, repeat)
        row["ms"][name] = ms
        row["tflops"][name] = flops / (ms * 1e-3) / 1e12
    ours = row["tflops"]["adaattn"]
    row["ratio"] = {name: (ours / t if t else None) for name, t in row["tflops"].items() if name != "adaattn"}
    return row


def environment() -> dict:
    props = torch.cuda.get_device_properties(0)
    driver = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                            capture_output=True, text=True).stdout.strip()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "gpu": props.name,
        "sm_count": props.multi_processor_count,
        "compute_capability": f"{props.major}.{props.minor}",
        "driver": driver,
        "cuda_runtime": torch.version.cuda,
        "nvrtc": ".".join(map(str, cupy.cuda.nvrtc.getVersion())),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cupy": cupy.__version__,
        "adaattn": aa.__version__,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, nargs="+", default=[512, 1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--dims", type=int, nargs="+", default=[64, 128, 256])
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeat", type=int, default=30)
    parser.add_argument("--out", default=None, help="JSON file to write")
    parser.add_argument("--tile", action="append", default=[], metavar="D:BM,BN,WARPS",
                        help="tuning only: override the forward tiles of head dim D (repeatable)")
    parser.add_argument("--tile90", action="append", default=[], metavar="D:BM,BN",
                        help="tuning only: override the sm_90a forward tiles of head dim D (repeatable)")
    parser.add_argument("--kernel", choices=cuda_forward.KERNEL_CHOICES, default=None,
                        help="force the mma.sync kernel on Hopper (sets ADAATTN_FORWARD_KERNEL)")
    args = parser.parse_args()
    if args.kernel:
        os.environ["ADAATTN_FORWARD_KERNEL"] = args.kernel
    for override in args.tile90:
        dim, tile = override.split(":")
        for causal in (False, True):
            FORWARD_TILES_SM90[(int(dim), causal)] = Sm90Tile(*(int(x) for x in tile.split(",")))
    for override in args.tile:
        dim, tile = override.split(":")
        for causal in (False, True):
            FORWARD_TILES[(int(dim), causal)] = ForwardTile(*(int(x) for x in tile.split(",")))

    results = {"env": environment(), "setup": "B*S=16384, H*D=2048, bf16, [B,H,S,D]", "rows": [],
               "tiles": {f"{d}{'c' if c else ''}": vars(t) for (d, c), t in FORWARD_TILES.items() if d in args.dims}}
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


if __name__ == "__main__":
    main()
