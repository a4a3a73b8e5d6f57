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


def test_sm90_tile_follows_row_padding():
    """The wgmma forward keeps its table tile unless the last query block would pad more than MAX_ROW_PADDING of
    the rows; then it takes the short-sequence tile (causal D=64: 192 rows pad 12.5% at S = 512 and 1024)."""
    from adaattn_core.launch_config import FORWARD_TILES_SM90, MAX_ROW_PADDING, SHORT_TILES_SM90, sm90_tile

    for (head_dim, causal), short in SHORT_TILES_SM90.items():
        tile = FORWARD_TILES_SM90[(head_dim, causal)]
        for seqlen_q in (1, 17, 127, 512, 768, 1000, 1024, 1536, 2048, 4097):
            padding = -seqlen_q % tile.block_m
            expected = short if padding > MAX_ROW_PADDING * seqlen_q else tile
            assert sm90_tile(head_dim, causal, seqlen_q) == expected, seqlen_q
    assert sm90_tile(64, True, 1024).block_m == 128 and sm90_tile(64, True, 2048).block_m == 192
    assert sm90_tile(64, False, 1024) == FORWARD_TILES_SM90[(64, False)]
    assert sm90_tile(32, False, 1024) is None
    # The tile's ping-pong setting reaches the instantiation (the short causal D=64 tile runs without it).
    from adaattn_core.launch_config import forward_launch

    for seqlen_q in (1000, 2048):
        tile = sm90_tile(64, True, seqlen_q)
        name = forward_launch("bfloat16", 64, True, use_sm90=True, seqlen_q=seqlen_q).name
        assert name.endswith(f"{str(tile.pingpong).lower()}>") and f", {tile.block_m}, " in name, name


def test_sm90_tiles_fit_shared_memory():
    """Every wgmma forward tile fits Hopper's 227 KB of shared memory per block."""
    from adaattn_core.launch_config import FORWARD_TILES_SM90, SHORT_TILES_SM90

    for table in (FORWARD_TILES_SM90, SHORT_TILES_SM90):
        for (head_dim, _), tile in table.items():
            assert tile.smem_bytes(head_dim) <= 227 * 1024, (head_dim, tile)
