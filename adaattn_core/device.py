"""What this machine can run: GPU presence, compute capability, and which backends/precisions work.

`capabilities()` and `current_compute_capability()` never raise when CuPy or a GPU is missing: a capability says
why it is unavailable. GPU facts are per device: `capabilities()` describes CuPy's current device,
`compute_capability(device_id)` any device (which must exist); the API makes the inputs' device current for the
duration of a call.
"""

from __future__ import annotations

import platform
from dataclasses import asdict, dataclass, field
from functools import cache
from typing import Any

from .launch_config import MIN_COMPUTE_CAPABILITY
from .precision import precision_capabilities


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


@cache
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


@cache
def compute_capability(device_id: int) -> tuple[int, int]:
    """(major, minor) of CUDA device `device_id`, queried once per device: the fused kernels' checks ask on every
    call."""
    import cupy

    props = cupy.cuda.runtime.getDeviceProperties(device_id)
    return int(props["major"]), int(props["minor"])


def current_compute_capability() -> tuple[int, int] | None:
    """(major, minor) of CuPy's current device (the inputs' device during an API call); None without CuPy or a
    GPU."""
    cupy, _ = _cupy_device()
    return None if cupy is None else compute_capability(cupy.cuda.runtime.getDevice())


def capabilities() -> Capabilities:
    """What this process can run on CuPy's current device: the platform, the GPU and its compute capability (None
    without CuPy or a GPU), each backend and precision with "available (…)" or the reason it is not. Probed once
    per process and device (cached); never raises: a missing CuPy or GPU is a reason, not an error. `adaattn info`
    prints it."""
    cupy, _ = _cupy_device()
    return _capabilities(None if cupy is None else cupy.cuda.runtime.getDevice())


@cache
def _capabilities(device_id: int | None) -> Capabilities:
    """`capabilities()` for one device (None: no usable CuPy or GPU)."""
    import numpy

    cupy, reason = _cupy_device()
    gpu = cc = None
    if device_id is not None:
        props = cupy.cuda.runtime.getDeviceProperties(device_id)
        gpu = props["name"].decode() if isinstance(props["name"], bytes) else str(props["name"])
        cc = compute_capability(device_id)

    backends = {"cpu": "available (blocked NumPy)"}
    backends["cupy-blocked"] = "available (cuBLAS)" if cupy is not None else f"unavailable: {reason}"
    if cupy is None:
        backends["cuda"] = f"unavailable: {reason}"
    elif cc < MIN_COMPUTE_CAPABILITY:
        backends["cuda"] = f"unavailable: sm_{cc[0]}{cc[1]} is older than sm_80 (mma.sync bf16, cp.async)"
    else:
        backends["cuda"] = "available (fused float16/bfloat16 forward and backward, NVRTC " + _nvrtc_version(cupy) + ")"
    precisions = precision_capabilities(None if cc is None else f"{cc[0]}{cc[1]}")
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


def _nvrtc_version(cupy: Any) -> str:
    try:
        return ".".join(map(str, cupy.cuda.nvrtc.getVersion()))
    except Exception as error:  # NVRTC library missing from the CUDA install
        return f"unavailable: {error}"


def gpu_name() -> str:
    return capabilities().gpu or "unknown GPU"
