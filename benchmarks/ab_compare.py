"""Interleaved A/B of kernel variants: the measurement behind every "tried" and "gain" in notes/forward-tuning.md.

    python3 benchmarks/ab_compare.py --out benchmarks/results/tuning/2026-12-04-H200-fwd-keys176 --runs 2 \\
        --variant base= --variant keys176="--tile90 128n:176,2,128" --variant old@ab_old= \\
        -- --dims 128 --causal no --seqs 4096 8192 16384

Runs the benchmark script (`--script`, default bench_forward.py) once per variant and run, in the order run 1:
A, B, ...; run 2: A, B, ..., so that the GPU's drift between runs falls on every variant alike. A variant is
NAME[@DIR]=ARGS: ARGS are added to the script's own (after ``--``), DIR runs the script from another source tree
(e.g. ``scripts/ab_trees.sh old=main`` makes ab_old from git). Each run writes <out>-<NAME>-<run>.json.
Then, per configuration, it prints each variant's TFLOP/s in every run, its gain over the first variant (ratio of
the means over runs) and cuDNN's mean over all runs (the peers run beside every variant).

`--compare FILE...` only prints the table from result files named <prefix>-<NAME>-<run>.json (no GPU needed);
`--variant NAME=` options given with it set the columns' order, the first being the baseline.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import subprocess
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

from adaattn_core.bench import count_type, format_number

HERE = Path(__file__).resolve().parent
PEER = "torch-cudnn"
#: A variant's name, as it appears in the result files' names.
NAME = r"[A-Za-z0-9_.]+"


def parse_variant(text: str) -> tuple[str, str | None, list[str]]:
    """NAME[@DIR]=ARGS as (name, directory or None, arguments). Raises ValueError naming the malformed part."""
    head, sep, args = text.partition("=")
    name, _, directory = head.partition("@")
    if not sep or not re.fullmatch(NAME, name):
        raise ValueError(f"--variant {text!r}: expected NAME[@DIR]=ARGS with NAME of letters, digits, '_' or '.'")
    return name, directory or None, shlex.split(args)


def load_runs(files: list[str]) -> dict[str, list[dict[str, Any]]]:
    """{variant: [results of run 1, run 2, ...]} from files named <prefix>-<variant>-<run>.json."""
    runs: dict[str, dict[int, dict[str, Any]]] = defaultdict(dict)
    for file in files:
        match = re.fullmatch(rf".*-({NAME})-(\d+)\.json", Path(file).name)
        if match is None:
            raise ValueError(f"{file}: expected a name ending in -<variant>-<run>.json")
        runs[match[1]][int(match[2])] = json.loads(Path(file).read_text())
    return {name: [by_run[r] for r in sorted(by_run)] for name, by_run in runs.items()}


def _mean(values: list[float]) -> float | None:
    return sum(values) / len(values) if values else None


def compare(runs: dict[str, list[dict[str, Any]]], order: list[str] | None = None,
            impl: str = "adaattn") -> list[dict[str, Any]]:
    """Per configuration (D, S, causal, in the first variant's row order): each variant's TFLOP/s of `impl` per run and
    their mean, its gain over the first variant (ratio of run means, minus 1) and the peer's mean over every run of
    every variant. Rows that failed in a run count as missing there."""
    names = order or list(runs)
    tflops: dict[tuple[Any, ...], dict[str, list[float]]] = {}  # insertion order: the first variant's rows
    peer: dict[tuple[Any, ...], list[float]] = defaultdict(list)
    for name in names:
        for results in runs[name]:
            for row in results["rows"]:
                key = (row["dim"], row["seq"], row["causal"])
                measured = row.get("tflops", {})
                per_variant = tflops.setdefault(key, {n: [] for n in names})
                if measured.get(impl) is not None:
                    per_variant[name].append(measured[impl])
                if measured.get(PEER) is not None:
                    peer[key].append(measured[PEER])
    table = []
    for key, per_variant in tflops.items():
        means = {n: _mean(v) for n, v in per_variant.items()}
        base = means[names[0]]
        table.append({"dim": key[0], "seq": key[1], "causal": key[2], "tflops": per_variant, "mean": means,
                      "gain": {n: means[n] / base - 1 if base and means[n] else None for n in names[1:]},
                      PEER: _mean(peer[key])})
    return table


def format_table(table: list[dict[str, Any]], names: list[str]) -> str:
    """Markdown: D, S, causal, each variant's runs ("a / b"), each later variant's gain, cuDNN, last / cuDNN."""
    head = ["D", "S", "causal", *names, *(f"{n} gain" for n in names[1:]), "cuDNN", f"{names[-1]} / cuDNN"]
    lines = [head, ["---"] * len(head)]
    for row in table:
        last, peer = row["mean"][names[-1]], row[PEER]
        lines.append([str(row["dim"]), str(row["seq"]), "yes" if row["causal"] else "no",
                      *(" / ".join(f"{t:.0f}" for t in row["tflops"][n]) or "failed" for n in names),
                      *(format_number(row["gain"][n], "+.1%") for n in names[1:]), format_number(peer, ".0f"),
                      format_number(last / peer if last and peer else None, ".2f")])
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)


#: The scripts whose rows compare by (D, S, causal) and carry TFLOP/s per implementation.
SCRIPTS = ("bench_forward.py", "bench_fp8.py", "bench_backward.py")


def main() -> None:
    argv = sys.argv[1:]
    split = argv.index("--") if "--" in argv else len(argv)
    own, script_args = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", action="append", default=[], metavar="NAME[@DIR]=ARGS")
    parser.add_argument("--runs", type=count_type(1), default=2)
    parser.add_argument("--out", help="prefix of the result files: <out>-<NAME>-<run>.json")
    parser.add_argument("--script", choices=SCRIPTS, default="bench_forward.py", help="benchmark script in benchmarks/")
    parser.add_argument("--impl", default="adaattn",
                        help="the result key compared (e.g. fp8-kernel with --script bench_fp8.py)")
    parser.add_argument("--compare", nargs="+", metavar="FILE", help="only tabulate existing result files")
    args = parser.parse_args(own)
    try:
        variants = [parse_variant(v) for v in args.variant]
        runs = load_runs(args.compare) if args.compare else {}
    except ValueError as error:
        parser.error(str(error))
    except OSError as error:
        parser.error(f"--compare {error.filename}: cannot read it ({error.strerror})")
    names = [name for name, _, _ in variants]
    repeated = next((name for name in names if names.count(name) > 1), None)
    if repeated is not None:
        parser.error(f"--variant {repeated}: given twice (each name has its own result files <out>-NAME-<run>.json)")
    if args.compare:
        rows = [row for results in runs.values() for r in results for row in r["rows"]]
        found = {key for row in rows for key in row.get("tflops") or {}}
        if args.impl not in found:
            parser.error(f"--impl {args.impl}: not a result key of these files (found: {', '.join(sorted(found))})")
        # --variant NAME= (arguments ignored) sets the column order and the baseline; else the files' order
        missing = [name for name in names if name not in runs]
        if missing:
            parser.error(f"--variant {missing[0]}: no result file for it among --compare (found: {', '.join(runs)})")
        order = names or list(runs)
        print(format_table(compare(runs, order, impl=args.impl), order))
        return
    if not args.variant:
        parser.error("give --variant NAME[@DIR]=ARGS (at least one), or --compare FILES")
    if not args.out:
        parser.error("give --out PREFIX (result files <PREFIX>-<NAME>-<run>.json)")
    runs = {name: [] for name in names}
    for run in range(1, args.runs + 1):
        for name, directory, extra in variants:
            out = Path(f"{args.out}-{name}-{run}.json").resolve()
            root = Path(directory).resolve() if directory else HERE.parent
            env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
            print(f"== {name} run {run}", flush=True)
            done = subprocess.run([sys.executable, str(root / "benchmarks" / args.script), *script_args, *extra,
                                   "--out", str(out)], cwd=root, env=env)
            if done.returncode:
                sys.exit(f"ab_compare: --variant {name} run {run} exited with {done.returncode}; its earlier result "
                         f"files stay under {args.out}-*")
            runs[name].append(json.loads(out.read_text()))
    print(format_table(compare(runs, names, impl=args.impl), names))


if __name__ == "__main__":
    main()
