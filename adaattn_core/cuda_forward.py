"""Launcher of the fused forward kernels for CuPy arrays: cuda_src/attention_fwd.cu (mma.sync,
FlashAttention-2-style, sm_80+) and cuda_src/attention_fwd_sm90_ws.cu (warp-specialised wgmma, Hopper).

Shapes and dtypes were validated once by `problem.describe`; this module only checks what the kernel
itself needs (head dim in the tile table, shared memory, strides and alignment the loads can take: else one
copy, `cuda_common.readable`) and launches on
CuPy's current stream without synchronising.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from functools import lru_cache
from typing import Any

import numpy as np

from ._arrays import on_device
from .cuda_common import (
    common_unsupported_reason,
    readable,
    shared_memory_optin,
    shared_memory_reason,
    sm_count,
    tile_counter,
    tma_maps,
    writable,
)
from .device import compute_capability
from .launch_config import (
    FORWARD_HEAD_DIMS,
    SM90_MIN_SEQLEN_K,
    KernelLaunch,
    causal_section_heads,
    check_grid,
    forward_launch,
    persistent_grid,
    query_tiles,
)
from .loader import kernel_for
from .problem import LOG2E, AttentionProblem

#: $ADAATTN_FORWARD_KERNEL, read when a launch plan is first built: "auto" uses the warp-specialised wgmma
#: kernel (attention_fwd_sm90_ws.cu) on Hopper (sm_90) where it has tiles and Sk >= SM90_MIN_SEQLEN_K, the
#: mma.sync kernel (attention_fwd.cu) elsewhere. For tests and comparisons: "sm80" forces the mma.sync kernel,
#: "sm90" the wgmma kernel wherever it has tiles on Hopper, "sm90_nopp" the same without ping-pong between its
#: consumer warpgroups.
KERNEL_CHOICES = ("auto", "sm80", "sm90", "sm90_nopp")


def unsupported_reason(problem: AttentionProblem) -> str | None:
    """Why the fused forward cannot take `problem` (None when it can)."""
    reason = common_unsupported_reason(problem)
    if reason is not None:
        return reason
    if problem.head_dim not in FORWARD_HEAD_DIMS:
        return f"head dim {problem.head_dim} (fused kernels take {list(FORWARD_HEAD_DIMS)})"
    if problem.scale <= 0:
        # The kernel takes row maxima of raw scores and folds the scale in afterwards: needs scale > 0.
        return f"scale {problem.scale} (fused kernels need scale > 0)"
    import cupy

    return _shared_memory_reason(problem, cupy.cuda.runtime.getDevice(), kernel_choice())


@lru_cache(maxsize=512)
def _shared_memory_reason(problem: AttentionProblem, device_id: int, choice: str) -> str | None:
    """Whether the kernel chosen for `problem` (under $ADAATTN_FORWARD_KERNEL = `choice`) fits the device's shared
    memory (e.g. the mma.sync tile of D = 256 needs 192 KB, more than an A100's 163 KB): once per problem."""
    launch = _select(problem, device_id)
    return shared_memory_reason(f"head dim {problem.head_dim} ({launch.source})", launch.smem_bytes,
                                shared_memory_optin(device_id))


def kernel_choice() -> str:
    """$ADAATTN_FORWARD_KERNEL (default "auto"); ValueError naming it and KERNEL_CHOICES for another value."""
    choice = os.environ.get("ADAATTN_FORWARD_KERNEL", "auto")
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"ADAATTN_FORWARD_KERNEL must be one of {KERNEL_CHOICES}, got {choice!r}")
    return choice


def _use_sm90(problem: AttentionProblem, device_id: int) -> bool:
    choice = kernel_choice()
    if choice == "sm80" or compute_capability(device_id) != (9, 0):
        return False
    return choice != "auto" or problem.seqlen_k >= SM90_MIN_SEQLEN_K


def _select(problem: AttentionProblem, device_id: int) -> KernelLaunch:
    """The forward kernel for a problem under $ADAATTN_FORWARD_KERNEL."""
    return forward_launch(problem.dtype, problem.head_dim, problem.causal, _use_sm90(problem, device_id),
                          pingpong=kernel_choice() != "sm90_nopp", seqlen_q=problem.seqlen_q)


@lru_cache(maxsize=512)
def _launch(problem: AttentionProblem, device_id: int,
            num_heads: int) -> tuple[Any, int, KernelLaunch, tuple[Any, ...]]:
    """(kernel, grid, launch shape, the persistent kernel's scheduling arguments) for `num_heads` query heads of a
    problem, built once."""
    launch = _select(problem, device_id)
    kernel = kernel_for(launch)
    pairs = num_heads * problem.batch
    tiles = query_tiles(problem.seqlen_q, launch.block_m, pairs)
    if not launch.persistent:
        return kernel, check_grid(tiles), launch, ()
    section = causal_section_heads(problem.seqlen_k, problem.head_dim, problem.group_size, pairs)
    return kernel, persistent_grid(tiles, sm_count(device_id)), launch, (np.int32(problem.batch), np.int32(section))


def _tensor_args(launch: KernelLaunch, inputs: Sequence[tuple[Any, tuple[int, ...]]], out: Any, lse: Any,
                 out_strides: tuple[int, ...]) -> tuple[Any, ...]:
    """The kernel's tensor arguments: Q, K, V as TMA tensor maps (the wgmma kernel) or as pointers with their (b, h, s)
    strides (the mma.sync kernel), and out, lse with out's (b, h, s) strides."""
    o_strides = tuple(map(np.int64, out_strides[:3]))
    if launch.tma_rows is not None:
        return (*tma_maps(inputs, launch.tma_rows), out, lse, *o_strides)
    return (*(x for x, _ in inputs), out, lse, *(np.int64(s) for _, strides in inputs for s in strides[:3]),
            *o_strides)


def forward(
    problem: AttentionProblem, q: Any, k: Any, v: Any, out: Any, lse: Any, heads: Sequence[int] | None = None
) -> None:
    """softmax(scale·QKᵀ)V into `out` ([B,Hq,Sq,D] view, input dtype) and lse ([B,Hq,Sq] float32).

    `heads` (query-head indices) restricts the launch to those heads, leaving the others untouched;
    None computes all heads. Inputs whose strides the kernel cannot take (innermost stride ≠ 1,
    misaligned) are copied once to contiguous buffers; an `out` view it cannot write is filled through
    a contiguous temporary.
    """
    import cupy

    if problem.is_empty or (heads is not None and not heads):
        return  # nothing to write (a launch needs at least one query tile)
    num_heads = problem.heads_q if heads is None else len(heads)
    device_id = cupy.cuda.runtime.getDevice()
    head_index = None if heads is None else on_device(cupy, heads, np.int32)
    kernel, grid, launch, schedule = _launch(problem, device_id, num_heads)
    inputs = [readable(x, tma=launch.tma_rows is not None) for x in (q, k, v)]
    target, out_strides = writable(out)
    kernel(
        (grid,),
        (launch.threads,),
        (
            *_tensor_args(launch, inputs, target, lse, out_strides),
            head_index, np.int32(num_heads), *schedule,
            np.int32(problem.heads_q), np.int32(problem.group_size),
            np.int32(problem.seqlen_q), np.int32(problem.seqlen_k),
            np.float32(problem.scale * LOG2E),
            *((tile_counter(device_id, cupy.cuda.get_current_stream().ptr),) if launch.persistent else ()),
        ),
        shared_mem=launch.smem_bytes,
    )
    if target is not out:
        if heads is None:
            out[...] = target
        else:
            out[:, list(heads)] = target[:, list(heads)]
