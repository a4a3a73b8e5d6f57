"""Every fused-kernel instantiation compiles with the local nvcc for each architecture it runs on (sm_80 and
sm_90a), warning-free, and the float16/bfloat16 head-dim 64/128 kernels use no local memory (0 bytes stack
and spills under -Xptxas -v); and every one compiles with NVRTC, the compiler users' GPUs actually run
(from the nvidia-cuda-nvrtc / nvidia-cuda-runtime wheels of the test extra: no GPU needed)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from compile_kernels import all_kernels, nvrtc_toolkit  # noqa: E402


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc (CUDA toolkit) not on PATH")
def test_all_instantiations_compile_without_spills():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_kernels.py")],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    expected = sum(len(kernel.archs) for kernel in all_kernels())
    assert f"OK: {expected} kernels" in result.stdout


@pytest.mark.skipif(nvrtc_toolkit() is None, reason="no NVRTC wheel: pip install nvidia-cuda-nvrtc nvidia-cuda-runtime")
def test_all_instantiations_compile_with_nvrtc():
    result = subprocess.run([sys.executable, str(ROOT / "scripts" / "compile_kernels.py"), "--nvrtc"],
                            capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    expected = sum("90a" in kernel.archs for kernel in all_kernels())
    assert f"OK: NVRTC compiled {expected} instantiations" in result.stdout
