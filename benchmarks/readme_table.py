"""Write README's forward-performance table from a committed results file (benchmarks/results/*.json).

    python benchmarks/readme_table.py benchmarks/results/2026-11-22-H200-fwd.json --update README.md

The table goes between the markers `<!-- fwd-table:start -->` and `<!-- fwd-table:end -->`.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

START, END = "<!-- fwd-table:start -->", "<!-- fwd-table:end -->"


def _num(x: float | None, fmt: str) -> str:
    return "n/a" if x is None else format(x, fmt)


def table(results_path: Path) -> str:
    results = json.loads(results_path.read_text())
    env = results["env"]
    lines = [
        f"Forward, {results['setup']}; TFLOP/s (causal: half the FLOPs), median of CUDA-event timings, all in one "
        f"process on one {env['gpu']} (driver {env['driver']}, torch {env['torch']}, CuPy {env['cupy']}, "
        f"{env['date'][:10]}). Source: [`{results_path.as_posix()}`]({results_path.as_posix()}).",
        "",
        "| D | S | causal | AdaAttn | torch flash (FA2) | torch cuDNN | torch efficient "
        "| AdaAttn / FA2 | AdaAttn / cuDNN |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in results["rows"]:
        t, r = row["tflops"], row["ratio"]
        lines.append(
            f"| {row['dim']} | {row['seq']} | {'yes' if row['causal'] else 'no'} | {_num(t['adaattn'], '.0f')} | "
            f"{_num(t['torch-flash'], '.0f')} | {_num(t['torch-cudnn'], '.0f')} | "
            f"{_num(t['torch-efficient'], '.0f')} | "
            f"{_num(r['torch-flash'], '.2f')} | {_num(r['torch-cudnn'], '.2f')} |"
        )
    return "\n".join(lines)


def update(readme: Path, text: str) -> None:
    content = readme.read_text()
    pattern = re.compile(re.escape(START) + ".*?" + re.escape(END), re.DOTALL)
    if not pattern.search(content):
        raise SystemExit(f"{readme} has no {START} ... {END} markers")
    readme.write_text(pattern.sub(lambda _: f"{START}\n{text}\n{END}", content))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("results", type=Path)
    parser.add_argument("--update", type=Path, help="README to rewrite between the markers")
    args = parser.parse_args()
    text = table(args.results)
    if args.update:
        update(args.update, text)
    else:
        print(text)


if __name__ == "__main__":
    main()
