"""What the GPU benchmark scripts (`bench_*.py`) share beyond `adaattn_core.bench` (inputs, timing, problem
shapes, number formatting): the environment record with torch's versions, the sweep's command line, the
loop over configurations that prints a line per row, and writing the results file.

Imports neither CuPy nor torch (functions import them when called), so `bench_forward.py`, `bench_fp8.py`
and `bench_rank.py` answer ``--help`` without them; `bench_backward.py` needs torch.
"""

from __future__ import annotations

import argparse
import importlib.util
import itertools
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import Any

from adaattn_core import bench

Row = dict[str, Any]
#: The FlashAttention papers' problem sizes as the results files' "setup" names them.
PAPER_SIZES = f"B*S={bench.PAPER_TOKENS}, H*D={bench.PAPER_HIDDEN}"


def environment(timing: str | None = None) -> dict[str, Any]:
    """`adaattn_core.bench.environment` for the GPU (which records torch's version; `timing` as there) plus, with
    torch installed, the CUDA version torch was built with (key ``torch_cuda``)."""
    env = bench.environment("gpu", timing=timing)
    if importlib.util.find_spec("torch") is not None:
        import torch

        env["torch_cuda"] = torch.version.cuda
    return env


def headline(env: dict[str, Any], package: str = "torch") -> str:
    """The first line a script prints: GPU, driver and the version of `package`."""
    return f"# {env['gpu']}, driver {env['driver']}, {package} {env.get(package)}"


def sweep_parser(doc: str | None, *, seqs: Sequence[int], dims: Sequence[int], repeat: int,
                 warmup: int = 5) -> argparse.ArgumentParser:
    """The options every sweep takes (--seqs, --dims, --causal, --warmup, --repeat, --out); scripts add their
    own."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seqs", type=bench.count_type(1), nargs="+", default=list(seqs))
    parser.add_argument("--dims", type=bench.count_type(1), nargs="+", default=list(dims))
    parser.add_argument("--causal", choices=sorted(bench.CAUSAL_CHOICES), default="both",
                        help="non-causal rows, causal rows or both (default)")
    parser.add_argument("--warmup", type=bench.count_type(0), default=warmup)
    parser.add_argument("--repeat", type=bench.count_type(1), default=repeat)
    parser.add_argument("--out", default=None, help="JSON file to write")
    return parser


def paper_grid(args: argparse.Namespace, kinds: Sequence[str] = ()) -> Iterator[Row]:
    """The sweep's configurations in table order: every D of `args`, then causal (no, yes; `args.causal` may keep
    one), then every input kind of `kinds` if given (rows then carry "kind"), then every S."""
    for dim, causal, kind, seq in itertools.product(args.dims, bench.CAUSAL_CHOICES[args.causal], kinds or [None],
                                                    args.seqs):
        yield {"seq": seq, "dim": dim, "causal": causal, **({"kind": kind} if kind is not None else {})}


def prefix(row: Row) -> str:
    """The columns a printed line starts with: kind (rank rows), D, S, causal."""
    kind = f"{row['kind']:>8} " if "kind" in row else ""
    return f"{kind}{row['dim']:>4} {row['seq']:>6} {row['causal']!s:>6}"


def run_grid(configs: Iterable[Row], run_config: Callable[..., Row], line: Callable[[Row], str],
             **fixed: Any) -> list[Row]:
    """``run_config(**config, **fixed)`` for every configuration, with CuPy on torch's current stream, printing
    ``line(row)`` as each row arrives and giving GPU memory back after each. A configuration that raises (out of
    memory at the largest S, say) becomes ``{**config, "error": ...}`` (README's tables show it as failed) and
    the sweep goes on."""
    rows = []
    with bench.cupy_on_torch_stream():
        for config in configs:
            try:
                row = run_config(**config, **fixed)
            except Exception as error:  # noqa: BLE001 - recorded in the results file, not swallowed
                row = {**config, "error": bench.short_error(error)}
                print(f"{prefix(row)} | failed: {row['error']}", flush=True)
            else:
                print(line(row), flush=True)
            finally:
                bench.free_memory("gpu")  # CuPy's pool and torch's cache, once the row's arrays are gone
            rows.append(row)
    return rows


def save(results: dict[str, Any], out: str | None) -> None:
    """Write `results` to `out` as JSON (`adaattn_core.bench.write_json`) when a path is given."""
    if out:
        print(f"wrote {bench.write_json(results, out)}")
