"""Launchers of the low-rank path's CUDA kernels for CuPy arrays.

`forward` (cuda_src/lowrank_fwd.cu) computes what `lowrank._all_rows` computes — each query against its near
block, its segment's fine landmarks, the coarse landmarks and the sinks, merged in one softmax — from the same
prepared keys (`lowrank.prepare`), in one launch per rank group and chunk of heads (`lowrank.CHUNK_ELEMENTS`):
16-bit operands (the fp32 landmark means rounded to the input dtype) on mma.sync tensor cores with fp32
accumulation, instead of float32 batched matmuls over per-part score buffers. `keys`
(cuda_src/lowrank_landmarks.cu) builds those prepared keys, what `lowrank._keys` builds with ~40 array operations,
in two launches.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from ._arrays import on_device
from .cuda_common import common_unsupported_reason, readable, shared_memory_optin, shared_memory_reason, writable
from .launch_config import (
    LOWRANK_HEAD_DIMS,
    MAX_GRID_YZ,
    check_grid,
    landmark_launches,
    lowrank_launch,
)
from .loader import kernel_for
from .problem import LOG2E, AttentionProblem


def unsupported_reason(problem: AttentionProblem) -> str | None:
    """Why the fused low-rank kernel cannot take `problem` (None when it can): device, dtype, head dim, shared
    memory. (Any scale: the kernel folds it into each score before the row max.)"""
    reason = common_unsupported_reason(problem)
    if reason is not None:
        return reason
    if problem.head_dim not in LOWRANK_HEAD_DIMS:
        return f"head dim {problem.head_dim} (the fused low-rank kernel takes {list(LOWRANK_HEAD_DIMS)})"
    import cupy

    launch = lowrank_launch(problem.dtype, problem.head_dim, problem.causal)
    return shared_memory_reason(f"low-rank head dim {problem.head_dim}", launch.smem_bytes,
                                shared_memory_optin(cupy.cuda.runtime.getDevice()))


def forward(problem: AttentionProblem, q: Any, out: Any, lse: Any, heads: Sequence[int], prepared: Any) -> None:
    """The low-rank approximation of query `heads` into `out` ([B, Hq, Sq, D] view, input dtype) and `lse`
    ([B, Hq, Sq] float32, contiguous); other heads untouched.

    `prepared`: `lowrank.Prepared` of exactly these heads (its keys: float32 CuPy arrays on the grid of
    `lowrank.geometry`, whose block is the kernel's LOWRANK_BLOCK). q: the unscaled [B, Hq, Sq, D] input (any
    strides; copied once if the kernel cannot read them). Raises ValueError when `prepared` holds other heads, or
    `lse` is not contiguous float32.
    """
    import cupy

    geo, keys = prepared.geometry, prepared.keys
    if tuple(heads) != tuple(prepared.heads):
        raise ValueError(f"prepared keys hold heads {list(prepared.heads)}, expected {list(heads)}")
    if lse.dtype != cupy.float32 or not lse.flags.c_contiguous:
        raise ValueError(f"lse must be a contiguous float32 array, got {lse.dtype} with strides {lse.strides}")
    if not heads or problem.is_empty:
        return
    launch = lowrank_launch(problem.dtype, problem.head_dim, problem.causal)
    kernel = kernel_for(launch)
    q_in, q_strides = readable(q)
    target, o_strides = writable(out)
    fp32 = [cupy.ascontiguousarray(x, dtype=cupy.float32) for x in
            (keys.kp, keys.vp, keys.key_bias, keys.kf, keys.vf, keys.log_nf, keys.kc, keys.vc, keys.log_nc,
             keys.ks, keys.vs)]
    sink_pos = cupy.ascontiguousarray(keys.sink_pos, dtype=cupy.int64)
    n, sinks = len(heads), int(keys.ks.shape[2])
    grid = check_grid(geo.blocks * n * problem.batch)
    i32, i64 = np.int32, np.int64
    kernel(
        (grid,), (launch.threads,),
        (q_in, *map(i64, q_strides[:3]), *fp32, sink_pos, on_device(cupy, heads, np.int32),
         target, *map(i64, o_strides[:3]), lse, i32(n), i32(problem.heads_q), i32(problem.seqlen_q),
         i32(geo.padded), i32(geo.fine), i32(geo.segments), i32(sinks), i32(geo.q_offset),
         np.float32(problem.scale * LOG2E)),
        shared_mem=launch.smem_bytes,
    )
    if target is not out:
        index = list(heads)
        out[:, index] = target[:, index]


def keys(problem: AttentionProblem, k: Any, v: Any, heads: Sequence[int], geo: Any, sinks: Any
         ) -> dict[str, Any] | None:
    """`lowrank._Keys`' fields (float32 CuPy arrays; sink_pos int64) for query `heads` on the grid `geo`
    (`lowrank.Geometry`), or None when there is nothing to launch (no head or batch entry) or the grid does not fit
    one launch (more than MAX_GRID_YZ heads or batch entries: the kernels' grid.y and grid.z): the same values as
    `lowrank._keys` up to the order of the fp32 sums in the block and segment means.

    k, v: the [B, Hkv, Sk, D] inputs (any strides: read through each head's key/value head, no gather); `sinks`:
    [len(heads), ns] int64 key indices on the device, −1 for none. Requires Sk >= 1.
    """
    import cupy

    n, batch, dim = len(heads), problem.batch, problem.head_dim
    if not 0 < n <= MAX_GRID_YZ or not 0 < batch <= MAX_GRID_YZ:
        return None
    padded, blocks, segments = geo.padded, geo.blocks, geo.segments
    sinks = cupy.ascontiguousarray(sinks, dtype=cupy.int64)
    ns = int(sinks.shape[1])
    sink_pos = geo.sink_positions(cupy, sinks)
    k_in, k_strides = readable(k)
    v_in, v_strides = readable(v)
    kv_heads = on_device(cupy, [h // problem.group_size for h in heads], np.int32)
    f32 = cupy.float32
    out = {name: cupy.empty((batch, n, rows, dim), dtype=f32) for name, rows in
           (("kp", padded), ("vp", padded), ("kf", blocks), ("vf", blocks), ("kc", segments), ("vc", segments),
            ("ks", ns), ("vs", ns))}
    out.update(key_bias=cupy.empty((n, padded), dtype=f32), log_nf=cupy.empty((n, blocks), dtype=f32),
               log_nc=cupy.empty((n, segments), dtype=f32), sink_pos=sink_pos)
    count_f = cupy.empty((n, blocks), dtype=f32)
    block_launch, segment_launch = landmark_launches(problem.dtype)
    i32, i64 = np.int32, np.int64
    inputs = (k_in, *map(i64, k_strides[:3]), v_in, *map(i64, v_strides[:3]), kv_heads)
    kernel_for(block_launch)(
        (blocks, n, batch), (block_launch.threads,),
        (*inputs, sink_pos, i32(ns), i32(problem.seqlen_k), i32(geo.k_offset), i32(padded),
         i32(dim), out["kp"], out["vp"], out["key_bias"], out["kf"], out["vf"], count_f, out["log_nf"]))
    kernel_for(segment_launch)(
        (segments, n, batch), (segment_launch.threads,),
        (*inputs, sinks, i32(ns), i32(geo.fine), i32(dim), out["kf"], out["vf"], count_f, out["kc"], out["vc"],
         out["log_nc"], out["ks"], out["vs"]))
    return out
