"""Write README's performance tables from committed results files (benchmarks/results/*.json).

    python benchmarks/readme_table.py benchmarks/results/2026-11-22-H200-fwd.json --update README.md
    python benchmarks/readme_table.py benchmarks/results/2026-11-22-H200-fwdbwd.json --marker fwdbwd-table \
        --update README.md

A table goes between `<!-- MARKER:start -->` and `<!-- MARKER:end -->` (default marker: fwd-table). Columns
follow the file: TFLOP/s of every implementation it timed, then AdaAttn's ratio to each peer.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

NAMES = {"adaattn": "AdaAttn", "torch-flash": "torch flash (FA2)", "torch-cudnn": "torch cuDNN",
         "torch-efficient": "torch efficient"}
SHORT = {"torch-flash": "FA2", "torch-cudnn": "cuDNN", "torch-efficient": "efficient"}


def markers(name: str) -> tuple[str, str]:
    return f"<!-- {name}:start -->", f"<!-- {name}:end -->"


def _num(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def table(results_path: Path) -> str:
    """The markdown table (with a caption naming the source file) for one results file."""
    results = json.loads(results_path.read_text())
    env, rows = results["env"], results["rows"]
    caption = (
        f"{results['setup']}; TFLOP/s (causal: half the FLOPs), median of CUDA-event timings, all in one process "
        f"on one {env['gpu']} (driver {env['driver']}, torch {env['torch']}, CuPy {env['cupy']}, "
        f"{env['date'][:10]}). Source: [`{results_path.as_posix()}`]({results_path.as_posix()})."
    )
    if "fp8_speedup" in rows[0]:
        return _fp8_table(caption, rows)
    if "lowrank_heads" in rows[0]:
        return _rank_table(caption, rows)
    impls = list(rows[0]["tflops"])
    peers = list(rows[0]["ratio"])
    lines = [
        caption,
        "",
        "| D | S | causal | " + " | ".join(NAMES.get(i, i) for i in impls) + " | "
        + " | ".join(f"AdaAttn / {SHORT.get(p, p)}" for p in peers) + " |",
        "|---" * (3 + len(impls) + len(peers)) + "|",
    ]
    for row in rows:
        lines.append(
            f"| {row['dim']} | {row['seq']} | {'yes' if row['causal'] else 'no'} | "
            + " | ".join(_num(row["tflops"][i], ".0f") for i in impls) + " | "
            + " | ".join(_num(row["ratio"][p], ".2f") for p in peers) + " |"
        )
    return "\n".join(lines)


def _fp8_table(caption: str, rows: list[dict]) -> str:
    """benchmarks/bench_fp8.py's file: the fp8 path (quantisation included) against our bf16 path and the peers."""
    lines = [
        caption,
        "",
        "| D | S | causal | AdaAttn bf16 | AdaAttn fp8 | quantisation (ms) | FA2 | cuDNN | fp8 / bf16 | fp8 / cuDNN "
        "| fp8 rel. L2 vs float64 |",
        "|---" * 11 + "|",
    ]
    for row in rows:
        tf, speedup = row["tflops"], row["fp8_speedup"]
        lines.append(
            f"| {row['dim']} | {row['seq']} | {'yes' if row['causal'] else 'no'} | {_num(tf['adaattn'], '.0f')} | "
            f"{_num(tf['adaattn[fp8]'], '.0f')} | {_num(row['ms']['fp8-quantize'], '.3f')} | "
            f"{_num(tf['torch-flash'], '.0f')} | {_num(tf['torch-cudnn'], '.0f')} | "
            f"{_num(speedup['adaattn'], '.2f')} | {_num(speedup['torch-cudnn'], '.2f')} | "
            f"{_num(row['rel_l2_vs_float64']['adaattn[fp8]'], '.1e')} |"
        )
    return "\n".join(lines)


def _rank_table(caption: str, rows: list[dict]) -> str:
    """benchmarks/bench_rank.py's file: the "lowrank" policy end to end against the dense path and Performer."""
    lines = [
        caption.replace("TFLOP/s (causal: half the FLOPs), ", "milliseconds, "),
        "",
        "| heads | S | causal | dense | lowrank policy (all) | of which plan | low-rank heads | speedup | "
        "rel. L2 lowrank | Performer | rel. L2 Performer |",
        "|---" * 11 + "|",
    ]
    for row in rows:
        ms, err = row["ms"], row["rel_l2_vs_float64_max"]
        lines.append(
            f"| {row['kind']} | {row['seq']} | {'yes' if row['causal'] else 'no'} | {_num(ms['dense'], '.2f')} | "
            f"{_num(ms['lowrank'], '.2f')} | {_num(ms['plan'], '.2f')} | {row['lowrank_heads']}/{row['heads']} | "
            f"{_num(row['speedup_vs_dense'], '.2f')} | {_num(err['lowrank'], '.1e')} | "
            f"{_num(ms.get('performer'), '.2f')} | {_num(err.get('performer'), '.1e')} |"
        )
    return "\n".join(lines)


def update(readme: Path, marker: str, text: str) -> None:
    start, end = markers(marker)
    content = readme.read_text()
    pattern = re.compile(re.escape(start) + ".*?" + re.escape(end), re.DOTALL)
    if not pattern.search(content):
        raise SystemExit(f"{readme} has no {start} ... {end} markers")
    readme.write_text(pattern.sub(lambda _: f"{start}\n{text}\n{end}", content))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("--marker", default="fwd-table")
    parser.add_argument("--update", type=Path, help="README to rewrite between the markers")
    args = parser.parse_args()
    text = table(args.results)
    if args.update:
        update(args.update, args.marker, text)
    else:
        print(text)


if __name__ == "__main__":
    main()
