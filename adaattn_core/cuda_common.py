"""What every fused kernel needs of a problem and of its CuPy arrays, checked in one place for all launchers."""

from __future__ import annotations

import threading
from collections.abc import Sequence
from functools import cache, lru_cache
from typing import Any

from .device import current_compute_capability
from .launch_config import CUDA_TYPES, MIN_COMPUTE_CAPABILITY
from .problem import AttentionProblem
from .tma import tile_map


def common_unsupported_reason(problem: AttentionProblem) -> str | None:
    """Why no fused kernel can take `problem` on the current device (device, dtype, empty key set), or None."""
    cc = current_compute_capability()
    if cc is None or cc < MIN_COMPUTE_CAPABILITY:
        return f"compute capability {cc} (fused kernels need sm_80 or newer: mma.sync bf16, cp.async)"
    if problem.dtype not in CUDA_TYPES:
        return f"dtype {problem.dtype} (fused kernels take {sorted(CUDA_TYPES)})"
    if problem.seqlen_k == 0:
        return "Sk = 0 (no keys: the blocked path writes zeros and lse = -inf)"
    return None


_ATTR_MAX_SMEM_OPTIN = 97  # cudaDevAttrMaxSharedMemoryPerBlockOptin


@cache
def shared_memory_optin(device_id: int) -> int:
    """The device's opt-in dynamic shared memory per block (bytes), queried once per device: the launchers'
    `unsupported_reason` asks on every call."""
    import cupy

    return cupy.cuda.runtime.deviceGetAttribute(_ATTR_MAX_SMEM_OPTIN, device_id)


def shared_memory_reason(what: str, needed: int, available: int) -> str | None:
    """Why a kernel needing `needed` bytes of shared memory per block cannot run where `available` are allowed
    (None when it can): the caller then takes the blocked path instead of a launch that would fail."""
    if needed <= available:
        return None
    return f"{what} needs {needed} bytes of shared memory per block, this GPU allows {available}"


def element_strides(x: Any) -> tuple[int, ...]:
    """Strides in elements (CuPy reports bytes)."""
    return tuple(s // x.itemsize for s in x.strides)


def kernel_ready(x: Any, strides: tuple[int, ...]) -> bool:
    """Innermost stride 1, other strides multiples of 8 elements (16-byte cp.async and TMA), 16-byte aligned base."""
    return strides[-1] == 1 and all(s % 8 == 0 for s in strides[:-1]) and x.data.ptr % 16 == 0


def is_broadcast(x: Any, strides: tuple[int, ...]) -> bool:
    """Some dimension of extent > 1 has stride 0 (a `broadcast_to` view): kernels can read it in place through
    pointers (not through a TMA tensor map: `steps_forward`), but no kernel may write it."""
    return any(s == 0 and n > 1 for s, n in zip(strides, x.shape))


def steps_forward(x: Any, strides: tuple[int, ...]) -> bool:
    """Every dimension of extent > 1 has a positive stride: what a TMA tensor map can step through (it takes
    positive strides only, so neither a broadcast view, stride 0, nor a reversed one, stride < 0)."""
    return all(s > 0 for s, n in zip(strides, x.shape) if n > 1)


def readable(x: Any, *, tma: bool = False) -> tuple[Any, tuple[int, ...]]:
    """`x` and its element strides if the kernels can read it (`tma`: through a TMA tensor map, so stepping
    forward in every dimension: `steps_forward`), else a contiguous copy (one copy)."""
    import cupy

    strides = element_strides(x)
    if kernel_ready(x, strides) and (not tma or steps_forward(x, strides)):
        return x, strides
    x = cupy.ascontiguousarray(x)
    return x, element_strides(x)


def writable(x: Any) -> tuple[Any, tuple[int, ...]]:
    """`x` and its element strides if the kernels can write it, else a contiguous temporary to copy back."""
    import cupy

    strides = element_strides(x)
    if kernel_ready(x, strides) and not is_broadcast(x, strides):
        return x, strides
    target = cupy.empty(x.shape, dtype=x.dtype)
    return target, element_strides(target)


def tma_maps(arrays: Sequence[tuple[Any, tuple[int, ...]]], box_rows: Sequence[int]) -> list[Any]:
    """The TMA tensor maps (`tma.tile_map`) of [B, H, S, C] arrays given with their element strides (as `readable(...,
    tma=True)` returns them), for boxes of `box_rows` rows each, in the arrays' own element size."""
    return [tile_map(x.data.ptr, x.shape, strides[:3], rows, x.itemsize)
            for (x, strides), rows in zip(arrays, box_rows)]


#: Tile counters allocated at once per device, so that a stream first seen during CUDA graph capture (where
#: cudaMalloc is not allowed) takes a counter without allocating, once any launch has run on the device.
_COUNTERS_PER_BLOCK = 256
_counters: dict[int, tuple[list[Any], dict[tuple[int, int], Any]]] = {}
_counters_lock = threading.Lock()


def tile_counter(device_id: int, stream_ptr: int) -> Any:
    """The int32[2] work-tile counter of persistent kernels for launches on one (device, stream): zeroed once,
    then zeroed again by each launch's last block, so launches in order on that stream share it. Launches that
    may run concurrently must not share one, hence one per stream (and per host thread for the per-thread
    default stream; 8 bytes stay allocated for every stream ever used). A CUDA graph keeps the counter of the
    stream it was captured on: replay it on that stream, or not concurrently with launches on it."""
    import cupy

    # cudaStreamPerThread: one handle that names a different stream in every host thread.
    key = (stream_ptr, threading.get_ident() if stream_ptr == cupy.cuda.runtime.streamPerThread else 0)
    counter = _counters.get(device_id, ((), {}))[1].get(key)  # dict reads are atomic: lock only to add
    if counter is not None:
        return counter
    with _counters_lock:
        blocks, assigned = _counters.setdefault(device_id, ([], {}))
        counter = assigned.get(key)
        if counter is None:
            index = len(assigned)
            if index == len(blocks) * _COUNTERS_PER_BLOCK:
                blocks.append(_zeroed_counters(device_id))
            counter = blocks[-1][2 * (index % _COUNTERS_PER_BLOCK):][:2]
            assigned[key] = counter
        return counter


def _zeroed_counters(device_id: int) -> Any:
    import cupy

    with cupy.cuda.Device(device_id):
        try:
            block = cupy.zeros(2 * _COUNTERS_PER_BLOCK, dtype=cupy.int32)
            cupy.cuda.Device(device_id).synchronize()  # zero before any stream reads it
        except cupy.cuda.runtime.CUDARuntimeError as error:
            raise RuntimeError(
                f"could not allocate the forward kernel's tile counters on device {device_id} ({error}); under CUDA "
                "graph capture, run one attention call on this device before capturing") from error
    return block


@lru_cache(maxsize=16)
def sm_count(device_id: int) -> int:
    """Streaming multiprocessors of a device."""
    import cupy

    return int(cupy.cuda.Device(device_id).attributes["MultiProcessorCount"])
