"""Naive float64 attention: the reference every backend is measured against.

Materialises the full [Sq, Sk] score matrix one (batch, head) at a time, in float64, with the same
semantics as `adaattn_core.attention` (layouts, GQA, bottom-right causal, fully masked rows → 0, lse
= -inf). Meant for tests and error reports on small and medium problems; memory is O(Sq·Sk).
"""

from __future__ import annotations

import math
from typing import Any

from ._arrays import library_name, namespace, on_inputs_device
from .problem import check_output, describe, to_bhsd, visible


def masked_softmax(xp: Any, scores: Any, mask: Any = None, *, with_lse: bool = True) -> tuple[Any, Any]:
    """(P, lse): the row softmax over the last axis and its log-sum-exp, in the scores' dtype and array library
    (NumPy or CuPy), the scores where `mask` is False (a bool array broadcasting against them, e.g. from
    `problem.visible`; None: none) masked first. lse is None unless `with_lse`.

    Stable (shifted by the row max); fully masked rows give P = 0 and lse = −inf, not NaN. Serves the reference,
    `head_errors`, `precision.exact_rows` and `estimators.pooled_map`; the probe (`estimators._probe_numpy`) keeps
    its own, since its entropy needs the shifted scores and weights.
    """
    if mask is not None:
        scores = xp.where(mask, scores, -xp.inf)
    if scores.shape[-1]:
        row_max = scores.max(axis=-1, keepdims=True)
    else:
        row_max = xp.full((*scores.shape[:-1], 1), -xp.inf, dtype=scores.dtype)
    shift = xp.where(xp.isneginf(row_max), 0.0, row_max)
    weights = xp.exp(scores - shift)
    total = weights.sum(axis=-1, keepdims=True)
    safe = xp.where(total > 0, total, 1.0)
    lse = xp.where(total > 0, shift + xp.log(safe), -xp.inf)[..., 0] if with_lse else None
    return weights / safe, lse


@on_inputs_device
def attention_reference(
    q: Any, k: Any, v: Any, *, causal: bool = False, scale: float | None = None, layout: str = "bhsd"
) -> tuple[Any, Any]:
    """`attention`'s result computed in float64 on the materialised S×S scores (for tests and error studies).

    Same formula, arguments and errors as `attention` (inputs validated by `describe`): out[b, h, i] =
    Σ_j softmax_j(scale · q[b, h, i] · k[b, h // G, j]) v[b, h // G, j], bottom-right causal, rows that see no key
    give out = 0 and lse = −inf. Returns float64 (out in the caller's layout, lse [B, Hq, Sq]) on the inputs'
    library; memory O(Sq · Sk) per head.
    """
    problem = describe(q, k, v, causal=causal, scale=scale, layout=layout)
    xp = namespace(problem.library)
    qb, kb, vb = (to_bhsd(x, layout).astype(xp.float64) for x in (q, k, v))
    batch, heads_q, seqlen_q = problem.batch, problem.heads_q, problem.seqlen_q
    group, scale = problem.group_size, problem.scale
    mask = problem.visible(xp.arange(seqlen_q), xp.arange(problem.seqlen_k))
    out = xp.zeros(qb.shape, dtype=xp.float64)
    lse = xp.zeros((batch, heads_q, seqlen_q), dtype=xp.float64)
    for b in range(batch):
        for h in range(heads_q):
            probs, lse[b, h] = masked_softmax(xp, (qb[b, h] @ kb[b, h // group].T) * scale, mask)
            out[b, h] = probs @ vb[b, h // group]
    return to_bhsd(out, layout), lse


@on_inputs_device
def attention_backward_reference(
    dout: Any, q: Any, k: Any, v: Any, *, causal: bool = False, scale: float | None = None, layout: str = "bhsd"
) -> tuple[Any, Any, Any]:
    """`attention_backward`'s gradients in float64 by the textbook formulas on the materialised softmax P:
    dV = Pᵀ dout, dS = P ∘ (dout Vᵀ − rowsum(dout ∘ out)), dQ = scale · dS K, dK = scale · dSᵀ Q (dK, dV summed over
    each K/V head's query heads). q, k, v, causal, scale, layout as for `attention` (validated by `describe`);
    dout with out's shape and q's dtype and library. Returns float64 (dq, dk, dv) in the caller's layout.
    """
    problem = describe(q, k, v, causal=causal, scale=scale, layout=layout)
    check_output("dout", dout, problem, problem.output_shape(), problem.dtype)
    xp = namespace(problem.library)
    qb, kb, vb, dob = (to_bhsd(x, layout).astype(xp.float64) for x in (q, k, v, dout))
    heads_q, group, scale = problem.heads_q, problem.group_size, problem.scale
    mask = problem.visible(xp.arange(problem.seqlen_q), xp.arange(problem.seqlen_k))
    dq, dk, dv = xp.zeros_like(qb), xp.zeros_like(kb), xp.zeros_like(vb)
    for b in range(qb.shape[0]):
        for h in range(heads_q):
            kv = h // group
            probs, _ = masked_softmax(xp, (qb[b, h] @ kb[b, kv].T) * scale, mask, with_lse=False)
            dv[b, kv] += probs.T @ dob[b, h]
            dprobs = dob[b, h] @ vb[b, kv].T
            dscores = probs * (dprobs - (dprobs * probs).sum(axis=-1, keepdims=True)) * scale
            dq[b, h] = dscores @ kb[b, kv]
            dk[b, kv] += dscores.T @ qb[b, h]
    return to_bhsd(dq, layout), to_bhsd(dk, layout), to_bhsd(dv, layout)


def rel_l2_per_head(approx: Any, exact: Any) -> Any:
    """‖approx − exact‖ / ‖exact‖ per head over (batch, rows, D), on the inputs' device; inputs [B, n, m, D];
    ‖approx − exact‖ where ‖exact‖ = 0 (so 0/0 gives 0). The guards' measure, on their probe rows."""
    xp = namespace(library_name(approx))
    diff = ((approx - exact) ** 2).sum(axis=(0, 2, 3))
    norm = (exact**2).sum(axis=(0, 2, 3))
    return xp.sqrt(diff / xp.where(norm > 0, norm, 1))


def head_errors(
    q: Any, k: Any, v: Any, out: Any, *, causal: bool, scale: float, rows: Any | None = None,
    chunk_elements: int = 1 << 24,
) -> list[float]:
    """Relative L2 error per query head of a finished output against float64 attention.

    q, k, v, out: [B, H, S, D] views (NumPy or CuPy; computed on their device). For query head h the error is
    ‖out[:, h, rows] − ref[:, h, rows]‖ / ‖ref[:, h, rows]‖ over all batch entries (just ‖out‖ where the
    reference is 0, e.g. rows that see no key), `rows` a 1-D index array (None: every row). Scores are formed
    in row chunks of about `chunk_elements` float64 values, so memory stays O(B·chunk·Sk).
    """
    xp = namespace(library_name(q))
    batch, heads_q, seqlen_q, _ = q.shape
    seqlen_k = k.shape[2]
    group = heads_q // max(k.shape[1], 1)
    picked = xp.arange(seqlen_q) if rows is None else xp.asarray(rows)
    step = max(1, chunk_elements // max(1, batch * seqlen_k))
    keys = xp.arange(seqlen_k)
    errors = []
    for h in range(heads_q):
        kh, vh = k[:, h // group].astype(xp.float64), v[:, h // group].astype(xp.float64)
        diff = norm = 0.0
        for start in range(0, len(picked), step):
            index = picked[start : start + step]
            scores = (q[:, h][:, index].astype(xp.float64) @ kh.swapaxes(-1, -2)) * scale
            # Rebuilt per head: a [chunk, Sk] compare beside a [B, chunk, D] x [D, Sk] product, where keeping every
            # chunk's mask would hold len(rows) x Sk bytes at once.
            mask = visible(index, keys, seqlen_q, seqlen_k, causal)
            probs, _ = masked_softmax(xp, scores, mask, with_lse=False)
            ref = probs @ vh
            got = out[:, h][:, index].astype(xp.float64)
            diff += float(((got - ref) ** 2).sum())
            norm += float((ref**2).sum())
        errors.append(math.sqrt(diff / norm) if norm > 0 else math.sqrt(diff))
    return errors
