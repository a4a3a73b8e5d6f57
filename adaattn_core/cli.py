"""The `adaattn` command: `adaattn info`, `adaattn run` and `adaattn bench`."""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from . import __version__, bench
from .api import attention
from .bench import CAUSAL_CHOICES, count_type
from .device import capabilities
from .policy import POLICIES
from .problem import describe
from .reference import attention_reference
from .report import Report


def _cmd_info(args: argparse.Namespace) -> int:
    caps = capabilities()
    if args.json:
        print(json.dumps({"adaattn": __version__, **caps.as_dict(), "policies": sorted(POLICIES)}, indent=2))
        return 0
    cc = "n/a" if caps.compute_capability is None else "sm_{}{}".format(*caps.compute_capability)
    print(f"adaattn {__version__}")
    print(f"platform   {caps.platform}, Python {caps.python}, NumPy {caps.numpy}, CuPy {caps.cupy or 'not installed'}")
    print(f"gpu        {caps.gpu or 'none'} (compute capability {cc})")
    print("backends")
    for name, status in caps.backends.items():
        print(f"  {name:<13} {status}")
    print("precisions")
    for name, status in caps.precisions.items():
        print(f"  {name:<13} {status}")
    print(f"policies   {', '.join(sorted(POLICIES))}")
    return 0


def _pick_device(requested: str) -> str:
    if requested != "auto":
        if requested == "gpu" and capabilities().gpu is None:
            raise SystemExit(f"adaattn: --device gpu asked for, but {capabilities().backends['cupy-blocked']}")
        return requested
    return "gpu" if capabilities().gpu is not None else "cpu"


def _cmd_run(args: argparse.Namespace) -> int:
    device = _pick_device(args.device)
    if device == "gpu":
        import cupy as xp
    else:
        xp = np
    dtype = args.dtype or ("bfloat16" if device == "gpu" else "float32")
    heads_kv = args.heads if args.kv_heads is None else args.kv_heads
    seq_k = args.seq if args.seq_k is None else args.seq_k
    q, k, v = bench.random_arrays(
        device,
        [(args.batch, args.heads, args.seq, args.dim), (args.batch, heads_kv, seq_k, args.dim),
         (args.batch, heads_kv, seq_k, args.dim)],
        dtype,
        bench.random_generator(device, args.seed),
    )
    report = Report()
    times = bench.time_calls(lambda i: attention(q, k, v, causal=args.causal, policy=args.policy), warmup=1,
                             repeat=args.repeat, device=device)
    out = attention(q, k, v, causal=args.causal, policy=args.policy, report=report)
    ref, _ = attention_reference(q, k, v, causal=args.causal)
    diff = out.astype(xp.float64) - ref
    max_abs = float(xp.abs(diff).max()) if diff.size else 0.0
    ref_norm = float(xp.linalg.norm(ref))
    rel_l2 = float(xp.linalg.norm(diff)) / ref_norm if ref_norm else 0.0
    median = statistics.median(times)
    flops = describe(q, k, v, causal=args.causal, scale=None, layout="bhsd").flops
    result = {
        "problem": {"batch": args.batch, "heads_q": args.heads, "heads_kv": heads_kv, "seq_q": args.seq,
                    "seq_k": seq_k, "dim": args.dim, "causal": args.causal, "dtype": dtype},
        "backend": report.backend,
        "device": report.device,
        "policy": report.policy,
        "decisions": report.decisions(),
        "time_ms_median": median,
        "time_ms_all": times,
        "tflops": flops / (median * 1e-3) / 1e12 if median > 0 else float("nan"),
        "max_abs_error_vs_float64": max_abs,
        "rel_l2_error_vs_float64": rel_l2,
    }
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    p = result["problem"]
    print(f"problem    B={p['batch']} Hq={p['heads_q']} Hkv={p['heads_kv']} Sq={p['seq_q']} Sk={p['seq_k']} "
          f"D={p['dim']} causal={p['causal']} {dtype}")
    print(f"backend    {report.backend} on {report.device}, policy {report.policy}")
    print(f"time       {median:.3f} ms median of {len(times)} ({result['tflops']:.3f} TFLOP/s)")
    print(f"error      max |out - ref| = {max_abs:.3e}, relative L2 = {rel_l2:.3e} (reference: float64)")
    for label, heads in result["decisions"].items():
        print(f"decision   {label}: heads {heads[0]}..{heads[-1]} ({len(heads)})")
    return 0


class _Progress:
    """tqdm's bar on stderr when tqdm is installed (the `bench` extra), else one counter line per case."""

    def __init__(self, total: int) -> None:
        try:
            from tqdm import tqdm
        except ImportError:
            self.bar = None
        else:
            self.bar = tqdm(total=total, desc="adaattn bench", unit="case", file=sys.stderr, leave=False)

    def __call__(self, done: int, total: int, case: Any) -> None:
        label = f"D={case.dim} S={case.seq} causal={'yes' if case.causal else 'no'} {case.dtype}"
        if self.bar is not None:
            self.bar.n = done
            self.bar.set_postfix_str(label if done < total else "done")
            if done == total:
                self.bar.close()
        elif done < total:
            print(f"[{done + 1}/{total}] {label}", file=sys.stderr, flush=True)


def _cmd_bench(args: argparse.Namespace) -> int:
    device = _pick_device(args.device)
    out_dir = Path(args.out_dir)
    try:  # before the sweep, not after it: a folder that cannot be written would lose the results
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(f"--out-dir {args.out_dir}: expected a folder this user can create or write to, cannot "
                         f"create it ({error.strerror})") from error
    if not os.access(out_dir, os.W_OK | os.X_OK):
        raise ValueError(f"--out-dir {args.out_dir}: expected a folder this user can write to")
    config = bench.SweepConfig.defaults(device, quick=args.quick)
    for name in ("seqs", "dims"):
        values = getattr(args, name)
        if values is not None:
            setattr(config, name, tuple(values))
    for name in ("warmup", "repeat", "tokens", "hidden", "seed"):
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    if args.dtype:
        config.dtypes = tuple(args.dtype)
    config.policies = tuple(args.policy or ("exact",))
    config.causal = CAUSAL_CHOICES[args.causal]
    config.peers = args.peers

    results = bench.sweep(config, progress=_Progress(len(config.cases())))
    print(bench.format_table(results), end="")
    for name, reason in results["peers_skipped"].items():
        print(f"peer {name} skipped: {reason}")
    stem = bench.output_stem(results)
    written = [bench.write_json(results, out_dir / f"{stem}.json")]
    try:
        written.append(bench.plot_results(results, out_dir / f"{stem}.png"))
    except ImportError:
        print("no PNG: matplotlib is not installed (pip install 'adaattn[bench]')", file=sys.stderr)
    print("wrote " + " and ".join(str(path) for path in written))
    return 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="adaattn", description="AdaAttn adaptive attention kernels")
    parser.add_argument("--version", action="version", version=f"adaattn {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="platform, GPU, available backends and precisions")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(handler=_cmd_info)

    run = sub.add_parser("run", help="time one attention call and check it against float64")
    run.add_argument("--batch", type=count_type(1), default=1)
    run.add_argument("--heads", type=count_type(1), default=8, help="query heads")
    run.add_argument("--kv-heads", type=count_type(1), default=None, help="key/value heads (GQA); default = --heads")
    run.add_argument("--seq", type=count_type(1), default=1024, help="query sequence length")
    run.add_argument("--seq-k", type=count_type(0), default=None,
                     help="key sequence length (0: no keys); default = --seq")
    run.add_argument("--dim", type=count_type(1), default=64, help="head dimension")
    run.add_argument("--causal", action="store_true")
    run.add_argument("--dtype", choices=["float16", "bfloat16", "float32", "float64"], default=None,
                     help="default: bfloat16 on a GPU, float32 on the CPU")
    run.add_argument("--policy", choices=sorted(POLICIES), default="exact")
    run.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    run.add_argument("--repeat", type=count_type(1), default=5, help="timed calls after one warm-up")
    run.add_argument("--seed", type=count_type(0), default=None, help="input seed; default: fresh inputs each run")
    run.add_argument("--json", action="store_true", help="print JSON instead of text")
    run.set_defaults(handler=_cmd_run)

    bench_cmd = sub.add_parser("bench", help="forward sweep over S, D, causal: table, JSON and PNG (peers beside us)",
                               description="Times AdaAttn's forward (and torch SDPA / SageAttention when installed) "
                                           "over sequence lengths and head dims: B = tokens // S, H = hidden // D. "
                                           "GPU: CUDA events; CPU: perf_counter. Prints a table and writes "
                                           "<out-dir>/<date>-<device>-fwd.json and .png.")
    bench_cmd.add_argument("--seqs", type=count_type(1), nargs="+", default=None,
                           help="sequence lengths (default: per device)")
    bench_cmd.add_argument("--dims", type=count_type(1), nargs="+", default=None,
                           help="head dims (default: per device)")
    bench_cmd.add_argument("--causal", choices=sorted(CAUSAL_CHOICES), default="both")
    bench_cmd.add_argument("--dtype", nargs="+", choices=["float16", "bfloat16", "float32", "float64"], default=None,
                           help="default: bfloat16 on a GPU, float32 on the CPU")
    bench_cmd.add_argument("--policy", nargs="+", choices=sorted(POLICIES), default=None, help="default: exact")
    bench_cmd.add_argument("--device", choices=["auto", "cpu", "gpu"], default="auto")
    bench_cmd.add_argument("--peers", action=argparse.BooleanOptionalAction, default=True,
                           help="also time torch SDPA backends / SageAttention where installed (default: yes)")
    bench_cmd.add_argument("--out-dir", default="adaattn-bench",
                           help="where the JSON and PNG go (default: %(default)s)")
    bench_cmd.add_argument("--quick", action="store_true", help="a small sweep (GPU: S 1k/4k, D 64/128; CPU: tiny)")
    bench_cmd.add_argument("--tokens", type=count_type(1), default=None, help="B*S (default: 16384 on a GPU)")
    bench_cmd.add_argument("--hidden", type=count_type(1), default=None, help="H*D (default: 2048 on a GPU)")
    bench_cmd.add_argument("--warmup", type=count_type(0), default=None, help="untimed calls before timing")
    bench_cmd.add_argument("--repeat", type=count_type(1), default=None, help="timed calls; the median is reported")
    bench_cmd.add_argument("--seed", type=count_type(0), default=None,
                           help="input seed; default: fresh inputs each run")
    bench_cmd.set_defaults(handler=_cmd_bench)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)  # sizes are checked by their argparse types (count_type)
    try:
        return args.handler(args)
    except (TypeError, ValueError) as error:
        print(f"adaattn: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
