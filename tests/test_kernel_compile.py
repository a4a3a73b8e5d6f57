"""Every fused-kernel instantiation compiles with the local nvcc for each architecture it runs on (sm_80 and
sm_90a), warning-free, and the float16/bfloat16 head-dim 64/128 kernels use no local memory (0 bytes stack
and spills under -Xptxas -v); and every one compiles with NVRTC, the compiler users' GPUs actually run
(from the nvidia-cuda-nvrtc / nvidia-cuda-runtime wheels of the test extra: no GPU needed)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
from compile_kernels import all_kernels, nvrtc_toolkit, wait_ahead_of_softmax  # noqa: E402


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


def test_wait_ahead_of_softmax_reads_the_sass_order():
    """The --sass check flags a loop whose wait for P V (wait_group 0 after a wait_group 1) comes before any of the
    softmax's exponentials, as ptxas had scheduled it before wgmma_wait_after_softmax, and passes one whose
    exponentials all come before it; SASS lines shuffled with unrelated instructions at random (seeded)."""
    rng = np.random.default_rng(12)
    wait_s, wait_pv = "WARPGROUP.DEPBAR.LE gsb0, 0x1 ;", "WARPGROUP.DEPBAR.LE gsb0, 0x0 ;"
    exps = [f"MUFU.EX2 R{i}, R{i} ;" for i in rng.integers(10, 200, size=int(rng.integers(3, 120)))]

    def listing(*parts: list[str]) -> list[str]:
        lines = []
        for part in parts:
            for line in part:
                lines += [f"FFMA R{int(rng.integers(200))}, R1, R2, R3 ;"] * int(rng.integers(0, 3)) + [line]
        return lines

    first_tile = [wait_pv, *exps]  # the first tile's wait for S alone, then its softmax: not looked at
    last = [wait_pv]  # the last tile's P V, after the loop
    assert not wait_ahead_of_softmax(listing(first_tile, [wait_s], exps, [wait_pv, wait_pv], last))
    assert wait_ahead_of_softmax(listing(first_tile, [wait_s], [wait_pv], exps, last))
    assert wait_ahead_of_softmax(listing(first_tile, [wait_s], exps[:2], [wait_pv], exps[2:], last))
    assert wait_ahead_of_softmax(listing(first_tile, [wait_s], exps, [wait_pv], [wait_s], [wait_pv], exps))


def test_sm90_tile_follows_row_padding():
    """Causal D=64 keeps its 192-row tile unless that tile's last query block would pad more than 10% of the rows
    and the 128-row short tile pads fewer (192 rows pad 12.5% at S = 512 and 1024, 10.8% at 520 where 128 rows
    would pad 23%); the short tile runs without ping-pong, and the launch carries both choices."""
    from adaattn_core.launch_config import FORWARD_TILES_SM90, MAX_ROW_PADDING, forward_launch, sm90_tile

    rows = {0: 192, 1: 128, 17: 128, 127: 128, 130: 192, 200: 128, 512: 128, 520: 192, 768: 192, 1000: 128,
            1024: 128, 1536: 192, 2048: 192, 4097: 192}
    for seqlen_q, block_m in rows.items():
        tile = sm90_tile(64, True, seqlen_q)
        assert tile.block_m == block_m, (seqlen_q, tile)
        assert tile.pingpong is (block_m == 192), (seqlen_q, tile)
        launch = forward_launch("bfloat16", 64, True, use_sm90=True, seqlen_q=seqlen_q)
        assert launch.block_m == block_m and launch.tma_rows == (block_m, 128, 128), (seqlen_q, launch)
        assert launch.name == (f"attention_fwd_sm90_ws<__nv_bfloat16, 64, {block_m}, 128, 3, true, "
                               f"{'true' if block_m == 192 else 'false'}>"), launch.name
        nopp = forward_launch("bfloat16", 64, True, use_sm90=True, pingpong=False, seqlen_q=seqlen_q)
        assert nopp.name.endswith(", true, false>"), nopp.name
    # The rule itself at every length: the short tile exactly where the table tile pads more than MAX_ROW_PADDING
    # of Sq and the short one pads fewer (e.g. 860: 192 rows pad 11.6%, 128 rows 3.0%).
    assert sm90_tile(64, True, 860).block_m == 128
    for seqlen_q in range(1, 4200):
        long_pad, short_pad = -seqlen_q % 192, -seqlen_q % 128
        short = long_pad > MAX_ROW_PADDING * seqlen_q and short_pad < long_pad
        assert sm90_tile(64, True, seqlen_q).block_m == (128 if short else 192), seqlen_q
    for seqlen_q in (1, 512, 1024):  # other head dims and non-causal D=64 have no short tile
        assert sm90_tile(64, False, seqlen_q) == FORWARD_TILES_SM90[(64, False)]
        assert sm90_tile(128, True, seqlen_q) == FORWARD_TILES_SM90[(128, True)]
    assert sm90_tile(32, False, 1024) is None


def test_every_reachable_forward_launch_is_compiled():
    """Whatever tile, ping-pong setting and sequence length a launcher asks for, the instantiation is in
    all_forward_kernels(), which compile_kernels.py (and the compile tests above) build."""
    from adaattn_core.launch_config import CUDA_TYPES, FORWARD_TILES, all_forward_kernels, forward_launch

    kernels = all_forward_kernels()
    compiled = {launch.name for launch in kernels}
    assert len(compiled) == len(kernels), "an instantiation listed twice fails to compile (nvcc: instantiated twice)"
    for dtype in CUDA_TYPES:
        for head_dim, causal in FORWARD_TILES:
            for use_sm90 in (False, True):
                for pingpong in (False, True):
                    for seqlen_q in (0, 1, 17, 129, 200, 512, 520, 768, 1000, 1024, 2048, 4097):
                        launch = forward_launch(dtype, head_dim, causal, use_sm90, pingpong, seqlen_q)
                        assert launch.name in compiled, launch.name


def test_sm90_tiles_fit_shared_memory():
    """Every wgmma forward tile fits Hopper's 227 KB of shared memory per block."""
    from adaattn_core.launch_config import FORWARD_TILES_SM90, SHORT_TILES_SM90

    for table in (FORWARD_TILES_SM90, SHORT_TILES_SM90):
        for (head_dim, _), tile in table.items():
            assert tile.smem_bytes(head_dim) <= 227 * 1024, (head_dim, tile)


def test_kernels_that_exceed_a_gpus_shared_memory_are_refused():
    """A tile that needs more shared memory per block than the GPU allows must make the launcher decline (the
    blocked path then runs) instead of failing at launch: the mma.sync forward at D = 256 needs more than an A100's
    opt-in 163 KB, and a consumer Ampere/Ada card (99 KB) is short from D = 192."""
    from adaattn_core.cuda_common import shared_memory_reason
    from adaattn_core.launch_config import FORWARD_TILES, forward_launch

    a100, consumer = 166_912, 101_376
    for (head_dim, causal) in FORWARD_TILES:
        launch = forward_launch("bfloat16", head_dim, causal, use_sm90=False)
        for available in (a100, consumer):
            reason = shared_memory_reason(f"head dim {head_dim}", launch.smem_bytes, available)
            if launch.smem_bytes <= available:
                assert reason is None
            else:  # names the kernel, what it needs and what the GPU allows
                assert re.fullmatch(rf"head dim {head_dim} needs (\d+) bytes .* allows (\d+)", reason), reason
                assert re.findall(r"\d+", reason)[1:] == [str(launch.smem_bytes), str(available)], reason
    d256 = forward_launch("bfloat16", 256, False, use_sm90=False).smem_bytes
    assert shared_memory_reason("head dim 256", d256, a100) is not None  # the case this check exists for
    d192 = forward_launch("bfloat16", 192, False, use_sm90=False).smem_bytes
    assert shared_memory_reason("head dim 192", d192, a100) is None
    assert shared_memory_reason("head dim 192", d192, consumer) is not None


def test_forward_launcher_declines_a_tile_over_the_gpus_shared_memory(monkeypatch):
    """cuda_forward's own check (no GPU: the mma.sync kernel is forced and the device reports an A100's opt-in
    limit): D = 256 is declined with the kernel, its bytes and the limit named; D = 128 fits."""
    from adaattn_core import cuda_forward
    from adaattn_core.launch_config import forward_launch
    from adaattn_core.problem import describe

    a100 = 166_912
    monkeypatch.setattr(cuda_forward, "_use_sm90", lambda problem, device_id: False)
    monkeypatch.setattr(cuda_forward, "shared_memory_optin", lambda device_id: a100)
    check = cuda_forward._shared_memory_reason.__wrapped__  # uncached: the patches must be seen
    for head_dim in (256, 128):
        x = np.zeros((1, 2, 300, head_dim), np.float16)
        reason = check(describe(x, x, x, causal=False, scale=None, layout="bhsd"), 0, "auto")
        needed = forward_launch("float16", head_dim, False, use_sm90=False).smem_bytes
        if head_dim == 128:
            assert needed <= a100 and reason is None, reason
        else:
            assert reason == (f"head dim 256 (attention_fwd.cu) needs {needed} bytes of shared memory per block, "
                              f"this GPU allows {a100}"), reason


def test_steps_forward_is_what_a_tma_map_can_read():
    """Broadcast (stride 0) and reversed (stride < 0) dimensions of extent > 1 cannot go through a TMA tensor map;
    a dimension of extent 1 is never stepped, whatever its stride."""
    from adaattn_core.cuda_common import element_strides, steps_forward

    x = np.zeros((2, 3, 16, 8), dtype=np.float16)
    views = {"contiguous": (x, True), "reversed rows": (x[:, :, ::-1], False), "reversed heads": (x[:, ::-1], False),
             "broadcast batch": (np.broadcast_to(x[:1], x.shape), False),
             "reversed extent-1 head": (x[:, :1][:, ::-1], True), "transposed": (x.transpose(0, 2, 1, 3), True)}
    for name, (view, expected) in views.items():
        assert steps_forward(view, element_strides(view)) is expected, name
