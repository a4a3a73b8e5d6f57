"""Which array library an input belongs to, without importing CuPy unless the input is CuPy's, and the
host/device transfers of the core (`on_device`, `to_host`, `to_host64`), in one place.

The core accepts NumPy arrays (CPU backend) and CuPy arrays (GPU backend). Detection goes by the
array type's module so that `import adaattn_core` never imports CuPy, torch or jax.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
from collections import OrderedDict
from collections.abc import Callable
from contextlib import AbstractContextManager
from typing import Any, TypeVar

import numpy as np

#: dtypes the core accepts, by name (bfloat16 on NumPy comes from ml_dtypes, on CuPy from CuPy >= 14).
SUPPORTED_DTYPES = ("float16", "bfloat16", "float32", "float64")


_LIBRARY_BY_TYPE: dict[type, str] = {np.ndarray: "numpy"}


def library_name(x: Any) -> str:
    """'numpy' or 'cupy' for supported arrays, else the type's qualified name (for error messages). NumPy's
    ndarray subclasses count as NumPy (np.memmap from np.load(..., mmap_mode="r")), except masked arrays, whose
    mask the computation would ignore."""
    kind = type(x)
    library = _LIBRARY_BY_TYPE.get(kind)
    if library is None:
        if kind.__module__.split(".")[0] == "cupy" and kind.__name__ == "ndarray":
            library = _LIBRARY_BY_TYPE[kind] = "cupy"
        elif issubclass(kind, np.ndarray) and not issubclass(kind, np.ma.MaskedArray):
            library = _LIBRARY_BY_TYPE[kind] = "numpy"
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


def device_of(x: Any) -> AbstractContextManager[Any]:
    """A context in which CuPy's current device is `x`'s GPU (and its current stream that device's): every
    allocation, kernel and cached plan of the core goes to the current device. A no-op for anything else."""
    if library_name(x) == "cupy":
        return x.device  # cupy.cuda.Device: entering it makes it current, leaving restores the previous one
    return contextlib.nullcontext()


_Function = TypeVar("_Function", bound=Callable[..., Any])


def on_inputs_device(function: _Function) -> _Function:
    """Runs `function` on the GPU of its argument `q` (`device_of`), passed by position or by name, so that inputs
    on a GPU other than CuPy's current one are computed where they are and outputs are allocated there. The other
    inputs are then checked against q's GPU (an error names the one that is elsewhere)."""
    position = list(inspect.signature(function).parameters).index("q")

    @functools.wraps(function)
    def run_on_inputs_device(*args: Any, **kwargs: Any) -> Any:
        q = args[position] if len(args) > position else kwargs.get("q")
        with device_of(q):
            return function(*args, **kwargs)

    return run_on_inputs_device  # type: ignore[return-value]


def lse_dtype(dtype_name: str) -> np.dtype:
    """lse is float32, except for float64 inputs where float32 would cap backward accuracy at 1e-7."""
    return compute_dtype(dtype_name)


#: Host arrays kept on the device by `on_device` (least recently used dropped first).
DEVICE_CACHE_SIZE = 256
_device_cache: OrderedDict[tuple[Any, ...], Any] = OrderedDict()


def on_device(xp: Any, values: Any, dtype: Any = None) -> Any:
    """Small host values (indices, row limits) as an array of `xp` (NumPy: the NumPy array itself).

    CuPy: cached per device by content (the DEVICE_CACHE_SIZE most recent), so that repeated calls with the
    same rows/heads make no host→device copy: a copy from pageable host memory first waits for the stream to
    drain, which would serialise the host's launches with the GPU's work several times per call. The cached
    arrays are shared: callers only read them (indexing), never write.
    """
    host = np.asarray(values, dtype=dtype)
    if xp is np:
        return host
    key = (xp.cuda.Device().id, host.dtype.str, host.shape, host.tobytes())
    cached = _device_cache.get(key)
    if cached is None:
        cached = _device_cache[key] = xp.asarray(host)
        if len(_device_cache) > DEVICE_CACHE_SIZE:
            _device_cache.popitem(last=False)
    else:
        _device_cache.move_to_end(key)
    return cached


def to_host(x: Any) -> np.ndarray:
    """A NumPy copy of a CuPy array (one device-to-host transfer), or a NumPy array as it is."""
    return x.get() if hasattr(x, "get") else np.asarray(x)


def to_host64(x: Any) -> np.ndarray:
    """float64 NumPy copy of a NumPy, CuPy or torch array (device arrays: one device-to-host transfer).

    CuPy arrays of 32 or 64 bits travel as they are and are widened on the host; narrower ones (float16,
    bfloat16, which NumPy alone cannot hold) are widened on the device first. Either way the values are exact.
    """
    if hasattr(x, "detach"):  # torch
        return x.detach().double().cpu().numpy()
    if hasattr(x, "get") and x.dtype.itemsize < 4:  # CuPy
        x = x.astype(np.float64)
    return np.asarray(to_host(x), dtype=np.float64)
