"""Blocked flash-style attention on any array module (NumPy on the CPU; also CuPy for float32/float64).

Forward: for each block of query rows, stream over blocks of keys with an online softmax (running max m,
running sum l, rescaled accumulator), one BLAS matmul for QKᵀ and one for PV per block pair. Memory is
O(B·H·block_q·block_k) for the scores plus O(B·H·S·D) for the accumulators: never an S×S matrix.

Backward: recomputes P = exp(S·scale − lse) block by block (FlashAttention-2's algorithm):
    δ = rowsum(dO ∘ O),  dV = Pᵀ dO,  dP = dO Vᵀ,  dS = P ∘ (dP − δ),  dQ = scale·dS K,  dK = scale·dSᵀ Q
with dK, dV summed over the query heads of each GQA group.

float16/bfloat16 are computed in float32 and float32 in float32; float64 in float64. Inputs arrive as
[B, H, S, D] views (any strides); query heads are viewed as [B, Hkv, G, S, D] so each key/value block is
used by its whole group without being copied per head.
"""

from __future__ import annotations

from typing import Any

from ._arrays import compute_dtype, namespace
from .problem import AttentionProblem

#: Score-block elements (B·H·block_q·block_k) per step: bounds the working set to ~16 MiB in float32.
SCORE_BLOCK_ELEMENTS = 1 << 22
BLOCK_K = 256


def _block_q(problem: AttentionProblem) -> int:
    rows = SCORE_BLOCK_ELEMENTS // max(1, problem.batch * problem.heads_q * BLOCK_K)
    return max(16, min(problem.seqlen_q, rows))


def _grouped(x: Any, problem: AttentionProblem) -> Any:
    """[B, Hq, S, ...] → [B, Hkv, G, S, ...] (a view: splitting one axis never copies)."""
    return x.reshape(problem.batch, problem.heads_kv, problem.group_size, *x.shape[2:])


def _key_limit(problem: AttentionProblem, q_end: int) -> int:
    """Number of leading keys any row before `q_end` can see."""
    if not problem.causal:
        return problem.seqlen_k
    return max(0, min(problem.seqlen_k, q_end + problem.causal_offset))


def _causal_mask(xp: Any, problem: AttentionProblem, q0: int, q1: int, k0: int, k1: int) -> Any | None:
    """Boolean [q1-q0, k1-k0] mask of disallowed pairs, or None when the block is fully visible."""
    if not problem.causal or k1 - 1 <= q0 + problem.causal_offset:
        return None
    rows = xp.arange(q0, q1)[:, None] + problem.causal_offset
    cols = xp.arange(k0, k1)[None, :]
    return cols > rows


def forward(problem: AttentionProblem, q: Any, k: Any, v: Any, out: Any, lse: Any) -> None:
    """Write softmax(scale·QKᵀ)V into `out` ([B,Hq,Sq,D] view) and its log-sum-exp into `lse` ([B,Hq,Sq])."""
    xp = namespace(problem.library)
    ctype = compute_dtype(problem.dtype)
    B, Hq, Sq, D = problem.batch, problem.heads_q, problem.seqlen_q, problem.head_dim
    qg = _grouped(q, problem)
    kg = k[:, :, None]
    vg = v[:, :, None]
    block_q = _block_q(problem)

    for q0 in range(0, Sq, block_q):
        q1 = min(q0 + block_q, Sq)
        q_blk = qg[..., q0:q1, :].astype(ctype)
        row_max = xp.full(q_blk.shape[:-1], -xp.inf, dtype=ctype)
        row_sum = xp.zeros(q_blk.shape[:-1], dtype=ctype)
        acc = xp.zeros(q_blk.shape, dtype=ctype)
        for k0 in range(0, _key_limit(problem, q1), BLOCK_K):
            k1 = min(k0 + BLOCK_K, _key_limit(problem, q1))
            scores = (q_blk @ kg[..., k0:k1, :].astype(ctype).swapaxes(-1, -2)) * ctype.type(problem.scale)
            mask = _causal_mask(xp, problem, q0, q1, k0, k1)
            if mask is not None:
                scores = xp.where(mask, -xp.inf, scores)
            new_max = xp.maximum(row_max, scores.max(axis=-1))
            # Rows with every key masked so far keep max = -inf; shift them by 0 so exp gives 0, not NaN.
            shift = xp.where(xp.isneginf(new_max), 0, new_max)
            probs = xp.exp(scores - shift[..., None])
            correction = xp.exp(row_max - shift)
            row_sum = row_sum * correction + probs.sum(axis=-1)
            acc = acc * correction[..., None] + probs @ vg[..., k0:k1, :].astype(ctype)
            row_max = new_max

        seen = row_sum > 0
        safe_sum = xp.where(seen, row_sum, 1)
        out[:, :, q0:q1, :] = (acc / safe_sum[..., None]).reshape(B, Hq, q1 - q0, D).astype(out.dtype)
        block_lse = xp.where(seen, row_max + xp.log(safe_sum), -xp.inf)
        lse[:, :, q0:q1] = block_lse.reshape(B, Hq, q1 - q0).astype(lse.dtype)


def backward(
    problem: AttentionProblem,
    dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any,
    dq: Any, dk: Any, dv: Any,
) -> None:
    """Write the gradients of `forward` into `dq` ([B,Hq,Sq,D]), `dk` and `dv` ([B,Hkv,Sk,D]) views."""
    xp = namespace(problem.library)
    ctype = compute_dtype(problem.dtype)
    B, Hq, Hkv, Sq, Sk, D = (
        problem.batch, problem.heads_q, problem.heads_kv, problem.seqlen_q, problem.seqlen_k, problem.head_dim
    )
    scale = ctype.type(problem.scale)
    qg = _grouped(q, problem)
    dog = _grouped(dout, problem)
    delta = _grouped((dout.astype(ctype) * out.astype(ctype)).sum(axis=-1), problem)
    # Fully masked rows have lse = -inf and P = 0 for every key; shift them by 0 to avoid -inf - -inf.
    lse_g = _grouped(lse, problem).astype(ctype)
    lse_shift = xp.where(xp.isneginf(lse_g), 0, lse_g)
    dq_acc = xp.zeros((B, Hkv, problem.group_size, Sq, D), dtype=ctype)
    block_q = _block_q(problem)

    for k0 in range(0, Sk, BLOCK_K):
        k1 = min(k0 + BLOCK_K, Sk)
        k_blk = k[:, :, None, k0:k1, :].astype(ctype)
        v_blk = v[:, :, None, k0:k1, :].astype(ctype)
        dk_acc = xp.zeros((B, Hkv, k1 - k0, D), dtype=ctype)
        dv_acc = xp.zeros((B, Hkv, k1 - k0, D), dtype=ctype)
        # Under causal masking, rows before k0 - offset see none of these keys.
        first_row = max(0, k0 - problem.causal_offset) if problem.causal else 0
        for q0 in range(first_row - first_row % block_q, Sq, block_q):
            q1 = min(q0 + block_q, Sq)
            q_blk = qg[..., q0:q1, :].astype(ctype)
            do_blk = dog[..., q0:q1, :].astype(ctype)
            scores = (q_blk @ k_blk.swapaxes(-1, -2)) * scale
            mask = _causal_mask(xp, problem, q0, q1, k0, k1)
            if mask is not None:
                scores = xp.where(mask, -xp.inf, scores)
            probs = xp.exp(scores - lse_shift[..., q0:q1, None])
            dv_acc += (probs.swapaxes(-1, -2) @ do_blk).sum(axis=2)
            dprobs = do_blk @ v_blk.swapaxes(-1, -2)
            dscores = probs * (dprobs - delta[..., q0:q1, None]) * scale
            dq_acc[..., q0:q1, :] += dscores @ k_blk
            dk_acc += (dscores.swapaxes(-1, -2) @ q_blk).sum(axis=2)
        dk[:, :, k0:k1, :] = dk_acc.astype(dk.dtype)
        dv[:, :, k0:k1, :] = dv_acc.astype(dv.dtype)
    dq[...] = dq_acc.reshape(B, Hq, Sq, D).astype(dq.dtype)
