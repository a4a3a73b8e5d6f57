"""What the fused kernels need of a CuPy array, checked in one place for every launcher."""

from __future__ import annotations

from typing import Any

LOG2E = 1.4426950408889634


def element_strides(x: Any) -> tuple[int, ...]:
    """Strides in elements (CuPy reports bytes)."""
    return tuple(s // x.itemsize for s in x.strides)


def kernel_ready(x: Any, strides: tuple[int, ...]) -> bool:
    """Innermost stride 1, other strides multiples of 8 elements, 16-byte aligned base (16-byte cp.async)."""
    return strides[-1] == 1 and all(s % 8 == 0 for s in strides[:-1]) and x.data.ptr % 16 == 0


def readable(x: Any) -> tuple[Any, tuple[int, ...]]:
    """`x` and its element strides if the kernels can read it, else a contiguous copy (one copy)."""
    import cupy

    strides = element_strides(x)
    if kernel_ready(x, strides):
        return x, strides
    x = cupy.ascontiguousarray(x)
    return x, element_strides(x)


def writable(x: Any) -> tuple[Any, tuple[int, ...]]:
    """`x` and its element strides if the kernels can write it, else a contiguous temporary to copy back."""
    import cupy

    strides = element_strides(x)
    if kernel_ready(x, strides):
        return x, strides
    target = cupy.empty(x.shape, dtype=x.dtype)
    return target, element_strides(target)
