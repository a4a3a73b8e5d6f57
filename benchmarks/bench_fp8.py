"""FP8 forward sweep on Hopper: AdaAttn's fp8 path (quantisation included) beside our bf16 forward, torch SDPA's
flash and cuDNN backends (bf16) and SageAttention when installed, same process, same GPU, same inputs.

FlashAttention-paper setup: B·S = 16k tokens, H·D = 2048, bf16 inputs, S ∈ {1k … 16k}, D ∈ {64, 128}, causal
and not. Per row:
- "adaattn[fp8]"      attention(policy="fp8") through the public API (quantisation in every call);
- "adaattn-fp8-call"  cuda_fp8.forward on its own (quantisation + kernel, no API overhead);
- "fp8-quantize"      cuda_fp8.quantize alone ("fp8-quantize-no-rotation": without the Hadamard rotation),
                      and "fp8-kernel" the attention kernel on pre-quantised inputs;
- "adaattn"           our bf16 forward (policy "exact"), and the peers.
Mechanics from `adaattn_core.bench`: fresh random inputs rotated among sets that exceed L2, warm-up calls,
medians of CUDA-event timings on torch's current stream with every implementation taking its turn call by call,
outputs preallocated and poisoned (NaN) first.
Writes JSON with device, driver and versions:

    python benchmarks/bench_fp8.py --out benchmarks/results/<date>-<gpu>-fp8.json
"""

from __future__ import annotations

from typing import Any

from _common import PAPER_SIZES, environment, headline, paper_grid, prefix, run_grid, save, sweep_parser

from adaattn_core import bench, cuda_fp8
from adaattn_core.bench import format_number
from adaattn_core.problem import describe

PEERS = ("torch-flash", "torch-cudnn", "sageattention")


def _fp8_impls(sets: list[tuple[Any, Any, Any]], causal: bool) -> dict[str, Any]:
    """The direct fp8 timings: whole call, quantisation alone, kernel alone (outputs poisoned once)."""
    import cupy

    problem = describe(*sets[0], causal=causal, scale=None, layout="bhsd")
    heads = list(range(problem.heads_q))
    outs = [cupy.full(q.shape, cupy.nan, q.dtype) for q, _, _ in sets]
    lses = [cupy.full(q.shape[:3], cupy.nan, cupy.float32) for q, _, _ in sets]
    prepared = [{"fp8": cuda_fp8.quantize(problem, *s, heads)} for s in sets]

    def call(i: int) -> None:
        j = i % len(sets)
        cuda_fp8.forward(problem, *sets[j], outs[j], lses[j], heads)

    def quantize(i: int) -> None:
        cuda_fp8.quantize(problem, *sets[i % len(sets)], heads)

    def quantize_plain(i: int) -> None:
        cuda_fp8.quantize(problem, *sets[i % len(sets)], heads, rotate=False)

    def kernel(i: int) -> None:
        j = i % len(sets)
        cuda_fp8.forward(problem, *sets[j], outs[j], lses[j], heads, prepared[j])

    call(0)
    cupy.cuda.get_current_stream().synchronize()
    return {"adaattn-fp8-call": call, "fp8-quantize": quantize, "fp8-quantize-no-rotation": quantize_plain,
            "fp8-kernel": kernel, "_out": outs[0]}


def run_config(seq: int, dim: int, causal: bool, warmup: int, repeat: int) -> dict[str, Any]:
    case = bench.paper_case(seq, dim, causal)
    sets = bench.make_input_sets(case, "gpu", seed=bench.case_seed(case))
    try:
        impls = _fp8_impls(sets, causal)
        fp8_rel_l2, reason = bench.float64_error(impls.pop("_out"), *sets[0], causal, 256), None
    except Exception as error:  # no sm_90 or an unsupported shape: record it, go on
        impls, reason = {}, error
    # The fp8 pieces take their turns beside the bf16 kernel and the peers (bench.time_interleaved).
    row = bench.run_case(case, device="gpu", policies=("exact", "fp8"), peers=[bench.PEERS[name] for name in PEERS],
                         warmup=warmup, repeat=repeat, sets=sets, extra=impls)
    if reason is None:
        row["rel_l2_vs_float64"]["adaattn-fp8-call"] = fp8_rel_l2
    else:
        bench.unsupported(row, "adaattn-fp8-call", reason)
    ms = row["ms"]
    fp8 = ms.get("adaattn-fp8-call")
    row["fp8_speedup"] = {name: (ms[name] / fp8 if fp8 and ms.get(name) else None)
                          for name in ("adaattn", *PEERS)}
    return row


def _line(row: dict[str, Any]) -> str:
    ms, up = row["ms"], row["fp8_speedup"]
    times = " ".join(format_number(ms.get(name), "7.3f") for name in (
        "adaattn-fp8-call", "fp8-quantize", "fp8-kernel", "adaattn[fp8]", "adaattn", "torch-cudnn"))
    return (f"{prefix(row)} | ms: {times} | "
            f"{format_number(up['adaattn'], '15.2f')} {format_number(up['torch-flash'], '5.2f')} "
            f"{format_number(up['torch-cudnn'], '5.2f')} | "
            f"{row['rel_l2_vs_float64'].get('adaattn-fp8-call', float('nan')):.1e}")


def main() -> None:
    parser = sweep_parser(__doc__, seqs=[1024, 2048, 4096, 8192, 16384], dims=[64, 128], repeat=30)
    args = parser.parse_args()

    results = {"env": environment(timing=bench.TIMING), "setup": f"{PAPER_SIZES}, bf16 inputs, [B,H,S,D]",
               "rows": []}
    print(headline(results["env"]))
    print(f"{'D':>4} {'S':>6} {'causal':>6} | ms: {'fp8':>7} {'quant':>7} {'kernel':>7} {'api-fp8':>7} {'bf16':>7} "
          f"{'cudnn':>7} | fp8 speedup vs: {'bf16':>5} {'flash':>5} {'cudnn':>5} | fp8 rel_l2")
    results["rows"] = run_grid(paper_grid(args), run_config, _line, warmup=args.warmup, repeat=args.repeat)
    save(results, args.out)


if __name__ == "__main__":
    main()
