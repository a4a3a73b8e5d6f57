"""Which array library an input belongs to, without importing CuPy unless the input is CuPy's.

The core accepts NumPy arrays (CPU backend) and CuPy arrays (GPU backend). Detection goes by the
array type's module so that `import adaattn_core` never imports CuPy, torch or jax.
"""

from __future__ import annotations

import types
from typing import Any

import numpy as np

#: dtypes the core accepts, by name (bfloat16 on NumPy comes from ml_dtypes, on CuPy from CuPy >= 14).
SUPPORTED_DTYPES = ("float16", "bfloat16", "float32", "float64")


_LIBRARY_BY_TYPE: dict[type, str] = {np.ndarray: "numpy"}


def library_name(x: Any) -> str:
    """'numpy' or 'cupy' for supported arrays, else the type's qualified name (for error messages)."""
    kind = type(x)
    library = _LIBRARY_BY_TYPE.get(kind)
    if library is None:
        if kind.__module__.split(".")[0] == "cupy" and kind.__name__ == "ndarray":
            library = _LIBRARY_BY_TYPE[kind] = "cupy"
        else:
            return f"{kind.__module__}.{kind.__qualname__}"
    return library


def namespace(library: str) -> types.ModuleType:
    """The array module for a library name returned by `library_name`."""
    if library == "cupy":
        import cupy

        return cupy
    return np


_DTYPE_NAMES: dict[Any, str] = {}


def dtype_name(dtype: Any) -> str:
    """`dtype.name`, remembered per dtype (NumPy computes the name in Python on every access)."""
    name = _DTYPE_NAMES.get(dtype)
    if name is None:
        name = _DTYPE_NAMES[dtype] = dtype.name
    return name


def compute_dtype(dtype_name: str) -> np.dtype:
    """Accumulation dtype: float64 stays float64, everything narrower is computed in float32."""
    return np.dtype(np.float64) if dtype_name == "float64" else np.dtype(np.float32)


def lse_dtype(dtype_name: str) -> np.dtype:
    """lse is float32, except for float64 inputs where float32 would cap backward accuracy at 1e-7."""
    return compute_dtype(dtype_name)
