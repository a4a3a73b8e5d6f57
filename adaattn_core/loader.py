"""Run-time compilation of cuda_src/ kernels with NVRTC through CuPy's RawModule, cached.

    fn = get_kernel("attention_fwd.cu", "attention_fwd<__nv_bfloat16, 128, 128, 64, 4, true>")

- Options per architecture: `-arch=sm_90a` on Hopper (wgmma/setmaxnreg need the "a" target), the
  device's own `sm_XY` elsewhere, plus `-std=c++17` and `-I<cuda_src>`.
- Cache key: CuPy's disk cache (~/.cupy/kernel_cache, or $CUPY_CACHE_DIR) keys on the code string,
  options, arch and NVRTC version but does not look inside headers pulled in with `-I`. We therefore
  prepend to the code a SHA-256 of the .cu *and every header it includes* (transitively): editing a .cuh
  changes the code string and so the cache key, and a stale binary is never reused.
- In-process: one RawModule per (file, template instantiation, device), compiled on first use under a
  lock (thread-safe), then reused.
"""

from __future__ import annotations

import hashlib
import re
import threading
from functools import cache
from pathlib import Path
from typing import Any

from .device import compute_capability
from .launch_config import KernelLaunch

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"', re.MULTILINE)
_lock = threading.Lock()
_modules: dict[tuple[str, str, int], Any] = {}


def kernel_source_dir() -> Path:
    """cuda_src/: inside the installed package (wheel) or at the top of a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "cuda_src", here.parent / "cuda_src"):
        if candidate.is_dir():
            return candidate
    raise FileNotFoundError(f"cuda_src/ not found next to {here} or in {here.parent}; reinstall adaattn")


def source_closure(filename: str) -> list[Path]:
    """The file and every header it includes with #include "...", transitively, in first-seen order."""
    root = kernel_source_dir()
    seen: list[Path] = []
    pending = [root / filename]
    while pending:
        path = pending.pop(0)
        if path in seen:
            continue
        if not path.is_file():
            raise FileNotFoundError(f"kernel source {path.name} (included from cuda_src/) does not exist")
        seen.append(path)
        pending.extend(root / name for name in _INCLUDE.findall(path.read_text()))
    return seen


@cache
def _tagged_source(filename: str) -> str:
    closure = source_closure(filename)
    digest = hashlib.sha256(b"".join(p.read_bytes() for p in closure)).hexdigest()
    return f"// adaattn source hash {digest} ({', '.join(p.name for p in closure)})\n" + closure[0].read_text()


def arch_option(compute_capability: tuple[int, int]) -> str:
    """NVRTC -arch for a device: sm_90a on Hopper, sm_XY otherwise."""
    major, minor = compute_capability
    return "-arch=sm_90a" if (major, minor) == (9, 0) else f"-arch=sm_{major}{minor}"


def compile_options(compute_capability: tuple[int, int]) -> tuple[str, ...]:
    return ("-std=c++17", arch_option(compute_capability), f"-I{kernel_source_dir()}")


def kernel_for(launch: KernelLaunch) -> Any:
    """`get_kernel` for a launch of `launch_config`, its dynamic shared memory limit raised to the launch's (a
    kernel must opt in past 48 KB)."""
    kernel = get_kernel(launch.source, launch.name)
    if launch.smem_bytes:
        kernel.max_dynamic_shared_size_bytes = launch.smem_bytes
    return kernel


def get_kernel(filename: str, name_expression: str) -> Any:
    """The compiled `cupy.RawKernel` for one template instantiation on the current device."""
    import cupy

    device = cupy.cuda.Device()
    key = (filename, name_expression, device.id)
    module = _modules.get(key)
    if module is None:
        with _lock:
            module = _modules.get(key)
            if module is None:
                module = cupy.RawModule(
                    code=_tagged_source(filename),
                    options=compile_options(compute_capability(device.id)),
                    name_expressions=[name_expression],
                )
                module.compile()
                _modules[key] = module
    return module.get_function(name_expression)
