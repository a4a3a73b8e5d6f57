"""Launcher of the fp8 forward on Hopper: quantize_fp8.cu (one pass for the K/V statistics, then one launch for
Q per-tile and K per-block quantisation with K mean smoothing, and V per-channel quantisation, mean-smoothed and
transposed in 32-key chunks)
then attention_fwd_fp8_sm90.cu (warp-specialised: a producer warpgroup streams the e4m3 K/V^T tiles, two
ping-ponged consumer warpgroups run the wgmmas and the softmax; launch shape in launch_config.fp8_launches),
for CuPy arrays.

    tensors = quantize(problem, q, k, v, heads)      # e4m3 bytes and fp32 scales, see `Fp8Tensors`
    forward(problem, q, k, v, out, lse, heads, {"fp8": tensors})

Everything runs on CuPy's current stream without synchronising; the quantisation is part of every call
(or of the policy's, which leaves the tensors in `Plan.artifacts["fp8"]` for the backend to reuse).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import numpy as np

from ._arrays import on_device
from .cuda_common import common_unsupported_reason, element_strides, readable, sm_count, tma_maps, writable
from .device import current_compute_capability
from .launch_config import (
    FP8_BLOCK_M,
    FP8_HEAD_DIMS,
    FP8_V_CHUNK,
    KernelLaunch,
    ceil_div,
    check_grid,
    fp8_k_block,
    fp8_key_tile,
    fp8_launches,
    fp8_quantize_blocks,
    fp8_stats_splits,
    query_tiles,
)
from .loader import kernel_for
from .problem import LOG2E, AttentionProblem


@dataclass(frozen=True)
class Fp8Tensors:
    """Quantised inputs of one call (CuPy arrays; e4m3 as uint8 bytes).

    qq [B, Hq, Sq', D] and sq [B, Hq, Sq'/BLOCK_M]: q ≈ qq·sq per tile of BLOCK_M rows (Sq' = Sq rounded up,
        padding rows zero); only the query heads in `heads` are written.
    kq [B, Hkv, Sk', D] and sk [B, Hkv, Sk'/KB]: k − k̄ ≈ kq·sk per block of KB keys (KB =
        `launch_config.fp8_k_block`, a part of the kernel's key tile `fp8_key_tile`; Sk' = Sk rounded up to
        the key tile).
    vt [B, Hkv, Sk'/32, D, 32], sv and v_mean [B, Hkv, D]: v[j, d] − v_mean[d] ≈ vt[j'/32, d, j'%32]·sv[d] with
        j' = pos(j): transposed in 32-key chunks (one k32 step of the kernel's P·V each), keys permuted inside
        16-key groups (`key_positions`); v_mean = mean_j v, added back exactly by the kernel.
    row_bias [B, Hq, Sq'] = q·k̄ (k̄: the mean of every 8th key, subtracted from k before the rotation), which
        the kernel adds back (times scale) to lse.
    key_tile: the BLOCK_N these were made for (the kernel of another tile would misread sk, kq and vt).
    """

    heads: tuple[int, ...]
    key_tile: int
    qq: Any
    sq: Any
    kq: Any
    sk: Any
    vt: Any
    sv: Any
    v_mean: Any
    row_bias: Any


def key_positions(seqlen: int) -> np.ndarray:
    """pos[j]: the column of V^T that holds key j (the permutation inside each 16-key group that lets the
    kernel feed the S accumulators to P·V as e4m3 A fragments; see attention_fwd_fp8_sm90.cu)."""
    j = np.arange(seqlen)
    r = j % 16
    return (j & ~15) + 4 * ((r % 8) // 2) + 2 * (r // 8) + r % 2


def unsupported_reason(problem: AttentionProblem) -> str | None:
    """Why the fp8 forward cannot take `problem` (None when it can)."""
    reason = common_unsupported_reason(problem)
    if reason is not None:
        return reason
    cc = current_compute_capability()
    if cc != (9, 0):
        return f"compute capability {cc} (the fp8 kernel uses wgmma e4m3: sm_90a only)"
    if problem.head_dim not in FP8_HEAD_DIMS:
        return f"head dim {problem.head_dim} (fp8 kernels take {list(FP8_HEAD_DIMS)})"
    if problem.scale <= 0:
        return f"scale {problem.scale} (the fp8 kernel folds the scale into exp2 after the row max: needs > 0)"
    return None


@lru_cache(maxsize=128)
def _kernels(problem: AttentionProblem, device_id: int, rotate: bool) -> dict[str, tuple[Any, KernelLaunch]]:
    """Compiled kernels and their launch data for a problem on a device, built once."""
    kernels = {}
    for role, launch in fp8_launches(problem.dtype, problem.head_dim, problem.causal, rotate).items():
        kernels[role] = (kernel_for(launch), launch)
    return kernels


def quantize(problem: AttentionProblem, q: Any, k: Any, v: Any, heads: list[int], rotate: bool = True) -> Fp8Tensors:
    """Quantise q (query heads `heads`), k and v (every KV head) to e4m3 with the kernel's scales; `rotate`
    applies the Hadamard rotation along the head dim to Q and K first (Q Kᵀ unchanged, outliers spread).

    q, k, v: [B, H, S, D] CuPy views of 16-bit floats (copied once if their strides do not suit the kernels).
    Raises ValueError if `problem` is not supported (`unsupported_reason`) or the grid is too large.
    """
    import cupy

    reason = unsupported_reason(problem)
    if reason is not None:
        raise ValueError(f"fp8 forward unsupported: {reason}")
    device = cupy.cuda.runtime.getDevice()
    kernels = _kernels(problem, device, rotate)
    b, hq, hkv, d = problem.batch, problem.heads_q, problem.heads_kv, problem.head_dim
    key_tile, k_block = fp8_key_tile(d, problem.causal), fp8_k_block(d, problem.causal)
    sq_pad = ceil_div(problem.seqlen_q, FP8_BLOCK_M) * FP8_BLOCK_M
    sk_pad = ceil_div(problem.seqlen_k, key_tile) * key_tile
    (q, qs), (k, ks), (v, vs) = (readable(x) for x in (q, k, v))
    splits, rows_per_split = fp8_stats_splits(problem.seqlen_k, b * hkv, sm_count(device))
    partial = cupy.empty((b, hkv, splits, 4, d), dtype=cupy.float32)
    counters = cupy.zeros(b * hkv, dtype=cupy.uint32)
    stats = cupy.empty((4, b, hkv, d), dtype=cupy.float32)  # k mean, v mean, v scale, 1 / v scale
    qq = cupy.empty((b, hq, sq_pad, d), dtype=cupy.uint8)
    sq = cupy.empty((b, hq, sq_pad // FP8_BLOCK_M), dtype=cupy.float32)
    row_bias = cupy.empty((b, hq, sq_pad), dtype=cupy.float32)
    kq = cupy.empty((b, hkv, sk_pad, d), dtype=cupy.uint8)
    sk = cupy.empty((b, hkv, sk_pad // k_block), dtype=cupy.float32)
    vt = cupy.empty((b, hkv, sk_pad // FP8_V_CHUNK, d, FP8_V_CHUNK), dtype=cupy.uint8)
    i32, i64 = np.int32, np.int64

    kernel, launch = kernels["stats"]
    kernel((check_grid(splits * hkv * b),), (launch.threads,),
           (k, v, *map(i64, ks[:3]), *map(i64, vs[:3]), i32(hkv), i32(b), i32(problem.seqlen_k),
            i32(rows_per_split), i32(splits), partial, counters, stats))
    kernel, launch = kernels["quantize"]
    grid = fp8_quantize_blocks(d, problem.causal, problem.seqlen_q, problem.seqlen_k, len(heads) * b, hkv * b)
    kernel((check_grid(grid),), (launch.threads,),
           (q, *map(i64, qs[:3]), k, *map(i64, ks[:3]), v, *map(i64, vs[:3]), on_device(cupy, heads, np.int32),
            i32(len(heads)), i32(hq), i32(hkv), i32(b), i32(problem.seqlen_q), i32(problem.seqlen_k), stats,
            qq, sq, row_bias, kq, sk, vt))
    return Fp8Tensors(tuple(heads), key_tile, qq, sq, kq, sk, vt, stats[2], stats[1], row_bias)


def forward(problem: AttentionProblem, q: Any, k: Any, v: Any, out: Any, lse: Any, heads: list[int],
            artifacts: dict[str, Any] | None = None) -> None:
    """fp8 attention for the query heads `heads` into `out` and `lse`; other heads are left untouched.

    out[b,h,i] ≈ Σ_j softmax_j(scale·q[b,h,i]·k[b,h//G,j]) v[b,h//G,j] with Q, K (mean-smoothed) and V in
    e4m3 (scales per tile for Q, per `fp8_k_block` keys for K, per channel for V), P rounded to e4m3, fp32
    accumulation; lse in natural log. Causal is bottom-right aligned; rows that see no key give out = 0 and lse = −inf.

    q, k, v: [B, H, S, D] CuPy views (16-bit, any strides); out: [B, Hq, Sq, D] view in the input dtype;
    lse: [B, Hq, Sq] float32, contiguous. `artifacts["fp8"]`, when it holds `Fp8Tensors` covering `heads` for
    this problem's key tile (left there by the precision policy), is reused instead of quantising again.
    Raises ValueError when the problem is unsupported (`unsupported_reason`).
    """
    import cupy

    if not heads:
        return
    tensors = (artifacts or {}).get("fp8")
    if (not isinstance(tensors, Fp8Tensors) or not set(heads) <= set(tensors.heads)
            or tensors.key_tile != fp8_key_tile(problem.head_dim, problem.causal)):
        tensors = quantize(problem, q, k, v, heads)
    device = cupy.cuda.runtime.getDevice()
    # The forward kernel does not depend on the rotation (Q Kᵀ is unchanged): the rotate=True set serves both.
    kernel, launch = _kernels(problem, device, True)["forward"]
    target, o_strides = writable(out)
    grid = check_grid(query_tiles(problem.seqlen_q, FP8_BLOCK_M, len(heads) * problem.batch))
    vt = tensors.vt  # [B, Hkv, chunks, D, 32] as the [B, Hkv, chunks * D, 32] the map's boxes step through
    vt = vt.reshape(*vt.shape[:2], vt.shape[2] * vt.shape[3], vt.shape[4])
    kernel(
        (grid,),
        (launch.threads,),
        (
            *tma_maps([(x, element_strides(x)) for x in (tensors.qq, tensors.kq, vt)], launch.tma_rows),
            tensors.sq, tensors.sk, tensors.sv, tensors.v_mean,
            tensors.row_bias,
            on_device(cupy, heads, np.int32), target, lse,
            *map(np.int64, o_strides[:3]),
            np.int32(len(heads)), np.int32(problem.heads_q), np.int32(problem.heads_kv),
            np.int32(problem.seqlen_q), np.int32(problem.seqlen_k), np.float32(problem.scale * LOG2E),
        ),
        shared_mem=launch.smem_bytes,
    )
    if target is not out:
        out[:, heads] = target[:, heads]
