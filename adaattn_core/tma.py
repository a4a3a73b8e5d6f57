"""Tensor maps for the Hopper kernels' TMA loads (`cp.async.bulk.tensor`), encoded on the host by the CUDA
driver's `cuTensorMapEncodeTiled` through ctypes (CuPy does not wrap it; the driver library is present wherever
a kernel can run).

A map describes one [B, H, S, C] tensor of 2-byte (bf16/fp16) or 1-byte (e4m3) elements (any strides that are
multiples of 16 bytes, innermost stride 1) as 4-D (C, S, H, B, innermost first) with a box of one swizzle line
(min(C · itemsize, 128) bytes) by `box_rows` rows and the swizzle of that line (32, 64 or 128 bytes), the layout
`tma_load_tile` and `tma_load_chunks` (cuda_src/wgmma_sm90.cuh) write for the wgmma descriptors; rows past S
read as zeros. It is passed to a kernel by value (`const __grid_constant__ TmaMap`) as the 128-byte NumPy
structured scalar returned here.
"""

from __future__ import annotations

import ctypes
from functools import cache, lru_cache

import numpy as np

#: The kernels' TmaMap: 128 opaque bytes (CUtensorMap), passed by value.
TMA_MAP_DTYPE = np.dtype([("words", np.uint64, (16,))])

# CUtensorMap* enums (cuda.h, CUDA 12+). The TMA only copies bytes: unsigned types of the element size serve
# bf16, fp16 and e4m3 alike.
_DATA_TYPE_BY_ITEMSIZE = {1: 0, 2: 1}  # CU_TENSOR_MAP_DATA_TYPE_UINT8, _UINT16
_SWIZZLE_BY_LINE = {32: 1, 64: 2, 128: 3}  # CU_TENSOR_MAP_SWIZZLE_32B, _64B, _128B
_INTERLEAVE_NONE = 0
_L2_PROMOTION_256B = 3
_OOB_FILL_ZEROS = 0  # CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE: out-of-bounds elements read as zero
_MAX_BOX_ROWS = 256


@cache
def _encode_tiled() -> ctypes._CFuncPtr:
    u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
    fn = ctypes.CDLL("libcuda.so.1").cuTensorMapEncodeTiled
    fn.restype = ctypes.c_int
    fn.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_uint32, ctypes.c_void_p, u64p, u64p, u32p, u32p,
                   ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int]
    return fn


@lru_cache(maxsize=1024)
def tile_map(ptr: int, shape: tuple[int, int, int, int], strides: tuple[int, int, int], box_rows: int,
             itemsize: int = 2) -> np.void:
    """The TmaMap of a [B, H, S, C] tensor of `itemsize`-byte elements at device address `ptr` with element strides
    (batch, head, row) (innermost stride 1), for tiles of `box_rows` rows by all C columns: C · itemsize / line
    copies of one swizzle line, line = min(C · itemsize, 128) bytes (32, 64 or 128).

    Raises ValueError naming the argument the TMA unit cannot take (the launchers pass arrays through
    `cuda_common.readable(..., tma=True)` first, so this only fires on a broken invariant) and RuntimeError with the
    driver's code if the driver refuses the map.
    """
    batch, heads, rows, cols = shape
    if itemsize not in _DATA_TYPE_BY_ITEMSIZE:
        raise ValueError(f"TMA tile map: itemsize {itemsize}, expected one of {sorted(_DATA_TYPE_BY_ITEMSIZE)}")
    line = min(cols * itemsize, 128)
    if line not in _SWIZZLE_BY_LINE or cols * itemsize % line:
        raise ValueError(f"TMA tile map: rows of {cols} x {itemsize} bytes (shape {shape}), expected 32 or 64 bytes "
                         "or a multiple of 128")
    if not 0 < box_rows <= _MAX_BOX_ROWS:
        raise ValueError(f"TMA tile map: box_rows {box_rows}, expected 1..{_MAX_BOX_ROWS}")
    if ptr % 16:
        raise ValueError(f"TMA tile map: address {ptr:#x}, expected a multiple of 16 bytes")
    dims = (cols, rows, heads, batch)
    # A dimension of extent 1 is never stepped, so its stride is free: give it a legal one (its real stride may
    # be 0 or unaligned, e.g. a broadcast batch of 1).
    byte_strides = tuple(itemsize * s if n > 1 else 16 for s, n in zip(strides[::-1], dims[1:]))
    if any(s <= 0 or s % 16 or s >= 2**40 for s in byte_strides):
        raise ValueError(f"TMA tile map: strides {strides} ({itemsize}-byte elements) must be positive multiples of "
                         "16 bytes below 2**40 bytes")
    buffer = np.zeros(1 + 64 // 8 + 16, dtype=np.uint64)  # room to align the 128-byte map to 64 bytes
    start = (-buffer.ctypes.data % 64) // 8
    tensor_map = buffer[start:start + 16]
    code = _encode_tiled()(
        tensor_map.ctypes.data, _DATA_TYPE_BY_ITEMSIZE[itemsize], 4, ptr,
        (ctypes.c_uint64 * 4)(*dims), (ctypes.c_uint64 * 3)(*byte_strides),
        (ctypes.c_uint32 * 4)(line // itemsize, box_rows, 1, 1), (ctypes.c_uint32 * 4)(1, 1, 1, 1),
        _INTERLEAVE_NONE, _SWIZZLE_BY_LINE[line], _L2_PROMOTION_256B, _OOB_FILL_ZEROS,
    )
    if code != 0:
        raise RuntimeError(f"cuTensorMapEncodeTiled returned CUresult {code} for shape {shape}, element strides "
                           f"{strides}, itemsize {itemsize}, box rows {box_rows}")
    return tensor_map.view(TMA_MAP_DTYPE)[0]
