"""One command for issue #9: corpus → train (SDPA, AdaAttn exact, SDPA with another data seed) → held-out
loss and agreement → perplexity and per-head reports per policy → activation capture → quality.json + PNG.

    python3 -m benchmarks.quality.run --out DIR                       # GPU: 240 s of training, ~5-6 min in all
    python3 -m benchmarks.quality.run --out DIR --device cpu --steps 3 --layers 1 --context 64 \
        --d-model 64 --heads 2 --batch 2 --eval-tokens 256            # CPU smoke run (seconds)

`--steps 0` (the default) sizes the runs to `--train-budget-s` seconds of training in all, from the measured
step time of the slower backend (`train.seconds_per_step`); every run takes the same number of steps.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from adaattn_core.bench import environment, write_json

from .activations import capture_qkv, default_activations_path, save_activations
from .data import VOCAB, held_out_windows, load_corpus
from .evaluate import evaluate_policies, held_out_loss
from .model import BACKENDS, GPTConfig
from .table import plot_curves
from .train import RunResult, TrainConfig, agreement, autocast, seconds_per_step, train

DATA_SEED, NOISE_DATA_SEED = 1, 2


def log(message: str) -> None:
    print(message, flush=True)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, required=True, help="directory for quality.json and quality-curves.png")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--steps", type=int, default=0, help="training steps per run (0: from --train-budget-s)")
    parser.add_argument("--train-budget-s", type=float, default=240.0, help="seconds of training, all runs")
    parser.add_argument("--max-steps", type=int, default=3000, help="cap on the budgeted step count")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--lr", type=float, default=TrainConfig.lr)
    parser.add_argument("--layers", type=int, default=GPTConfig.layers)
    parser.add_argument("--d-model", type=int, default=GPTConfig.d_model)
    parser.add_argument("--heads", type=int, default=GPTConfig.heads)
    parser.add_argument("--context", type=int, default=GPTConfig.context)
    parser.add_argument("--long-context", type=int, default=None,
                        help="second evaluation context (default 2 × context; 0: none)")
    parser.add_argument("--no-noise-run", action="store_true", help="skip the second SDPA run (no agreement verdict)")
    parser.add_argument("--eval-tokens", type=int, default=131072, help="held-out tokens scored per context")
    parser.add_argument("--eval-batch", type=int, default=4)
    parser.add_argument("--activations", type=Path, default=None,
                        help="activation file to write (default $ADAATTN_ACTIVATIONS or .cache/activations.npz)")
    return parser.parse_args(argv)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    device = pick_device(args.device)
    env = environment("gpu" if device.type == "cuda" else "cpu")
    log(f"device: {env['gpu'] or env['cpu']}")
    timings: dict[str, float] = {}

    corpus = load_corpus()
    log(f"corpus: {corpus.files} files, {corpus.train.size / 1e6:.1f} MB train, {corpus.held_out.size / 1e6:.2f} MB "
        f"held out ({corpus.source})")
    model_config = GPTConfig(layers=args.layers, d_model=args.d_model, heads=args.heads, context=args.context,
                             vocab=VOCAB)
    plans = [("sdpa", "sdpa", DATA_SEED), ("adaattn-exact", "adaattn", DATA_SEED)]
    if not args.no_noise_run:
        plans.append(("sdpa-seed2", "sdpa", NOISE_DATA_SEED))
    steps, step_s = args.steps, {}
    if steps <= 0:
        probe = TrainConfig(steps=10, batch=args.batch, lr=args.lr)
        step_s = {b: seconds_per_step(model_config, probe, b, corpus.train, device) for b in BACKENDS}
        steps = max(1, min(args.max_steps, int(args.train_budget_s / (len(plans) * max(step_s.values())))))
        log(f"step time {', '.join(f'{b} {s * 1e3:.1f} ms' for b, s in step_s.items())} → {steps} steps per run")
    timings["calibrate_s"] = time.perf_counter() - started
    train_config = TrainConfig(steps=steps, batch=args.batch, lr=args.lr, warmup=min(50, max(1, steps // 10)),
                               log_every=max(1, steps // 10))

    runs: list[RunResult] = []
    for name, backend, seed in plans:
        log(f"training {name} ({backend}, data seed {seed}, {steps} steps)")
        runs.append(train(name, backend, seed, model_config, train_config, corpus.train, device, log))
    timings["train_s"] = sum(run.wall_s for run in runs)

    began = time.perf_counter()
    long_context = 2 * args.context if args.long_context is None else args.long_context
    seqs = [args.context, *([long_context] if long_context else [])]
    windows = {seq: held_out_windows(corpus.held_out, seq, args.eval_tokens) for seq in seqs}
    held_out = {run.name: held_out_loss(run.model, windows[args.context], args.eval_batch, device) for run in runs}
    log("held-out loss: " + ", ".join(f"{name} {loss:.4f}" for name, loss in held_out.items()))
    smooth = max(1, min(100, steps // 10))
    verdict = agreement(runs[1], runs[0], runs[2] if len(runs) > 2 else None, held_out, smooth)
    log(f"agreement: {verdict['agree']} (distance {verdict['distance']}, noise {verdict['noise']})")

    model = runs[1].model
    captures = {seq: capture_qkv(model, torch.from_numpy(windows[seq][:1, :-1]).to(device), autocast(device))
                for seq in seqs}
    evaluation = evaluate_policies(model, windows, captures, args.eval_batch, device, log)
    timings["eval_s"] = time.perf_counter() - began

    layers = sorted({0, args.layers // 2, args.layers - 1})
    activations = save_activations(args.activations or default_activations_path(), captures, layers,
                                   {"model": model_config.as_dict(), "trained_steps": steps, "device": env["gpu"]
                                    or env["cpu"], "source": "held-out window 0, AdaAttn-trained model"})
    log(f"activations: {activations} (layers {layers}, seqs {seqs})")

    args.out.mkdir(parents=True, exist_ok=True)
    timings["total_s"] = time.perf_counter() - started
    results: dict[str, Any] = {
        "env": env,
        "config": {"model": model_config.as_dict(), "train": train_config.as_dict(), "tokens_per_step":
                   args.batch * args.context, "seconds_per_step_probe": step_s, "eval_tokens": args.eval_tokens,
                   "eval_seqs": seqs, "device": str(device), "autocast": "bfloat16" if device.type == "cuda"
                   else None, "command": " ".join(sys.argv)},
        "corpus": corpus.describe(),
        "runs": [run.as_dict() for run in runs],
        "held_out_loss": held_out,
        "held_out_ppl": {name: math.exp(loss) for name, loss in held_out.items()},
        "agreement": verdict,
        "eval": evaluation,
        "activations": {"path": str(activations), "layers": layers, "seqs": seqs},
        "timings_s": timings,
    }
    path = write_json(results, args.out / "quality.json")
    log(f"wrote {path} in {timings['total_s']:.0f} s")
    png = args.out / "quality-curves.png"
    try:
        log(f"wrote {plot_curves(results, png)}")
    except ImportError as error:  # the JSON holds the curves: the PNG can be drawn on another machine
        log(f"no PNG ({error}); draw it with: python3 -m benchmarks.quality.table {path} --plot {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
