"""Held-out perplexity per attention policy, and per layer and head: decisions, errors and entropy.

For every policy in `adaattn_core.policy.POLICIES` at run time ("exact" first), the AdaAttn-trained model
scores the held-out windows with its attention through the PyTorch adapter under that policy; perplexity
= exp(mean next-byte NLL), compared with "exact". Per head, on the post-RoPE q, k, v of one held-out window
per layer (`activations.capture_qkv`), the core is called directly with a `Report` (the adapter takes
none): the decision (path/precision[/rank]), the policy's own estimates (`Report.estimates`, as the policy
fills it) and the measured error of its output against float64 attention computed here in torch (cosine
similarity and relative L2), plus the attention entropy of the head (mean over query rows, nats), from the
same float64 pass, in row chunks so no [B, H, S, S] buffer is ever formed.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from adaattn_adapters.torch import _from_core, _to_core

import adaattn_core
from adaattn_core.policy import POLICIES

from .activations import QKV
from .model import GPT
from .train import autocast, synchronize

#: Largest relative perplexity change vs "exact" each preset may cause (issue #9's targets).
PPL_TARGETS = {"quality": 0.001, "balanced": 0.005}
ROW_CHUNK = 256


def policy_names() -> list[str]:
    """"exact", then every other registered policy in registration order."""
    return ["exact", *(name for name in POLICIES if name != "exact")]


def held_out_loss(model: GPT, windows: np.ndarray, batch: int, device: torch.device) -> float:
    """Mean next-byte NLL (nats) of `windows` [n, S + 1] under the model's current attention."""
    model.eval()
    total = 0.0
    with torch.no_grad(), autocast(device):
        for start in range(0, len(windows), batch):
            chunk = torch.from_numpy(windows[start : start + batch]).to(device)
            total += float(model.loss(chunk)) * len(chunk)
    model.train()
    return total / len(windows)


def reference_and_entropy(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Causal float64 attention output [B, H, S, D] and mean attention entropy per head [H] (nats)."""
    q64, k64, v64 = (x.double() for x in (q, k, v))
    seq, scale = q.shape[2], 1.0 / math.sqrt(q.shape[-1])
    out = torch.empty_like(q64)
    entropy = torch.zeros(q.shape[1], dtype=torch.float64, device=q.device)
    for start in range(0, seq, ROW_CHUNK):
        stop = min(seq, start + ROW_CHUNK)
        scores = (q64[:, :, start:stop] @ k64[:, :, :stop].transpose(-1, -2)) * scale
        rows = torch.arange(start, stop, device=q.device)[:, None]
        scores = scores.masked_fill(torch.arange(stop, device=q.device)[None, :] > rows, -math.inf)
        log_p = torch.log_softmax(scores, dim=-1)
        p = log_p.exp()
        out[:, :, start:stop] = p @ v64[:, :, :stop]
        entropy += -(p * log_p.nan_to_num(neginf=0.0)).sum(-1).sum((0, 2))
    return out, entropy / (q.shape[0] * seq)


def _jsonable(value: Any) -> Any:
    """`Report.estimates` as JSON: arrays and tensors become lists, other objects their str."""
    if isinstance(value, dict):
        return {str(key): _jsonable(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(item) for item in value]
    if hasattr(value, "tolist"):
        return value.tolist()
    return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)


def estimated_errors(estimates: dict[str, Any], heads: int) -> dict[str, list[float | None]]:
    """Per-head ``estimated_error`` of every estimator section of JSON-ready `Report.estimates`, in either form
    the policies use: a list with one dict per head (rank) or ``{"heads": {"<h>": dict}}`` (precision)."""
    found: dict[str, list[float | None]] = {}
    for section, content in estimates.items():
        entries = content.get("heads") if isinstance(content, dict) else content
        if isinstance(entries, list):
            per_head = [entries[h] if h < len(entries) else None for h in range(heads)]
        elif isinstance(entries, dict):
            per_head = [entries.get(str(h)) for h in range(heads)]
        else:
            continue
        found[section] = [entry.get("estimated_error") if isinstance(entry, dict) else None for entry in per_head]
    return found


def head_report(policy: str, qkv: QKV, reference: torch.Tensor) -> dict[str, Any]:
    """One layer under `policy`: per-head decisions, the policy's estimates (raw, and the per-head estimated
    errors found in them), the measured cosine similarity and relative L2 against `reference`."""
    q, k, v = qkv
    report = adaattn_core.Report()
    synchronize(q.device)
    core_out = adaattn_core.attention(*(_to_core(x) for x in (q, k, v)), causal=True, policy=policy, report=report)
    out = _from_core(core_out).double()
    decisions: list[str] = [""] * q.shape[1]
    for label, heads in report.decisions().items():
        for head in heads:
            decisions[head] = label
    diff, ref = (out - reference).transpose(0, 1).flatten(1), reference.transpose(0, 1).flatten(1)
    out_h = out.transpose(0, 1).flatten(1)
    cosine = (out_h * ref).sum(1) / (out_h.norm(dim=1) * ref.norm(dim=1)).clamp_min(1e-300)
    estimates = _jsonable(report.estimates)
    return {"backend": report.backend, "decisions": decisions, "estimates": estimates,
            "estimated_error": estimated_errors(estimates, q.shape[1]),
            "cosine": cosine.tolist(), "rel_l2": (diff.norm(dim=1) / ref.norm(dim=1).clamp_min(1e-300)).tolist()}


def evaluate_policies(
    model: GPT, windows_by_seq: dict[int, np.ndarray], captures: dict[int, dict[int, QKV]], batch: int,
    device: torch.device, log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Perplexity rows (policy × context) and per-layer/head reports for every registered policy.

    `windows_by_seq[S]`: held-out windows at context S; `captures[S][layer]`: that layer's (q, k, v).
    A policy that raises is recorded with its error instead of numbers."""
    references = {seq: {layer: reference_and_entropy(*qkv) for layer, qkv in by_layer.items()}
                  for seq, by_layer in captures.items()}
    entropy = {str(seq): {str(layer): ent.tolist() for layer, (_, ent) in by_layer.items()}
               for seq, by_layer in references.items()}
    rows: list[dict[str, Any]] = []
    heads: dict[str, Any] = {}
    for policy in policy_names():
        model.set_attention("adaattn", policy)
        heads[policy] = {}
        for seq, windows in windows_by_seq.items():
            row: dict[str, Any] = {"policy": policy, "seq": seq, "tokens": int(windows.shape[0] * seq)}
            try:
                synchronize(device)
                began = time.perf_counter()
                nll = held_out_loss(model, windows, batch, device)
                row.update(nll=nll, ppl=math.exp(nll), eval_s=time.perf_counter() - began)
                heads[policy][str(seq)] = {str(layer): head_report(policy, qkv, references[seq][layer][0])
                                           for layer, qkv in captures[seq].items()}
            except Exception as error:  # a policy that cannot run here is a row that says why
                row["error"] = f"{type(error).__name__}: {error}"[:300]
            rows.append(row)
            log(f"  [{policy}] S={seq}: " + (f"ppl {row['ppl']:.4f}" if "ppl" in row else row["error"]))
    model.set_attention("adaattn")
    _compare(rows)
    return {"policies": policy_names(), "targets": PPL_TARGETS, "rows": rows, "heads": heads, "entropy": entropy}


def _compare(rows: list[dict[str, Any]]) -> None:
    """Add each row's relative perplexity change vs "exact" at the same context and its target verdict."""
    exact = {row["seq"]: row.get("ppl") for row in rows if row["policy"] == "exact"}
    for row in rows:
        base = exact.get(row["seq"])
        if "ppl" not in row or base is None:
            continue
        row["rel_change"] = row["ppl"] / base - 1.0
        target = PPL_TARGETS.get(row["policy"])
        row["target"] = target
        row["pass"] = None if target is None else abs(row["rel_change"]) <= target
