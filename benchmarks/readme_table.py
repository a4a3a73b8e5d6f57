"""Write README's performance tables from committed results files (benchmarks/results/*.json).

    python benchmarks/readme_table.py benchmarks/results/2026-11-22-H200-fwd.json --update README.md
    python benchmarks/readme_table.py benchmarks/results/2026-11-22-H200-fwdbwd.json --marker fwdbwd-table \
        --update README.md

A table goes between `<!-- MARKER:start -->` and `<!-- MARKER:end -->` (default marker: fwd-table). Columns
follow the file: TFLOP/s of every implementation it timed, then AdaAttn's ratio to each peer. A row that failed
(it carries an "error", or no timings) shows as "failed: <reason>"; a number a row lacks shows as "n/a".
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

from adaattn_core.bench import format_number

NAMES = {"adaattn": "AdaAttn", "torch-flash": "torch flash (FA2)", "torch-cudnn": "torch cuDNN",
         "torch-efficient": "torch efficient"}
SHORT = {"torch-flash": "FA2", "torch-cudnn": "cuDNN", "torch-efficient": "efficient"}


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def failure(row: dict[str, Any]) -> str | None:
    """Why a results row has no numbers to show (its "error", else what its implementations recorded as
    unsupported when none of them has a timing: the scripts write such rows as ``"ms": {name: None, ...}``);
    None for a row with a timing."""
    if row.get("error"):
        return str(row["error"])
    if any(ms is not None for ms in (row.get("ms") or {}).values()):
        return None
    reasons = "; ".join(f"{name}: {why}" for name, why in (row.get("unsupported") or {}).items())
    return reasons or "no timings"


def _markdown(caption: str, header: list[str], rows: list[dict[str, Any]], ids: list[str],
              cells: Callable[[dict[str, Any]], list[str]]) -> str:
    """`caption`, then a table of `header` with one line per row: the row's `ids` values ("causal" as yes/no),
    then ``cells(row)``, or "failed: <reason>" (`failure`) and empty cells."""
    def line(values: list[str]) -> str:
        return "| " + " | ".join(values) + " |"

    lines = [caption, "", line(header), "|---" * len(header) + "|"]
    for row in rows:
        first = [("yes" if row.get(key) else "no") if key == "causal" else str(row.get(key, "?")) for key in ids]
        reason = failure(row)
        if reason is None:
            lines.append(line(first + cells(row)))
        else:
            reason = " ".join(reason.split()).replace("|", "\\|")
            lines.append(line(first + [f"failed: {reason}"] + [""] * (len(header) - len(ids) - 1)))
    return "\n".join(lines)


def _ordered(rows: list[dict[str, Any]], key: str) -> list[str]:
    """The names under `key` over all rows, in order of first appearance."""
    return list(dict.fromkeys(name for row in rows for name in row.get(key) or {}))


def table(results_path: Path) -> str:
    """The markdown table (with a caption naming the source file) for one results file."""
    results = json.loads(results_path.read_text())
    env, rows = results["env"], results["rows"]
    caption = (
        f"{results['setup']}; TFLOP/s (causal: half the FLOPs), median of CUDA-event timings"
        f"{', implementations timed in turns' if env.get('timing') == 'turns' else ''}, all in one process "
        f"on one {env['gpu']} (driver {env['driver']}, torch {_torch_version(env)}, CuPy {env['cupy']}, "
        f"{env['date'][:10]}). Source: [`{results_path.as_posix()}`]({results_path.as_posix()})."
    )
    if any("fp8_speedup" in row for row in rows):
        return _fp8_table(caption, rows)
    if any("lowrank_heads" in row for row in rows):
        return _rank_table(caption, rows)
    impls = _ordered(rows, "tflops") or ["adaattn"]
    peers = _ordered(rows, "ratio")
    header = ["D", "S", "causal", *(NAMES.get(i, i) for i in impls), *(f"AdaAttn / {SHORT.get(p, p)}" for p in peers)]
    return _markdown(caption, header, rows, ["dim", "seq", "causal"], lambda row: [
        *(format_number(row.get("tflops", {}).get(i), ".0f") for i in impls),
        *(format_number(row.get("ratio", {}).get(p), ".2f") for p in peers)])


def _torch_version(env: dict[str, Any]) -> str:
    """torch's version with the CUDA it was built for, however the file recorded it ("2.11.0+cu130", or "2.11.0"
    beside ``torch_cuda``)."""
    version, cuda = str(env.get("torch")), env.get("torch_cuda")
    return f"{version} (CUDA {cuda})" if cuda and "+" not in version else version


def _fp8_table(caption: str, rows: list[dict]) -> str:
    """benchmarks/bench_fp8.py's file: the fp8 path (quantisation included) against our bf16 path and the peers."""
    header = ["D", "S", "causal", "AdaAttn bf16", "AdaAttn fp8", "quantisation (ms)", "FA2", "cuDNN",
              "SageAttention", "fp8 / bf16", "fp8 / cuDNN", "fp8 / Sage", "fp8 rel. L2 vs float64",
              "Sage rel. L2"]

    def cells(row: dict[str, Any]) -> list[str]:
        tf, speedup, err = row.get("tflops", {}), row.get("fp8_speedup", {}), row.get("rel_l2_vs_float64", {})
        return [format_number(tf.get("adaattn"), ".0f"), format_number(tf.get("adaattn[fp8]"), ".0f"),
                format_number(row["ms"].get("fp8-quantize"), ".3f"), format_number(tf.get("torch-flash"), ".0f"),
                format_number(tf.get("torch-cudnn"), ".0f"), format_number(tf.get("sageattention"), ".0f"),
                format_number(speedup.get("adaattn"), ".2f"), format_number(speedup.get("torch-cudnn"), ".2f"),
                format_number(speedup.get("sageattention"), ".2f"), format_number(err.get("adaattn[fp8]"), ".1e"),
                format_number(err.get("sageattention"), ".1e")]

    return _markdown(caption, header, rows, ["dim", "seq", "causal"], cells)


def _rank_table(caption: str, rows: list[dict]) -> str:
    """benchmarks/bench_rank.py's file: the "lowrank" policy end to end against the dense path and Performer."""
    header = ["heads", "S", "causal", "dense", "lowrank policy (all)", "of which plan", "low-rank heads", "speedup",
              "rel. L2 lowrank", "Performer", "rel. L2 Performer"]

    def cells(row: dict[str, Any]) -> list[str]:
        ms, err = row["ms"], row.get("rel_l2_vs_float64_max", {})
        num = format_number
        return [num(ms.get("dense"), ".2f"), num(ms.get("lowrank"), ".2f"), num(ms.get("plan"), ".2f"),
                f"{row.get('lowrank_heads', '?')}/{row.get('heads', '?')}", num(row.get("speedup_vs_dense"), ".2f"),
                num(err.get("lowrank"), ".1e"), num(ms.get("performer"), ".2f"), num(err.get("performer"), ".1e")]

    return _markdown(caption.replace("TFLOP/s (causal: half the FLOPs), ", "milliseconds, "), header, rows,
                     ["kind", "seq", "causal"], cells)


def update(readme: Path, marker: str, text: str) -> None:
    start, end = markers(marker)
    content = readme.read_text()
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(content):
        raise SystemExit(f"{readme} has no {start} ... {end} markers")
    readme.write_text(pattern.sub(lambda _: f"{start}\n{text}\n{end}", content))


def table_parser(doc: str | None, marker: str) -> argparse.ArgumentParser:
    """The command line of a README table script: a results file, --marker, --update (see `publish`)."""
    parser = argparse.ArgumentParser(description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("--marker", default=marker)
    parser.add_argument("--update", type=Path, help="README to rewrite between the markers")
    return parser


def publish(text: str, args: argparse.Namespace) -> None:
    """Write `text` into the README named by --update between the --marker markers, or print it."""
    if args.update:
        update(args.update, args.marker, text)
    else:
        print(text)


def main() -> None:
    args = table_parser(__doc__, "fwd-table").parse_args()
    publish(table(args.results), args)


if __name__ == "__main__":
    main()
