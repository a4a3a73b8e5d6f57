"""What the GPU benchmark scripts (`bench_*.py`) share beyond `adaattn_core.bench` (inputs, timing, problem
shapes, number formatting): the environment record with torch's versions, the sweep's command line, the
D × causal × S loop that prints a line per row, and writing the results file.

Imports neither CuPy nor torch (functions import them when called), so `bench_forward.py`, `bench_fp8.py`
and `bench_rank.py` answer ``--help`` without them; `bench_backward.py` needs torch.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
from collections.abc import Callable, Sequence
from typing import Any

from adaattn_core import bench

Row = dict[str, Any]
#: The FlashAttention papers' problem sizes as the results files' "setup" names them.
PAPER_SIZES = f"B*S={bench.PAPER_TOKENS}, H*D={bench.PAPER_HIDDEN}"


def environment(*, torch_cuda: bool = True) -> dict[str, Any]:
    """`adaattn_core.bench.environment` for the GPU (which records torch's version) plus, with `torch_cuda` and torch
    installed, the CUDA version torch was built with (key ``torch_cuda``)."""
    env = bench.environment("gpu")
    if torch_cuda and importlib.util.find_spec("torch") is not None:
        import torch

        env["torch_cuda"] = torch.version.cuda
    return env


def headline(env: dict[str, Any], package: str = "torch") -> str:
    """The first line a script prints: GPU, driver and the version of `package`."""
    return f"# {env['gpu']}, driver {env['driver']}, {package} {env.get(package)}"


def sweep_parser(doc: str | None, *, seqs: Sequence[int], dims: Sequence[int], repeat: int,
                 warmup: int = 5) -> argparse.ArgumentParser:
    """The options every sweep takes (--seqs, --dims, --warmup, --repeat, --out); scripts add their own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=int, nargs="+", default=list(seqs))
    parser.add_argument("--dims", type=int, nargs="+", default=list(dims))
    parser.add_argument("--warmup", type=int, default=warmup)
    parser.add_argument("--repeat", type=int, default=repeat)
    parser.add_argument("--out", default=None, help="JSON file to write")
    return parser


def run_grid(args: argparse.Namespace, run_config: Callable[[int, int, bool, int, int], Row],
             line: Callable[[Row], str]) -> list[Row]:
    """``run_config(seq, dim, causal, warmup, repeat)`` for every D, then causal (no, yes), then S of `args`
    (table order); prints ``line(row)`` as each row arrives. A configuration that raises (out of memory at the
    largest S, say) becomes a row with its "error" (README's tables show it as failed) and the sweep goes on."""
    rows = []
    for dim, causal, seq in itertools.product(args.dims, (False, True), args.seqs):
        try:
            row = run_config(seq, dim, causal, args.warmup, args.repeat)
        except Exception as error:  # noqa: BLE001 - recorded in the results file, not swallowed
            bench.free_memory("gpu")
            row = {"seq": seq, "dim": dim, "causal": causal, "error": bench.short_error(error)}
            print(f"{dim:4d} {seq:6d} {causal!s:>6} | failed: {row['error']}", flush=True)
        else:
            print(line(row), flush=True)
        rows.append(row)
    return rows


def save(results: dict[str, Any], out: str | None) -> None:
    """Write `results` to `out` as JSON (`adaattn_core.bench.write_json`) when a path is given."""
    if out:
        print(f"wrote {bench.write_json(results, out)}")
