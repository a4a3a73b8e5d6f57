"""What this machine can run: GPU presence, compute capability, and which backends/precisions work.

Nothing here raises when CuPy or a GPU is missing; each capability says why it is unavailable.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from typing import Any


@dataclass(frozen=True)
class Capabilities:
    """Backends and precisions available here, each unavailable one with its reason."""

    platform: str
    python: str
    numpy: str
    cupy: str | None
    gpu: str | None
    compute_capability: tuple[int, int] | None
    backends: dict[str, str] = field(default_factory=dict)
    precisions: dict[str, str] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def _cupy_device() -> tuple[Any, str | None]:
    """(cupy module or None, reason it is unusable or None)."""
    try:
        import cupy
    except ImportError:
        return None, "CuPy is not installed (pip install 'adaattn[cuda12]' or 'adaattn[cuda13]')"
    try:
        if cupy.cuda.runtime.getDeviceCount() == 0:
            return None, "CuPy found no CUDA device"
    except Exception as error:  # CuPy raises CUDARuntimeError without a driver
        return None, f"CuPy could not reach a CUDA device: {error}"
    return cupy, None


@lru_cache(maxsize=1)
def capabilities() -> Capabilities:
    """Probe once per process."""
    import numpy

    cupy, reason = _cupy_device()
    gpu = cc = None
    if cupy is not None:
        props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
        gpu = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        cc = (int(props["major"]), int(props["minor"]))

    backends = {"cpu": "available (blocked NumPy)"}
    backends["cupy-blocked"] = "available" if cupy is not None else f"unavailable: {reason}"
    precisions = {
        "float64": "available (CPU; GPU through cupy-blocked)",
        "float32": "available",
        "float16": "available (CPU computes in float32)",
        "bfloat16": "available (CPU computes in float32; NumPy needs ml_dtypes)",
    }
    return Capabilities(
        platform=platform.platform(),
        python=platform.python_version(),
        numpy=numpy.__version__,
        cupy=None if cupy is None else cupy.__version__,
        gpu=gpu,
        compute_capability=cc,
        backends=backends,
        precisions=precisions,
    )


def gpu_name() -> str:
    return capabilities().gpu or "unknown GPU"
