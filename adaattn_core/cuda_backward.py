"""Launcher of the fused attention backward (cuda_src/attention_bwd_*.cu) for CuPy arrays.

With P = exp(scale·QKᵀ − lse) recomputed tile by tile from the forward's lse (never stored)::

    δ = rowsum(dO ∘ O),  dV = Pᵀ dO,  dS = P ∘ (dO Vᵀ − δ),  dQ = scale · dS K,  dK = scale · dSᵀ Q

with dK, dV summed over the G = Hq / Hkv query heads of each key/value head (in registers, no per-head
copies). Passes, all on CuPy's current stream without synchronising:

1. ``attention_bwd_preprocess``: δ and lse·log2(e) (+inf for fully masked rows) into the workspace; on
   the default path also zeroes the dQ accumulator.
2. ``attention_bwd_dkdv``: one thread block per (b, kv head, key tile), K/V resident, looping over the
   group's query heads and query tiles: dK, dV. Default (``deterministic=False``): it also adds each
   tile's dS K into the fp32 dQ accumulator with atomics (FlashAttention-2's choice: 5 GEMMs in all); on
   Hopper (sm_90) with D ∈ {64, 128} that kernel is ``attention_bwd_dkdv_sm90`` (wgmma, same arguments
   and workspace; ``$ADAATTN_BACKWARD_KERNEL`` below),
   and 3. ``attention_bwd_dq_convert`` writes dq = scale · accumulator. ``deterministic=True``: 3. is
   ``attention_bwd_dq`` instead, one block per query tile summing dS K over key tiles in a fixed order
   (recomputes QKᵀ and dO Vᵀ: 7 GEMMs, ~1.4× the tensor work, bitwise reproducible; dK/dV are
   reproducible on both paths).

Workspace, allocated per call from CuPy's pool (one allocation): lse·log2(e) and δ, 2 · B·Hq·Sq' float32,
and on the default path the dQ accumulator, B·Hq·Sq'·D float32, where Sq' = Sq rounded up to a multiple
of `BACKWARD_ROW_PAD` (128): O(B·H·S·D), never S×S. Inputs whose strides the kernels cannot take
(innermost stride ≠ 1, other strides not multiples of 8 elements, base not 16-byte aligned) are copied
once; outputs the kernels cannot write are filled through contiguous temporaries.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from .cuda_common import (
    common_unsupported_reason,
    element_strides,
    readable,
    shared_memory_optin,
    shared_memory_reason,
    writable,
)
from .device import compute_capability
from .launch_config import (
    BACKWARD_ELEMENTWISE_THREADS,
    BACKWARD_ROW_PAD,
    BACKWARD_TILES,
    BACKWARD_TILES_SM90,
    backward_launches,
    backward_sm90_launch,
    ceil_div,
    check_grid,
    query_tiles,
)
from .loader import kernel_for
from .problem import LOG2E, AttentionProblem

#: $ADAATTN_BACKWARD_KERNEL, read when a launch plan is first built: "auto" and "sm90" use the wgmma dK/dV
#: kernel on Hopper (sm_90) for the head dims it has tiles for when dq need not be deterministic; "sm80"
#: forces the mma.sync kernel (for tests and comparisons). The deterministic path always uses mma.sync.
KERNEL_CHOICES = ("auto", "sm80", "sm90")


@lru_cache(maxsize=64)
def _max_smem(dtype: str, head_dim: int, causal: bool) -> int:
    """Largest dynamic shared memory any backward kernel of this configuration needs (either dQ path)."""
    return max(launch.smem_bytes for launch in backward_launches(dtype, head_dim, causal).values())


def unsupported_reason(problem: AttentionProblem) -> str | None:
    """Why the fused backward cannot take `problem` (None when it can)."""
    reason = common_unsupported_reason(problem)
    if reason is not None:
        return reason
    if problem.head_dim not in BACKWARD_TILES:
        return f"head dim {problem.head_dim} (fused backward takes {sorted(BACKWARD_TILES)})"
    import cupy

    return shared_memory_reason(f"head dim {problem.head_dim}",
                                _max_smem(problem.dtype, problem.head_dim, problem.causal),
                                shared_memory_optin(cupy.cuda.runtime.getDevice()))


def _preprocess_rows_per_block(head_dim: int) -> int:
    """Rows per block of attention_bwd_preprocess: 256 threads / (power of two >= D/8, at least 4)."""
    threads_per_row = max(4, 1 << (head_dim // 8 - 1).bit_length())
    return BACKWARD_ELEMENTWISE_THREADS // threads_per_row


@dataclass(frozen=True)
class _Plan:
    """Kernels and grids of one problem on one device, for one dQ path."""

    preprocess: tuple[Any, int]
    dkdv: tuple[Any, int, int, int]
    dkdv_name: str  # the dK/dV instantiation, for tests and reports
    dq: tuple[Any, int, int, int]  # attention_bwd_dq (deterministic) or attention_bwd_dq_convert
    stats_stride: int
    workspace_floats: int


def _use_sm90(problem: AttentionProblem, device_id: int, deterministic: bool) -> bool:
    choice = os.environ.get("ADAATTN_BACKWARD_KERNEL", "auto")
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"ADAATTN_BACKWARD_KERNEL must be one of {KERNEL_CHOICES}, got {choice!r}")
    return (choice != "sm80" and not deterministic and problem.head_dim in BACKWARD_TILES_SM90
            and compute_capability(device_id) == (9, 0))


@lru_cache(maxsize=512)
def _plan(problem: AttentionProblem, device_id: int, deterministic: bool) -> _Plan:
    """The launch plan of a problem on a device, built once."""
    launches = backward_launches(problem.dtype, problem.head_dim, problem.causal)
    B, Hq, Hkv, Sq, Sk, D = (problem.batch, problem.heads_q, problem.heads_kv, problem.seqlen_q,
                             problem.seqlen_k, problem.head_dim)
    stats_stride = ceil_div(Sq, BACKWARD_ROW_PAD) * BACKWARD_ROW_PAD
    rows = B * Hq * stats_stride
    if _use_sm90(problem, device_id, deterministic):
        dkdv, block_n = backward_sm90_launch(problem.dtype, D, problem.causal), BACKWARD_TILES_SM90[D].block_n
    else:
        dkdv, block_n = launches["dkdv" if deterministic else "dkdv_atomic"], BACKWARD_TILES[D].block_n
    if deterministic:
        dq = launches["dq"]
        dq_grid = query_tiles(Sq, dq.block_m, Hq * B)
    else:
        dq = launches["dq_convert"]
        dq_grid = ceil_div(B * Hq * Sq * D // 8, BACKWARD_ELEMENTWISE_THREADS)
    preprocess_grid = ceil_div(rows, _preprocess_rows_per_block(D))
    grids = [check_grid(blocks) for blocks in (preprocess_grid, ceil_div(Sk, block_n) * Hkv * B, dq_grid)]
    return _Plan(
        preprocess=(kernel_for(launches["preprocess"]), grids[0]),
        dkdv=(kernel_for(dkdv), grids[1], dkdv.threads, dkdv.smem_bytes),
        dkdv_name=dkdv.name,
        dq=(kernel_for(dq), grids[2], dq.threads, dq.smem_bytes),
        stats_stride=stats_stride,
        workspace_floats=2 * rows + (0 if deterministic else rows * D),
    )


def _strides3(strides: tuple[int, ...]) -> list[np.int64]:
    return [np.int64(s) for s in strides[:3]]


def backward(
    problem: AttentionProblem,
    dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any,
    dq: Any, dk: Any, dv: Any,
    *,
    deterministic: bool,
) -> None:
    """Gradients of attention into `dq` ([B,Hq,Sq,D]), `dk` and `dv` ([B,Hkv,Sk,D]) views, input dtype.

    Args:
        problem: the validated problem (float16/bfloat16, head dim in `BACKWARD_TILES`, Sk ≥ 1; see
            `unsupported_reason`).
        dout, q, k, v, out: [B,H,S,D] CuPy views in the problem's dtype, any strides.
        lse: [B,Hq,Sq] float32 from the forward, any strides; −inf marks rows that see no key (dq = 0).
        dq, dk, dv: output views, any strides; every element is written.
        deterministic: bitwise-reproducible dq (separate dQ pass) instead of the faster atomic dQ.
    """
    import cupy

    plan = _plan(problem, cupy.cuda.runtime.getDevice(), deterministic)
    (dout, do_s), (q, q_s), (k, k_s), (v, v_s), (out, o_s) = (readable(x) for x in (dout, q, k, v, out))
    targets = [writable(x) for x in (dq, dk, dv)]
    (dq_t, dq_s), (dk_t, dk_s), (dv_t, dv_s) = targets

    rows = problem.batch * problem.heads_q
    stride = plan.stats_stride
    workspace = cupy.empty(plan.workspace_floats, dtype=cupy.float32)
    lse_log2, delta = workspace[: rows * stride], workspace[rows * stride : 2 * rows * stride]
    dq_accum = workspace[2 * rows * stride :] if not deterministic else None
    dq_accum_arg = np.uint64(0) if dq_accum is None else dq_accum  # a null pointer on the deterministic path
    common = (np.int32(problem.seqlen_q), np.int32(problem.seqlen_k), np.int32(stride),
              np.float32(problem.scale * LOG2E), np.float32(problem.scale))

    kernel, grid = plan.preprocess
    kernel(
        (grid,), (BACKWARD_ELEMENTWISE_THREADS,),
        (dout, out, lse, lse_log2, delta, dq_accum_arg,
         *_strides3(do_s), *_strides3(o_s), *map(np.int64, element_strides(lse)),
         np.int32(problem.heads_q), np.int32(rows), np.int32(problem.seqlen_q), np.int32(stride)),
    )
    kernel, grid, threads, smem = plan.dkdv
    kernel(
        (grid,), (threads,),
        (q, k, v, dout, lse_log2, delta, dk_t, dv_t, dq_accum_arg,
         *_strides3(q_s), *_strides3(k_s), *_strides3(v_s), *_strides3(do_s), *_strides3(dk_s), *_strides3(dv_s),
         np.int32(problem.heads_kv), np.int32(problem.group_size), *common),
        shared_mem=smem,
    )
    kernel, grid, threads, smem = plan.dq
    if deterministic:
        kernel(
            (grid,), (threads,),
            (q, k, v, dout, lse_log2, delta, dq_t,
             *_strides3(q_s), *_strides3(k_s), *_strides3(v_s), *_strides3(do_s), *_strides3(dq_s),
             np.int32(problem.heads_q), np.int32(problem.group_size), *common),
            shared_mem=smem,
        )
    else:
        kernel(
            (grid,), (threads,),
            (dq_accum, dq_t, *_strides3(dq_s), np.int32(problem.heads_q), np.int32(rows),
             np.int32(problem.seqlen_q), np.int32(stride), np.float32(problem.scale)),
        )
    for view, (target, _) in zip((dq, dk, dv), targets):
        if target is not view:
            view[...] = target
