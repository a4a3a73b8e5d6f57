"""Training runs, the step-count calibration and the agreement criterion between runs.

Every run starts from the same initial weights (`TrainConfig.init_seed`) and reads training windows in the
order of its data seed: the AdaAttn and SDPA runs share one data seed, and a second SDPA run with another
data seed measures how far two runs that *should* agree drift apart (the noise).

Agreement ("within noise"): for each of three distances between the AdaAttn and SDPA runs — final smoothed
training loss (mean of the last `smooth` steps), held-out loss, and the RMS difference of the smoothed curves
over the second half of training — the AdaAttn-vs-SDPA distance must be at most `NOISE_FACTOR` × the same
distance between the two SDPA runs, or at most `NOISE_FLOOR` nats. The factor allows for the noise being
estimated from a single pair of runs; the floor keeps a lucky, nearly identical pair of SDPA runs from
failing a backward that agrees to the third decimal.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field

import numpy as np
import torch

from .data import BatchSampler
from .model import GPT, GPTConfig

NOISE_FACTOR = 2.0
NOISE_FLOOR = 0.005  # nats
CALIBRATION_SEED = 2**31 - 1  # data seed of the scratch steps that time a backend


@dataclass(frozen=True)
class TrainConfig:
    """Optimisation settings shared by every run (AdamW, linear warm-up, cosine decay to `min_lr_ratio`)."""

    steps: int = 500
    batch: int = 8
    lr: float = 1e-3
    warmup: int = 50
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    init_seed: int = 0
    log_every: int = 50

    def lr_at(self, step: int) -> float:
        if step < self.warmup:
            return self.lr * (step + 1) / self.warmup
        progress = (step - self.warmup) / max(1, self.steps - self.warmup)
        return self.lr * (self.min_lr_ratio + (1 - self.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


@dataclass
class RunResult:
    """One training run: per-step losses (nats), throughput and wall time."""

    name: str
    backend: str
    data_seed: int
    losses: list[float]
    tokens_per_s: float
    wall_s: float
    model: GPT | None = field(default=None, repr=False)

    def smoothed(self, window: int) -> np.ndarray:
        return trailing_mean(self.losses, window)

    def as_dict(self) -> dict[str, object]:
        return {"name": self.name, "backend": self.backend, "data_seed": self.data_seed, "losses": self.losses,
                "tokens_per_s": self.tokens_per_s, "wall_s": self.wall_s}


def trailing_mean(values: list[float], window: int) -> np.ndarray:
    """Mean of the last `window` values at every step (over fewer at the start): the smoothed loss curve."""
    array = np.asarray(values, dtype=np.float64)
    sums = np.cumsum(np.insert(array, 0, 0.0))
    ends = np.arange(1, array.size + 1)
    starts = np.maximum(0, ends - window)
    return (sums[ends] - sums[starts]) / (ends - starts)


def autocast(device: torch.device) -> contextlib.AbstractContextManager[None]:
    """bf16 autocast on CUDA; float32 (no autocast) on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def new_model(model_config: GPTConfig, train_config: TrainConfig, backend: str, device: torch.device) -> GPT:
    """The run's model: weights from `init_seed` (identical for every run), attention through `backend`.

    On the CPU this turns on flushing of denormals (process-wide): AdamW's second moments reach them and
    every op on them is ~10× slower."""
    if device.type == "cpu":
        torch.set_flush_denormal(True)
    torch.manual_seed(train_config.init_seed)
    model = GPT(model_config).to(device)
    model.set_attention(backend)
    return model


def _optimizer(model: GPT, config: TrainConfig, device: torch.device) -> torch.optim.Optimizer:
    decay = [p for p in model.parameters() if p.dim() >= 2]
    other = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": other, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=config.lr, betas=(0.9, 0.95), fused=device.type == "cuda")


def _steps(
    model: GPT, config: TrainConfig, sampler: BatchSampler, device: torch.device, steps: int
) -> Iterator[torch.Tensor]:
    """Run `steps` optimisation steps, yielding each step's loss (a device scalar, not synchronised)."""
    optimizer = _optimizer(model, config, device)
    model.train()
    for step in range(steps):
        for group in optimizer.param_groups:
            group["lr"] = config.lr_at(step)
        windows = torch.from_numpy(sampler.next()).to(device, non_blocking=True)
        with autocast(device):
            loss = model.loss(windows)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        yield loss.detach()


def seconds_per_step(
    model_config: GPTConfig, train_config: TrainConfig, backend: str, tokens: np.ndarray, device: torch.device,
    *, warmup: int = 3, timed: int = 6,
) -> float:
    """Wall seconds of one training step through `backend`, on a scratch model (first-use compilation and
    autotuning fall in the untimed warm-up steps)."""
    model = new_model(model_config, train_config, backend, device)
    sampler = BatchSampler(tokens, train_config.batch, model_config.context, CALIBRATION_SEED)
    steps = _steps(model, train_config, sampler, device, warmup + timed)
    for _ in range(warmup):
        next(steps)
    synchronize(device)
    began = time.perf_counter()
    for _ in steps:
        pass
    synchronize(device)
    return (time.perf_counter() - began) / timed


def train(
    name: str, backend: str, data_seed: int, model_config: GPTConfig, train_config: TrainConfig,
    tokens: np.ndarray, device: torch.device, log: Callable[[str], None] = print,
) -> RunResult:
    """Train a fresh model for `train_config.steps` steps; tokens/s counts the steps after the first log line
    (which absorb first-use kernel compilation)."""
    model = new_model(model_config, train_config, backend, device)
    sampler = BatchSampler(tokens, train_config.batch, model_config.context, data_seed)
    step_tokens = train_config.batch * model_config.context
    losses: list[torch.Tensor] = []
    began = time.perf_counter()
    last_log, first_log = (0, began), (0, began)
    for step, loss in enumerate(_steps(model, train_config, sampler, device, train_config.steps), start=1):
        losses.append(loss)
        if step % train_config.log_every == 0 or step == train_config.steps:
            value = float(loss)  # synchronises
            now = time.perf_counter()
            rate = (step - last_log[0]) * step_tokens / (now - last_log[1])
            log(f"  [{name}] step {step}/{train_config.steps} loss {value:.4f} ({rate:,.0f} tok/s)")
            first_log = first_log if first_log[0] else (step, now)
            last_log = (step, now)
    synchronize(device)
    end = time.perf_counter()
    timed_steps = train_config.steps - first_log[0]
    rate = (timed_steps * step_tokens / (end - first_log[1]) if timed_steps
            else train_config.steps * step_tokens / (end - began))
    values = torch.stack(losses).float().cpu().tolist()
    if not all(math.isfinite(v) for v in values):
        raise FloatingPointError(f"run {name}: non-finite training loss")
    return RunResult(name, backend, data_seed, values, rate, end - began, model)


def agreement(
    candidate: RunResult, baseline: RunResult, noise: RunResult | None, held_out: dict[str, float], smooth: int
) -> dict[str, object]:
    """The three distances (see the module docstring) for candidate-vs-baseline and, with a noise run,
    baseline-vs-noise, and whether each (and all) are within noise. `held_out` maps run names to held-out loss."""

    def distances(a: RunResult, b: RunResult) -> dict[str, float]:
        sa, sb = a.smoothed(smooth), b.smoothed(smooth)
        half = sa.size // 2
        return {
            "final_smoothed_train_loss": abs(float(sa[-1] - sb[-1])),
            "held_out_loss": abs(held_out[a.name] - held_out[b.name]),
            "curve_rms_second_half": float(np.sqrt(np.mean((sa[half:] - sb[half:]) ** 2))),
        }

    distance = distances(candidate, baseline)
    result: dict[str, object] = {"smooth_window": smooth, "noise_factor": NOISE_FACTOR, "noise_floor": NOISE_FLOOR,
                                 "candidate": candidate.name, "baseline": baseline.name, "distance": distance}
    if noise is None:
        result.update(noise_run=None, noise=None, within_noise=None, agree=None)
        return result
    spread = distances(noise, baseline)
    within = {key: value <= max(NOISE_FACTOR * spread[key], NOISE_FLOOR) for key, value in distance.items()}
    result.update(noise_run=noise.name, noise=spread, within_noise=within, agree=all(within.values()))
    return result
