"""The low-rank attention path: exact near field + landmark far field, merged by log-sum-exp.

Geometry. Queries and keys are placed on one position axis of length L = max(Sq, Sk): query row i at
i + (L − Sq), key j at j + (L − Sk), so the bottom-right causal rule "j <= i + Sk − Sq" becomes "key
position <= query position". The axis (padded to Lp) is cut into blocks of w = `BLOCK` positions and
segments of g = w·t positions; `rank` r sets g = w·ceil(L / (r·w)), so there are nc = Lp / g <= r segments.

For a query at position p (block β, segment c), the approximation uses, all scaled by `scale`:

- near field: every key of block β exactly (causal: positions <= p);
- fine landmarks: for each other block β' of segment c (causal: β' < β), the mean key k̄ and mean value v̄
  of its n keys, entered as one key with score q·k̄ + log n and value v̄;
- coarse landmarks: the same for every other segment c' (causal: c' < c: fully past segments only, so no
  future token leaks into any row);
- sinks: optional exact keys per head (attention sinks found by the probe's column mass), taken out of
  the blocks and landmarks they belong to so that no key counts twice.

Each key is counted once: near + fine + coarse + sinks partition the keys a row may see. With the common
shift M (row max over all parts), out = Σ_parts exp(S − M) V / Σ_parts Σ exp(S − M), lse = M + log(·).
The far field replaces Σ_{j∈block} exp(q·k_j) v_j by n exp(q·k̄) v̄: exact when the scores within a
block are equal (diffuse rows), poor for peaked rows — which the rank policy's guard rejects.

Cost per head: O(Lp · (w + t + nc + n_sinks) · D) with t = g / w, i.e. O(S·(w + r + S/(r·w))·D); memory
the same number of scores, never S×S. Computed in float32 (float64 for float64 inputs) with batched
matmuls of the array library (BLAS on NumPy, cuBLAS through CuPy): two parts of two matmuls each (near
field per block; far field per segment, its fine + coarse landmarks and sinks stacked as one key set),
masks added in place, the softmax merge in place. When the grid needs no padding (Lp = L, which
`balanced_rank` arranges for lengths that are multiples of w), q, k and v are converted once, without
zero-padded copies.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

import numpy as np

from ._arrays import compute_dtype, namespace, on_device
from .launch_config import LOWRANK_BLOCK
from .problem import AttentionProblem

#: Near-field block w (positions). 64 keeps the exact band narrow while the landmark grid stays fine; the fused
#: kernel (cuda_src/lowrank_fwd.cu) is built for it.
BLOCK = LOWRANK_BLOCK
#: Scores held at once per head chunk (B · heads · Lp · keys per query); bounds memory to ~256 MiB (float32).
CHUNK_ELEMENTS = 1 << 26


@dataclass(frozen=True)
class Geometry:
    """Positions of one low-rank problem: L, padded Lp, block w, segment g, and the query/key offsets."""

    length: int
    padded: int
    block: int
    segment: int
    q_offset: int
    k_offset: int

    @property
    def blocks(self) -> int:
        return self.padded // self.block

    @property
    def segments(self) -> int:
        return self.padded // self.segment

    @property
    def fine(self) -> int:
        """Blocks (fine landmarks) per segment, t."""
        return self.segment // self.block

    @property
    def pads_keys(self) -> bool:
        """Whether some grid position holds no key (Lp > Sk): those positions are masked."""
        return self.padded != self.length - self.k_offset

    def sink_positions(self, xp: Any, sinks: Any) -> Any:
        """Grid positions of sink keys ([n, ns] key indices, −1 for padding, which stays −1): the keys sit
        k_offset positions into the grid."""
        return xp.where(sinks >= 0, sinks + self.k_offset, -1) if self.k_offset else sinks

    def keys_per_query(self, sinks: int = 0) -> int:
        """Scores computed per query position: w + t + nc + sinks (the cost relative to dense's Sk)."""
        return self.block + self.fine + self.segments + sinks


def geometry(seq_q: int, seq_k: int, rank: int) -> Geometry:
    """The position grid for `rank` coarse segments of BLOCK-position blocks (see the module docstring). Raises
    ValueError for rank < 1."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    length = max(seq_q, seq_k, 1)
    block = BLOCK
    segment = block * -(-length // (rank * block))
    padded = segment * -(-length // segment)
    return Geometry(length, padded, block, segment, length - seq_q, length - seq_k)


@cache  # a Python loop over divisors, asked twice per plan with the same lengths
def balanced_rank(seq_q: int, seq_k: int) -> int:
    """The rank r ≈ sqrt(L / w) that balances fine and coarse landmarks (t ≈ nc), minimising the cost.

    When L is a multiple of w, r is the divisor of nb = L / w closest to sqrt(nb) (by ratio) if one lies
    within a factor 2 of it: then the grid needs no padding (Lp = L) and the forward reads q, k, v in place
    (32k: r = 32, t = 16, cost w + t + nc = 112 against 110 for r = 23, whose grid pads to 33856).
    The guard's retries double r, which keeps Lp = L only while 2r divides nb. Otherwise round(sqrt(L / w)).
    """
    length = max(seq_q, seq_k, 1)
    root = (length / BLOCK) ** 0.5
    if length % BLOCK == 0:
        blocks = length // BLOCK
        divisors = [d for d in range(1, blocks + 1) if blocks % d == 0 and root / 2 <= d <= 2 * root]
        if divisors:
            return max(divisors, key=lambda d: (-abs(math.log(d / root)), d))
    return max(1, round(root))


def sink_table(heads: Sequence[int], sinks: dict[int, Sequence[int]] | None) -> np.ndarray:
    """[len(heads), n_sinks] int64 key indices of each head's sinks, padded with −1 (n_sinks may be 0)."""
    lists = [sorted(set((sinks or {}).get(h, ()))) for h in heads]
    table = np.full((len(heads), max((len(x) for x in lists), default=0)), -1, dtype=np.int64)
    for row, keys in zip(table, lists):
        row[: len(keys)] = keys
    return table


# --------------------------------------------------------------------------------------------------------------
# Shared pieces: padded keys, landmarks, masks


@dataclass
class _Keys:
    """Keys and values of the selected heads on the position grid, with their landmarks (ctype arrays).

    kp, vp [B, n, Lp, D]; key_bias [n, Lp] (0 for a key in the near field/landmarks, −inf for padding and
    sinks); kf, vf [B, n, nb, D] and log_nf [n, nb]; kc, vc [B, n, nc, D] and log_nc [n, nc];
    ks, vs [B, n, ns, D] and sink_pos [n, ns] (position, or −1 for padding). key_bias has a −inf only where the
    grid pads keys (`Geometry.pads_keys`) or ns > 0; otherwise the forward skips adding it. kp, vp are the inputs
    converted to ctype (no zero-padded copy) when the grid needs no padding.
    """

    kp: Any
    vp: Any
    key_bias: Any
    kf: Any
    vf: Any
    log_nf: Any
    kc: Any
    vc: Any
    log_nc: Any
    ks: Any
    vs: Any
    sink_pos: Any

    def take(self, xp: Any, index: Sequence[int]) -> _Keys:
        """The keys of heads `index` (positions in the head axis n), gathered on the head axis."""
        at = on_device(xp, list(index), np.int64)
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        per_batch = {"kp", "vp", "kf", "vf", "kc", "vc", "ks", "vs"}  # [B, n, ...]; the others [n, ...]
        return _Keys(**{name: x[:, at] if name in per_batch else x[at] for name, x in fields.items()})

    def first_sinks(self, count: int) -> _Keys:
        """These keys with only the first `count` sink columns (views; the dropped columns must be −1 for every
        head)."""
        return dataclasses.replace(self, ks=self.ks[:, :, :count], vs=self.vs[:, :, :count],
                                   sink_pos=self.sink_pos[:, :count])


def _log_count(xp: Any, count: Any) -> Any:
    """log n, −inf for empty landmarks (they then get zero weight)."""
    return xp.where(count > 0, xp.log(xp.maximum(count, 1)), -xp.inf)


def _weighted_mean(x: Any, weight: Any, count: Any) -> Any:
    """Σ weight·x / count over axis −2 (x [..., n, w, D], weight [..., n, w], count [..., n]); 0 when empty."""
    total = (weight[..., None, :] @ x)[..., 0, :]
    return total / (count + (count == 0))[..., None]


def _keys(xp: Any, ctype: Any, geo: Geometry, k: Any, v: Any, sinks: Any) -> _Keys:
    """Pad k, v ([B, n, Sk, D] of the selected heads) onto the grid and pool their landmarks; `sinks`: [n, ns]
    int64 key indices on the device, −1 for none (from `sink_table`, or the rank policy's device-side table), so
    that no host value is needed: every sink entry is handled by comparisons and gathers on the device."""
    B, n, Sk, D = k.shape
    Lp, w, nb, nc, t = geo.padded, geo.block, geo.blocks, geo.segments, geo.fine
    ns = sinks.shape[1]
    padded = geo.pads_keys
    if padded:
        kp = xp.zeros((B, n, Lp, D), dtype=ctype)
        vp = xp.zeros((B, n, Lp, D), dtype=ctype)
        kp[:, :, geo.k_offset: geo.k_offset + Sk] = k
        vp[:, :, geo.k_offset: geo.k_offset + Sk] = v
    else:  # one conversion pass each, no zero fill
        kp, vp = (xp.ascontiguousarray(x, dtype=ctype) for x in (k, v))
    sink_pos = geo.sink_positions(xp, sinks)
    positions = xp.arange(Lp)
    real = (positions >= geo.k_offset) & (positions < geo.k_offset + Sk) if padded else xp.ones(Lp, dtype=bool)
    if ns:  # a sink is attended exactly: out of its block's landmark and of the near field
        real = real & (positions[:, None] != sink_pos[:, None, :]).all(axis=-1)  # [n, Lp]
    weight = xp.ascontiguousarray(xp.broadcast_to(real, (n, Lp)), dtype=ctype)
    count_f = weight.reshape(n, nb, w).sum(axis=-1)
    kf = _weighted_mean(kp.reshape(B, n, nb, w, D), weight.reshape(n, nb, w), count_f)
    vf = _weighted_mean(vp.reshape(B, n, nb, w, D), weight.reshape(n, nb, w), count_f)
    count_c = count_f.reshape(n, nc, t).sum(axis=-1)
    kc = _weighted_mean(kf.reshape(B, n, nc, t, D), count_f.reshape(n, nc, t), count_c)
    vc = _weighted_mean(vf.reshape(B, n, nc, t, D), count_f.reshape(n, nc, t), count_c)
    head_of = on_device(xp, np.arange(n)[:, None].repeat(ns, axis=1))
    key_of = xp.maximum(sinks, 0)
    ks, vs = (x[:, head_of, key_of].astype(ctype) for x in (k, v))  # [B, n, ns, D]
    key_bias = xp.where(weight > 0, ctype.type(0), ctype.type(-np.inf))
    return _Keys(kp, vp, key_bias, kf, vf, _log_count(xp, count_f).astype(ctype, copy=False), kc, vc,
                 _log_count(xp, count_c).astype(ctype, copy=False), ks, vs, sink_pos)


def _allowed(xp: Any, causal: bool, query_unit: Any, key_unit: Any) -> Any:
    """Bias 0 / −inf for a landmark of unit `key_unit` seen from a query in unit `query_unit` (broadcast):
    every other unit without causal, strictly earlier units with causal."""
    ok = key_unit < query_unit if causal else key_unit != query_unit
    return xp.where(ok, 0.0, -xp.inf)


@lru_cache(maxsize=64)
def _grid_biases(geo: Geometry, causal: bool, ctype: np.dtype) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The forward's position masks of a grid, host arrays built once per (grid, causal, dtype) and handed to
    `on_device` (cached there: no launch per call): (near [w, w]: key j <= query i within a block,
    fine [g, t]: `_allowed` of a query's block within its segment against each block, coarse [nc, 1, nc]:
    `_allowed` of segment against segment)."""
    w, t, nc = geo.block, geo.fine, geo.segments
    near = np.where(np.arange(w)[None, :] <= np.arange(w)[:, None], 0.0, -np.inf).astype(ctype)
    fine = _allowed(np, causal, (np.arange(geo.segment) // w)[:, None], np.arange(t)[None, :]).astype(ctype)
    coarse = _allowed(np, causal, np.arange(nc)[:, None, None], np.arange(nc)[None, None, :]).astype(ctype)
    for bias in (near, fine, coarse):  # shared by every call (NumPy: `on_device` returns them as they are)
        bias.flags.writeable = False
    return near, fine, coarse


def _merge(xp: Any, parts: list[tuple[Any, Callable[[Any], Any]]]) -> tuple[Any, Any]:
    """(out, lse) of a softmax split into parts: each (scores [..., R, K_i], P_i ↦ P_i V_i as [..., R, D]).

    Shift by the row max M over all parts; rows with no finite score give out = 0, lse = −inf. The scores
    must be temporaries: they are overwritten in place by exp(S − M) (no extra buffer per part), and the
    output accumulates in place.
    """
    parts = [(scores, apply) for scores, apply in parts if scores.shape[-1]]
    row_max = parts[0][0].max(axis=-1)
    for scores, _ in parts[1:]:
        row_max = xp.maximum(row_max, scores.max(axis=-1))
    shift = xp.where(xp.isneginf(row_max), 0, row_max)
    total = None
    out = None
    for scores, apply in parts:
        scores -= shift[..., None]
        probs = xp.exp(scores, out=scores)
        total = probs.sum(axis=-1) if total is None else total + probs.sum(axis=-1)
        if out is None:
            out = apply(probs)
        else:
            out += apply(probs)
    seen = total > 0
    safe = xp.where(seen, total, 1)
    out /= safe[..., None]
    return out, xp.where(seen, shift + xp.log(safe), -xp.inf)


# --------------------------------------------------------------------------------------------------------------
# All rows (the forward) and selected rows (the guard)


def _all_rows(xp: Any, ctype: Any, geo: Geometry, causal: bool, q: Any, keys: _Keys) -> tuple[Any, Any]:
    """(out [B, n, Sq, D], lse [B, n, Sq]) for every query row; q [B, n, Sq, D] already scaled.

    Two parts, two batched matmuls each (scores, then P·V): the near field per block of w queries against its
    w keys, [B, n, nb, w, w]; the far field per segment of g queries against K' = t + nc + ns keys — the
    segment's fine landmarks, every coarse landmark, the sinks — stacked per segment, [B, n, nc, g, K'].
    Masks and log-counts are added in place to the score buffers (no extra full-size buffer).
    """
    B, n, Sq, D = q.shape
    Lp, w, nb, nc, t, g = geo.padded, geo.block, geo.blocks, geo.segments, geo.fine, geo.segment
    ns = keys.ks.shape[2]
    if Lp == Sq:
        qp = xp.ascontiguousarray(q)
    else:
        qp = xp.zeros((B, n, Lp, D), dtype=ctype)
        qp[:, :, geo.q_offset: geo.q_offset + Sq] = q
    near_bias, fine_bias, coarse_bias = (on_device(xp, x) for x in _grid_biases(geo, causal, ctype))

    near = qp.reshape(B, n, nb, w, D) @ keys.kp.reshape(B, n, nb, w, D).swapaxes(-1, -2)
    if geo.pads_keys or keys.ks.shape[2]:  # else key_bias is all 0
        near += keys.key_bias.reshape(n, nb, 1, w)
    if causal:
        near += near_bias

    def stacked(fine: Any, coarse: Any, sink: Any) -> Any:
        """[B, n, nc, K', D]: per segment its t fine landmarks, the nc coarse ones, the ns sinks."""
        pieces = [fine.reshape(B, n, nc, t, D), xp.broadcast_to(coarse[:, :, None], (B, n, nc, nc, D))]
        if ns:
            pieces.append(xp.broadcast_to(sink[:, :, None], (B, n, nc, ns, D)))
        return xp.concatenate(pieces, axis=3)

    far = qp.reshape(B, n, nc, g, D) @ stacked(keys.kf, keys.kc, keys.ks).swapaxes(-1, -2)  # [B, n, nc, g, K']
    far[..., :t] += keys.log_nf.reshape(n, nc, 1, t) + fine_bias
    far[..., t: t + nc] += keys.log_nc.reshape(n, 1, 1, nc) + coarse_bias
    if ns:
        sink_ok = keys.sink_pos[:, None, :] >= 0
        if causal:
            sink_ok = sink_ok & (keys.sink_pos[:, None, :] <= xp.arange(Lp)[None, :, None])
        sink_bias = xp.where(sink_ok, 0.0, -xp.inf).astype(ctype)  # [n, Lp or 1, ns]
        far[..., t + nc:] += sink_bias.reshape((n, nc, g, ns) if causal else (n, 1, 1, ns))

    vp_blocks = keys.vp.reshape(B, n, nb, w, D)
    v_far = stacked(keys.vf, keys.vc, keys.vs)
    out, lse = _merge(xp, [
        (near.reshape(B, n, Lp, w), lambda p: (p.reshape(B, n, nb, w, w) @ vp_blocks).reshape(B, n, Lp, D)),
        (far.reshape(B, n, Lp, t + nc + ns), lambda p: (p.reshape(B, n, nc, g, -1) @ v_far).reshape(B, n, Lp, D)),
    ])
    rows = slice(geo.q_offset, geo.q_offset + Sq)
    return out[:, :, rows], lse[:, :, rows]


def _some_rows(xp: Any, ctype: Any, geo: Geometry, causal: bool, q_rows: Any, rows: np.ndarray,
               keys: _Keys) -> tuple[Any, Any]:
    """(out [B, n, m, D], lse [B, n, m]) of query `rows` only, by gathering each row's keys and landmarks;
    q_rows [B, n, m, D] already scaled. Same scores as `_all_rows`, O(m·(w + t + nc)·D) per head."""
    B, n, m, D = q_rows.shape
    w, nb, nc, t, g = geo.block, geo.blocks, geo.segments, geo.fine, geo.segment
    pos = rows + geo.q_offset
    block, segment, pos_dev = (on_device(xp, x) for x in (pos // w, pos // g, pos))
    q_col = q_rows[..., None, :]  # [B, n, m, 1, D]

    near_keys = keys.kp.reshape(B, n, nb, w, D)[:, :, block]  # [B, n, m, w, D]
    near = (q_col @ near_keys.swapaxes(-1, -2))[..., 0, :] + keys.key_bias.reshape(n, nb, w)[:, block]
    if causal:
        key_pos = block[:, None] * w + xp.arange(w)[None, :]
        near = near + xp.where(key_pos <= pos_dev[:, None], 0.0, -xp.inf).astype(ctype)

    fine_keys = keys.kf.reshape(B, n, nc, t, D)[:, :, segment]  # [B, n, m, t, D]
    fine = (q_col @ fine_keys.swapaxes(-1, -2))[..., 0, :] + keys.log_nf.reshape(n, nc, t)[:, segment]
    fine = fine + _allowed(xp, causal, ((pos_dev % g) // w)[:, None], xp.arange(t)[None, :]).astype(ctype)

    coarse = q_rows @ keys.kc.swapaxes(-1, -2) + keys.log_nc[:, None, :]
    coarse = coarse + _allowed(xp, causal, segment[:, None], xp.arange(nc)[None, :]).astype(ctype)

    sink_ok = keys.sink_pos[:, None, :] >= 0
    if causal:
        sink_ok = sink_ok & (keys.sink_pos[:, None, :] <= pos_dev[None, :, None])
    sink = q_rows @ keys.ks.swapaxes(-1, -2) + xp.where(sink_ok, 0.0, -xp.inf).astype(ctype)

    return _merge(xp, [
        (near, lambda p: (p[..., None, :] @ keys.vp.reshape(B, n, nb, w, D)[:, :, block])[..., 0, :]),
        (fine, lambda p: (p[..., None, :] @ keys.vf.reshape(B, n, nc, t, D)[:, :, segment])[..., 0, :]),
        (coarse, lambda p: p @ keys.vc),
        (sink, lambda p: p @ keys.vs),
    ])


def _scaled(xp: Any, ctype: Any, problem: AttentionProblem, q: Any) -> Any:
    """scale · q as a new ctype array: one pass (the inputs converted to ctype, then multiplied in ctype)."""
    return xp.multiply(q, ctype.type(problem.scale), dtype=ctype)


def _select(problem: AttentionProblem, x: Any, heads: Sequence[int], kv: bool) -> Any:
    """[B, n, S, D] of the selected query heads (k/v: their key/value heads h // G): one gather, or `x` itself
    (a view, no copy) when that selects every head in order."""
    xp = namespace(problem.library)
    index = [h // problem.group_size for h in heads] if kv else list(heads)
    if index == list(range(x.shape[1])):
        return x
    return x[:, on_device(xp, index, np.int64)]


@dataclass
class Prepared:
    """Keys, values and landmarks of query `heads` at one `rank`: what `guard_rows` (the policy's guard) and
    `forward` share, so that a plan can hand them on (``artifacts["prepared"]``) instead of recomputing.

    `output`: (out [B, Hq, Sq, D] input dtype, lse [B, Hq, Sq] float32), the fused forward of these heads at
    this rank when `guard_rows` ran it (other heads' entries undefined), else None: `forward` then copies
    these heads' rows instead of recomputing them.
    """

    heads: tuple[int, ...]
    rank: int
    geometry: Geometry
    keys: _Keys
    output: tuple[Any, Any] | None = None

    @property
    def sink_columns(self) -> int:
        """Sink columns of the keys (the widest head's sinks; −1 pads the others)."""
        return int(self.keys.ks.shape[2])

    def subset(self, xp: Any, heads: Sequence[int], sink_columns: int | None = None) -> Prepared | None:
        """The prepared keys of `heads` at the same rank (a gather on the head axis; self when equal and no column
        is dropped), with only their first `sink_columns` sink columns (default all; the dropped ones must be −1
        for these heads), or None when some head is not prepared here."""
        columns = self.sink_columns if sink_columns is None else sink_columns
        if tuple(heads) == self.heads and columns == self.sink_columns:
            return self
        position = {h: i for i, h in enumerate(self.heads)}
        if any(h not in position for h in heads):
            return None
        keys = self.keys if tuple(heads) == self.heads else self.keys.take(xp, [position[h] for h in heads])
        if columns < self.sink_columns:
            keys = keys.first_sinks(columns)
        # The output is indexed by query head: it stays valid for any subset (dropped sink columns were −1).
        return Prepared(tuple(int(h) for h in heads), self.rank, self.geometry, keys, self.output)


def prepare(problem: AttentionProblem, k: Any, v: Any, heads: Sequence[int], rank: int,
            sinks: dict[int, Sequence[int]] | Any | None = None) -> Prepared:
    """Pad the keys/values of query `heads` (their key/value heads) onto the grid of `rank` and pool their
    landmarks. `sinks`, the key indices attended exactly: {query head: indices}, or already a table of the
    inputs' array library, [len(heads), ns] int64 with −1 for none (the rank policy's, built on the device:
    no host value needed). Cost O(Sk·D) per head: where the fused kernel takes the problem (`fused_kernel`), two
    launches of cuda_src/lowrank_landmarks.cu (`cuda_lowrank.keys`), else `_keys`' array operations."""
    xp = namespace(problem.library)
    geo = geometry(problem.seqlen_q, problem.seqlen_k, rank)
    table = on_device(xp, sink_table(heads, sinks)) if sinks is None or isinstance(sinks, dict) else sinks
    fused = fused_kernel(problem) if problem.seqlen_k else None
    fields = fused.keys(problem, k, v, heads, geo, table) if fused is not None else None
    if fields is not None:
        keys = _Keys(**fields)
    else:
        keys = _keys(xp, compute_dtype(problem.dtype), geo, _select(problem, k, heads, True),
                     _select(problem, v, heads, True), table)
    return Prepared(tuple(int(h) for h in heads), rank, geo, keys)


#: $ADAATTN_LOWRANK_KERNEL: "auto" (default) runs the low-rank forward of CuPy bf16/fp16 inputs with D in
#: launch_config.LOWRANK_HEAD_DIMS through the fused kernel (cuda_lowrank), "reference" through `_all_rows`
#: (float32 batched matmuls) everywhere: for tests and comparisons.
LOWRANK_KERNEL_CHOICES = ("auto", "reference")


def fused_kernel(problem: AttentionProblem) -> Any:
    """The `cuda_lowrank` module when it takes `problem` under $ADAATTN_LOWRANK_KERNEL, else None. Raises
    ValueError naming the variable for a value not in LOWRANK_KERNEL_CHOICES."""
    choice = os.environ.get("ADAATTN_LOWRANK_KERNEL", "auto")
    if choice not in LOWRANK_KERNEL_CHOICES:
        raise ValueError(f"ADAATTN_LOWRANK_KERNEL must be one of {LOWRANK_KERNEL_CHOICES}, got {choice!r}")
    if choice == "reference" or problem.library != "cupy":
        return None
    from . import cuda_lowrank

    return cuda_lowrank if cuda_lowrank.unsupported_reason(problem) is None else None


def forward(
    problem: AttentionProblem, q: Any, k: Any, v: Any, out: Any, lse: Any,
    heads: Sequence[int], ranks: Sequence[int], artifacts: dict[str, Any],
) -> None:
    """Write the low-rank approximation of query `heads` into `out` and `lse` (other heads untouched).

    Args:
        problem: the validated call. q [B, Hq, Sq, D], k, v [B, Hkv, Sk, D]: views, any strides, NumPy or CuPy.
        out: [B, Hq, Sq, D] view in the input dtype; lse: [B, Hq, Sq] (float32; float64 for float64 inputs),
            the log-normaliser of the approximation.
        heads: query-head indices; ranks: the matching ranks (coarse segments, >= 1).
        artifacts: the plan's artifacts. Optional ``"sinks"``: {query head: key indices attended exactly};
            optional ``"prepared"``: a sequence of `Prepared` (the guard's, one per rank); a chunk whose heads
            one of them holds at its rank takes its keys (`Prepared.subset`) instead of calling `prepare`, and
            its rows when the guard already ran the fused forward (`Prepared.output`).

    Heads sharing a rank are computed together, in chunks of at most CHUNK_ELEMENTS scores, by the fused kernel
    (`fused_kernel`) where it takes the problem, else by `_all_rows`' float32 batched matmuls.
    Raises ValueError when heads and ranks differ in length or a rank is < 1.
    """
    if len(heads) != len(ranks):
        raise ValueError(f"heads and ranks must have the same length, got {len(heads)} and {len(ranks)}")
    xp = namespace(problem.library)
    ctype = compute_dtype(problem.dtype)
    fused = fused_kernel(problem)
    reuse = {p.rank: p for p in artifacts.get("prepared", ())}
    by_rank: dict[int, list[int]] = {}
    for head, rank in zip(heads, ranks):
        by_rank.setdefault(int(rank), []).append(int(head))
    for rank, group in by_rank.items():
        geo = geometry(problem.seqlen_q, problem.seqlen_k, rank)
        per_head = problem.batch * geo.padded * geo.keys_per_query(sink_table(group, artifacts.get("sinks")).shape[1])
        step = max(1, CHUNK_ELEMENTS // max(1, per_head))
        for start in range(0, len(group), step):
            chunk = group[start: start + step]
            prepared = reuse[rank].subset(xp, chunk) if rank in reuse else None
            if prepared is not None and prepared.output is not None:
                _write_heads(xp, out, lse, chunk, problem.heads_q,
                             *(_select(problem, x, chunk, False) for x in prepared.output))
                continue
            if prepared is None:
                prepared = prepare(problem, k, v, chunk, rank, artifacts.get("sinks"))
            if fused is not None:
                fused.forward(problem, q, out, lse, chunk, prepared)
                continue
            q_sel = _scaled(xp, ctype, problem, _select(problem, q, chunk, False))
            _write_heads(xp, out, lse, chunk, problem.heads_q,
                         *_all_rows(xp, ctype, geo, problem.causal, q_sel, prepared.keys))


def _write_heads(xp: Any, out: Any, lse: Any, heads: list[int], num_heads: int, head_out: Any, head_lse: Any
                 ) -> None:
    """out[:, heads], lse[:, heads] = head_out, head_lse ([B, len(heads), ...], cast on the way): plain copies
    when `heads` is every head in order, else a scatter."""
    if heads == list(range(num_heads)):
        out[...] = head_out
        lse[...] = head_lse
    else:
        index = on_device(xp, heads, np.int64)
        out[:, index] = head_out.astype(out.dtype, copy=False)
        lse[:, index] = head_lse.astype(lse.dtype, copy=False)


def guard_rows(problem: AttentionProblem, q: Any, rows: np.ndarray, prepared: Prepared) -> Any:
    """The approximation's output at query `rows` of the prepared heads as `forward` delivers it, [B, n, m, D]
    in float32 (float64 for float64 inputs): what the rank policy's guard compares with the probe's exact rows.

    Where the fused kernel takes the problem (`fused_kernel`), it runs the whole low-rank forward of these heads
    once into buffers kept on ``prepared.output`` (an output-sized array and an lse array, held until the plan is
    dropped) and gathers the rows: one launch instead of `approximate_rows`' ~30 array operations, and `forward`
    copies those heads' rows instead of recomputing them; the rows then carry the kernel's 16-bit rounding, as
    the delivered output does. Elsewhere the rows come from `approximate_rows`.
    """
    fused = fused_kernel(problem)
    if fused is None:
        return approximate_rows(problem, q, rows, prepared)[0]
    import cupy

    out = cupy.empty(q.shape, dtype=q.dtype)
    lse = cupy.empty(q.shape[:3], dtype=cupy.float32)
    fused.forward(problem, q, out, lse, prepared.heads, prepared)
    prepared.output = (out, lse)
    return _select(problem, out, prepared.heads, False)[:, :, on_device(cupy, rows)].astype(
        compute_dtype(problem.dtype))


def approximate_rows(problem: AttentionProblem, q: Any, rows: np.ndarray, prepared: Prepared) -> tuple[Any, Any]:
    """The approximation `forward` computes, for query `rows` of the prepared heads only: (out [B, n, m, D],
    lse [B, n, m]) in float32 (float64 for float64 inputs), O(m·(w + t + nc)·D) per head beyond `prepare`.
    Used by the rank policy to compare with the probe's exact rows."""
    xp = namespace(problem.library)
    ctype = compute_dtype(problem.dtype)
    q_rows = _scaled(xp, ctype, problem, _select(problem, q, prepared.heads, False)[:, :, on_device(xp, rows)])
    return _some_rows(xp, ctype, prepared.geometry, problem.causal, q_rows, rows, prepared.keys)
