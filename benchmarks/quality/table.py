"""README tables from a quality results file (`benchmarks/quality/run.py`'s quality.json).

    python3 -m benchmarks.quality.table benchmarks/results/DATE-GPU-quality.json
    python3 -m benchmarks.quality.table FILE.json --update README.md      # between <!-- quality-table:... -->
    python3 -m benchmarks.quality.table FILE.json --plot FILE.png         # the training curves (matplotlib)

Two tables: the training runs (throughput, final losses, the agreement verdict) and the evaluation per policy
and context (perplexity, change vs exact, target verdict, the decisions over all layers and heads, the
worst head's measured error).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from benchmarks.readme_table import publish, table_parser

from .train import trailing_mean


def _verdict(value: bool | None) -> str:
    return "n/a" if value is None else ("pass" if value else "**FAIL**")


def training_table(results: dict[str, Any]) -> list[str]:
    verdict = results["agreement"]
    smooth = verdict["smooth_window"]
    lines = [
        f"| run | attention | data seed | tokens/s | final train loss ({smooth}-step mean) | held-out loss |",
        "|---|---|---|---|---|---|",
    ]
    for run in results["runs"]:
        final = float(trailing_mean(run["losses"], smooth)[-1])  # the curve the agreement verdict compares
        lines.append(f"| {run['name']} | {run['backend']} | {run['data_seed']} | {run['tokens_per_s']:,.0f} | "
                     f"{final:.4f} | {results['held_out_loss'][run['name']]:.4f} |")
    lines.append("")
    distance, noise = verdict["distance"], verdict["noise"]
    for key, value in distance.items():
        spread = "" if noise is None else f" vs noise {noise[key]:.4f} ({_verdict(verdict['within_noise'][key])})"
        lines.append(f"- {key.replace('_', ' ')}: {verdict['candidate']} − {verdict['baseline']} = {value:.4f}{spread}")
    lines.append(f"- curves agree within noise: {_verdict(verdict['agree'])}")
    return lines


def _decisions(per_layer: dict[str, Any]) -> str:
    counts = Counter(label for layer in per_layer.values() for label in layer["decisions"])
    return ", ".join(f"{label} ×{count}" for label, count in sorted(counts.items()))


def eval_table(results: dict[str, Any]) -> list[str]:
    evaluation = results["eval"]
    lines = [
        "| policy | S | perplexity | vs exact | target | verdict | decisions (layers × heads) | worst head "
        "estimated rel. L2 | worst head rel. L2 | min cosine |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in evaluation["rows"]:
        policy, seq = row["policy"], row["seq"]
        if "ppl" not in row:
            lines.append(f"| {policy} | {seq} | error: {row['error']} | | | | | | | |")
            continue
        per_layer = evaluation["heads"][policy].get(str(seq), {})
        worst = max((e for layer in per_layer.values() for e in layer["rel_l2"]), default=float("nan"))
        estimated = [e for layer in per_layer.values() for values in layer["estimated_error"].values()
                     for e in values if e is not None]
        cosine = min((c for layer in per_layer.values() for c in layer["cosine"]), default=float("nan"))
        target = row.get("target")
        lines.append(
            f"| {policy} | {seq} | {row['ppl']:.4f} | {row.get('rel_change', 0.0):+.3%} | "
            f"{'' if target is None else f'±{target:.1%}'} | {_verdict(row.get('pass'))} | {_decisions(per_layer)} | "
            f"{f'{max(estimated):.2e}' if estimated else 'n/a'} | {worst:.2e} | {cosine:.6f} |"
        )
    return lines


def table(results_path: Path) -> str:
    """Both tables, with a caption naming the model, the machine and the source file."""
    results = json.loads(results_path.read_text())
    env, config = results["env"], results["config"]
    model, train = config["model"], config["train"]
    caption = (
        f"Byte-level GPT ({model['layers']} layers, d_model {model['d_model']}, {model['heads']} heads of "
        f"{model['head_dim']}, RoPE, context {model['context']}) trained {train['steps']} steps × "
        f"{config['tokens_per_step']} tokens on the Python standard library "
        f"({results['corpus']['train_bytes'] / 1e6:.0f} MB; held out: every {results['corpus']['held_out_every']}th "
        f"file); perplexity per byte, on one {env['gpu'] or env['cpu']} ({env['date'][:10]}). "
        f"Source: [`{results_path.as_posix()}`]({results_path.as_posix()})."
    )
    return "\n".join([caption, "", *training_table(results), "", *eval_table(results)])


def plot_curves(results: dict[str, Any], path: Path) -> Path:
    """PNG of the smoothed training loss of every run (raw in the background; the second run dashed, as it
    should lie on the first) and of each run's smoothed difference to the first."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    runs, window = results["runs"], results["agreement"]["smooth_window"]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 7), sharex=True, height_ratios=(2, 1))
    base = trailing_mean(runs[0]["losses"], window)
    for index, run in enumerate(runs):
        color, curve = f"C{index}", trailing_mean(run["losses"], window)
        steps = range(1, len(curve) + 1)
        top.plot(steps, run["losses"], color=color, alpha=0.2, linewidth=0.6)
        top.plot(steps, curve, color=color, linestyle="--" if index == 1 else "-",
                 label=f"{run['name']} ({run['tokens_per_s']:,.0f} tok/s)")
        if index:
            bottom.plot(steps, curve - base, color=color, label=f"{run['name']} − {runs[0]['name']}")
    top.set_ylim(top=min(top.get_ylim()[1], float(base[len(base) // 20 :].max()) + 0.5))
    top.set_ylabel("training loss (nats/byte)")
    top.legend()
    bottom.axhline(0, color="gray", linewidth=0.5)
    bottom.set(xlabel="step", ylabel=f"difference ({window}-step mean)")
    bottom.legend()
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main() -> None:
    parser = table_parser(__doc__, "quality-table")
    parser.add_argument("--plot", type=Path, help="write the training curves to this PNG instead")
    args = parser.parse_args()
    if args.plot:
        print(plot_curves(json.loads(args.results.read_text()), args.plot))
        return
    publish(table(args.results), args)


if __name__ == "__main__":
    main()
