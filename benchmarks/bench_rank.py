"""Adaptive rank on the GPU: the "lowrank" policy against our dense forward and Performer, same process, same GPU.

For S in {2k … 32k}, D in {128, 64}, causal and not, B = 1, H = 16, bf16, three head mixes:
"diffuse" (q, k ~ 0.1·N(0, 1): near-uniform rows), "peaked" (each query a scaled copy of one key: retrieval),
"mixed" (heads cycle diffuse, peaked, sink, random). Timed (CUDA events on one stream, warm-up, median, fresh
random inputs rotated over two sets, `adaattn_core.bench` mechanics):

- dense:    `attention(policy="exact")`, the fused forward;
- lowrank:  `attention(policy=RankPolicy())`, end to end: probe, pooled map, guard, then the dense launch for
            dense heads and `lowrank.forward` for the others;
- plan:     `RankPolicy().plan` alone (probe + decision overhead, including its host synchronisations; it
            includes the guard's `lowrank.prepare`, whose keys and landmarks the forward reuses); the row's
            "plan_transfers" is how many device-to-host transfers (host synchronisations) one plan made;
- prepare:  `lowrank.prepare` alone for the planned low-rank heads at their first rank (the part of plan that is
            forward work handed on, not decision overhead);
- lowrank_forward: `lowrank.forward` alone on the planned low-rank heads, given the plan's prepared keys;
- performer: performer-pytorch's FastAttention (FAVOR+, 256 features) when it imports.

Errors: relative L2 against float64 on 32 sampled rows of every head (`reference.head_errors`, rows other than
the policy's probe rows), max over heads. The crossover is the shortest S from which lowrank beats dense at
every longer S.

    python benchmarks/bench_rank.py --out benchmarks/results/<date>-<gpu>-rank.json [--quick]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import importlib.util
import time
from collections.abc import Callable
from typing import Any

# benchmarks/ is the script's directory
from _common import environment, headline, paper_grid, prefix, run_grid, save, sweep_parser

from adaattn_core import Report, attention, bench, estimators, lowrank
from adaattn_core.bench import format_number
from adaattn_core.problem import describe
from adaattn_core.rank_policy import RankPolicy
from adaattn_core.reference import head_errors

KINDS = {"diffuse": ["diffuse"], "peaked": ["peaked"], "mixed": ["diffuse", "peaked", "sink", "random"]}
PERFORMER_FEATURES = 256


def make_inputs(kinds: list[str], batch: int, heads: int, seq: int, dim: int, seed: int) -> tuple[Any, Any, Any]:
    """bf16 q, k, v [B, H, S, D] on the GPU; head h of kind kinds[h % len(kinds)] (see the module docstring)."""
    import cupy

    rng = cupy.random.default_rng(seed)
    q, k, v = (rng.standard_normal((batch, heads, seq, dim), dtype=cupy.float32) for _ in range(3))
    for h in range(heads):
        kind = kinds[h % len(kinds)]
        if kind == "diffuse":
            q[:, h] *= 0.1
            k[:, h] *= 0.1
        elif kind == "peaked":
            q[:, h] = 4 * k[:, h][:, cupy.argsort(rng.random(seq))]  # a random permutation of the keys
        elif kind == "sink":
            u = rng.standard_normal(dim, dtype=cupy.float32)
            u /= cupy.linalg.norm(u)
            q[:, h] = 0.1 * q[:, h] + 4 * u
            k[:, h] *= 0.1
            k[:, h, 0] = 20 * u
    return tuple(x.astype("bfloat16") for x in (q, k, v))


def performer(dim: int, causal: bool) -> Callable[[Any, Any, Any], Any] | None:
    """FAVOR+ from performer-pytorch on torch views of the CuPy inputs, or None when it does not import."""
    if importlib.util.find_spec("performer_pytorch") is None:
        return None
    import cupy
    import torch
    from performer_pytorch.performer_pytorch import FastAttention

    module = FastAttention(dim_heads=dim, nb_features=PERFORMER_FEATURES, causal=causal).cuda()

    def run(q: Any, k: Any, v: Any) -> Any:
        with torch.no_grad():
            out = module(*(bench.to_torch(x) for x in (q, k, v)))
        return cupy.from_dlpack(out.contiguous())

    return run


def run_config(kind: str, seq: int, dim: int, causal: bool, args: argparse.Namespace) -> dict[str, Any]:
    """One row: times, errors, decisions."""
    import cupy

    sets = [make_inputs(KINDS[kind], args.batch, args.heads, seq, dim, seed=seq * 7 + dim * 3 + causal * 2 + i)
            for i in range(2)]
    outs = [cupy.empty_like(s[0]) for s in sets]
    policy = RankPolicy(spectral=args.spectral)
    problem = describe(*sets[0], causal=causal, scale=None, layout="bhsd")
    plans = [policy.plan(problem, *s, None) for s in sets]
    low = [[(h, p.rank) for h, p in enumerate(plan.heads) if p.path == "lowrank"] for plan in plans]
    lse = cupy.empty(problem.lse_shape(), dtype=cupy.float32)
    error_rows = estimators.probe_rows(problem, 32, seed=12345)  # not the policy's probe rows

    def timed(name: str, fn: Callable[[int], Any]) -> float | None:
        try:
            fn(0)
            bench.synchronize("gpu")
            return bench.median_ms(fn, warmup=args.warmup, repeat=args.repeat, device="gpu")
        except Exception as error:  # Performer's causal fallback can run out of memory at long S: record it
            row.setdefault("unsupported", {})[name] = bench.short_error(error)
            return None

    def dense(i: int) -> Any:
        return attention(*sets[i % 2], causal=causal, policy="exact", out=outs[i % 2])

    def adaptive(i: int) -> Any:
        return attention(*sets[i % 2], causal=causal, policy=policy, out=outs[i % 2])

    def plan(i: int) -> Any:
        return policy.plan(problem, *sets[i % 2], None)

    def lowrank_forward(i: int) -> None:
        heads = low[i % 2]
        if heads:
            lowrank.forward(problem, *sets[i % 2], outs[i % 2], lse, [h for h, _ in heads], [r for _, r in heads],
                            plans[i % 2].artifacts)

    row: dict[str, Any] = {"kind": kind, "seq": seq, "dim": dim, "causal": causal, "batch": args.batch,
                           "heads": args.heads, "dtype": "bfloat16", "ms": {}, "rel_l2_vs_float64_max": {},
                           "lowrank_heads": len(low[0]), "ranks": sorted({r for _, r in low[0]})}
    report = Report()
    started = time.perf_counter()
    policy.plan(problem, *sets[0], report)
    row["plan_wall_ms"] = (time.perf_counter() - started) * 1e3
    row["plan_transfers"] = report.estimates["rank"]["transfers"]
    favor = None if args.no_performer else performer(dim, causal)
    impls: dict[str, Callable[[int], Any]] = {"dense": dense, "lowrank": adaptive, "plan": plan,
                                              "lowrank_forward": lowrank_forward}
    if low[0]:
        first_rank = low[0][0][1]
        sinks = plans[0].artifacts.get("sinks", {})
        prep_heads = [h for h, r in low[0] if r == first_rank]

        def prepare(i: int) -> Any:
            return lowrank.prepare(problem, sets[i % 2][1], sets[i % 2][2], prep_heads, first_rank, sinks)

        impls["prepare"] = prepare
    if favor is not None:
        def performer_forward(i: int) -> Any:
            return favor(*sets[i % 2])

        impls["performer"] = performer_forward
    for name, fn in impls.items():
        row["ms"][name] = timed(name, fn)
        if name in ("dense", "lowrank", "performer") and row["ms"][name] is not None:
            errors = head_errors(*sets[0], fn(0), causal=causal, scale=problem.scale, rows=error_rows)
            row["rel_l2_vs_float64_max"][name] = max(errors)
    ms = row["ms"]
    if ms["dense"] and ms["lowrank"]:
        row["speedup_vs_dense"] = ms["dense"] / ms["lowrank"]
    if ms["dense"] and ms["plan"]:
        row["plan_overhead_vs_dense"] = ms["plan"] / ms["dense"]
        row["decision_overhead_vs_dense"] = (ms["plan"] - (ms.get("prepare") or 0.0)) / ms["dense"]
    return row


def crossovers(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per (kind, D, causal): the shortest S from which lowrank is faster than dense at every longer S."""
    found = []
    for key in sorted({(r["kind"], r["dim"], r["causal"]) for r in rows}):
        series = sorted((r["seq"], r.get("speedup_vs_dense") or 0.0) for r in rows
                        if (r["kind"], r["dim"], r["causal"]) == key)
        crossing = None
        for seq, speedup in reversed(series):
            if speedup <= 1.0:
                break
            crossing = seq
        found.append({"kind": key[0], "dim": key[1], "causal": key[2], "crossover_seq": crossing})
    return found


def _line(row: dict[str, Any]) -> str:
    ms, err, num = row["ms"], row["rel_l2_vs_float64_max"], format_number
    return (f"{prefix(row)} | {num(ms['dense'], '7.3f')} "
            f"{num(ms['lowrank'], '7.3f')} {num(ms['plan'], '6.3f')} {num(ms.get('prepare'), '6.3f')} "
            f"{num(ms['lowrank_forward'], '6.3f')} {num(ms.get('performer'), '7.3f')} | "
            f"{num(row.get('speedup_vs_dense'), '7.2f')} {num(row.get('plan_overhead_vs_dense'), '5.2f')} "
            f"{num(row.get('decision_overhead_vs_dense'), '5.3f')} {row['plan_transfers']:>5} | "
            f"{num(err.get('lowrank'), '7.1e')} {num(err.get('performer'), '7.1e')} | "
            f"{row['lowrank_heads']}/{row['heads']} r={row['ranks']}")


def main() -> None:
    parser = sweep_parser(__doc__, seqs=[2048, 4096, 8192, 16384, 32768], dims=[128, 64], warmup=3, repeat=10)
    parser.add_argument("--kinds", nargs="+", choices=list(KINDS), default=list(KINDS))
    parser.add_argument("--batch", type=bench.count_type(1), default=1)
    parser.add_argument("--heads", type=bench.count_type(1), default=16)
    parser.add_argument("--quick", action="store_true", help="S 8k and 32k, D 128 only")
    parser.add_argument("--no-performer", action="store_true")
    parser.add_argument("--spectral", action="store_true", help="RankPolicy(spectral=True): the pooled-map "
                        "spectrum (host linear algebra) seeds the guard's starting rank (off by default)")
    args = parser.parse_args()
    if args.quick:
        args.seqs, args.dims = [8192, 32768], [128]

    env = environment()
    env["performer_pytorch"] = (importlib.metadata.version("performer-pytorch")
                                if importlib.util.find_spec("performer_pytorch") else None)
    results: dict[str, Any] = {"env": env, "setup": f"B={args.batch}, H={args.heads}, bf16, [B,H,S,D]",
                               "performer_features": PERFORMER_FEATURES,
                               "policy": repr(RankPolicy(spectral=args.spectral)), "rows": []}
    print(headline(env, "performer_pytorch"))
    print(f"{'kind':>8} {'D':>4} {'S':>6} {'causal':>6} | {'dense':>7} {'lowrank':>7} {'plan':>6} {'prep':>6} "
          f"{'lr_fwd':>6} {'favor+':>7} | {'speedup':>7} {'ovh':>5} {'dec':>5} {'syncs':>5} | {'err lr':>7} "
          f"{'err fav':>7} | low-rank heads")
    results["rows"] = run_grid(paper_grid(args, kinds=args.kinds), run_config, _line, args=args)
    results["crossover"] = crossovers(results["rows"])
    for entry in results["crossover"]:
        print(f"crossover {entry['kind']} D={entry['dim']} causal={entry['causal']}: {entry['crossover_seq']}")
    save(results, args.out)


if __name__ == "__main__":
    main()
