"""Adaptive precision: the per-head fp8/16-bit policy with an a-posteriori error guard, the NumPy emulation
of the fp8 forward, and what each GPU generation supports.

fp8 math (the same in `cuda_src/quantize_fp8.cu` + `attention_fwd_fp8_sm90.cu` and in `emulate_forward`):

    k̃ = k − k̄,  k̄ = mean of keys 0, 8, 16, …           (per batch and KV head; any shift is softmax-invariant)
    ṽ = v − v̄,  v̄ = mean_j v                            (per channel; the kernel adds v̄ back exactly)
    q ≈ e4m3(q·448/a_q)·a_q/448,  a_q = max|q| over a tile of BLOCK_M rows of one head
    k̃ ≈ e4m3(k̃·448/a_k)·a_k/448,  a_k = max|k̃| over a block of KB keys (launch_config.fp8_k_block)
    ṽ ≈ e4m3(ṽ·448/a_v)·a_v/448,  a_v = max_j |ṽ[:, d]| per channel d
    x = scale·log2(e)·(q_e·k_e)·s_q·s_k;  online softmax over key tiles visited last to first, with a
    reference max m that moves only when a tile's max exceeds it by more than RESCALE_LOG2 (lazy rescaling):
    P = 2^(x − m + P_SHIFT) ≤ 448 (P_SHIFT = log2(448) − RESCALE_LOG2); O = v̄ + Σ e4m3(P)·v_e·s_v / l, l = Σ P

with e4m3 = round to nearest even, saturating at ±448 (`round_e4m3`). Presets (`PrecisionPolicy`):

- "quality": every head at the input's 16-bit precision (no estimation).
- "balanced": fp8 for a head when GUARD_MARGIN (1.3) times its estimated relative L2 error is ≤ 1e-2.
- "speed": fp8 wherever supported, unless GUARD_MARGIN times the estimate exceeds 3e-2.
- "fp8": fp8 for every head (no guard; raises where no fp8 path exists).

The estimate: `sample_rows` query rows per head (evenly spaced, plus the last rows, which see the most keys
when causal) computed in float32 from the inputs and in the fp8 emulation of the same quantised tensors
(the kernel's own bytes on the GPU), rounded to the input's 16-bit dtype as the kernel's output is (for an
accurate head that rounding is most of the error), relative L2 error over those rows and the batch.
The emulation is exact arithmetic on the e4m3 grid; it does not model the truncating accumulation of
Hopper's e4m3 wgmma (~13-14 bits kept), which matters only when the P·V products share a sign: the V mean
smoothing removes the common case (channels with an offset), see attention_fwd_fp8_sm90.cu. fp8 runs on the GPU
only on sm_90 (our kernel is wgmma e4m3, sm_90a); elsewhere, and on the CPU, "balanced" and "speed" keep the
input precision unless `PrecisionPolicy(..., emulate=True)` asks for the NumPy emulation (tests, studies).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ._arrays import library_name, namespace, on_device, to_host
from .launch_config import FP8_BLOCK_M, fp8_k_block, fp8_key_tile
from .policy import FP8, POLICIES, HeadPlan, Plan, Policy, check_number
from .problem import LOG2E, AttentionProblem, check_flag
from .reference import masked_softmax, rel_l2_per_head

if TYPE_CHECKING:
    from .report import Report

E4M3_MAX = 448.0
#: The fp8 kernel's lazy-rescale threshold (log2 domain) and the shift that puts P = 2^(x - m + P_SHIFT) at
#: most at E4M3_MAX (attention_fwd_fp8_sm90.cu).
RESCALE_LOG2 = 3.0
P_SHIFT = math.log2(E4M3_MAX) - RESCALE_LOG2
#: The K mean subtracted before quantisation is over keys 0, 8, 16, … (K_MEAN_STRIDE in quantize_fp8.cu).
K_MEAN_STRIDE = 8
#: Relative-error tolerance of the guard per preset (None: no fp8; inf: fp8 without a guard).
PRESETS: dict[str, float | None] = {"quality": None, "balanced": 1e-2, "speed": 3e-2, "fp8": math.inf}
#: A head goes fp8 only when GUARD_MARGIN × its estimate is within the tolerance: the estimate comes from sampled
#: rows, and on a trained model's heads the error measured over all rows was up to 1.29× it
#: (benchmarks/results/quality/2026-11-22-H200-quality-2.json), so heads estimated just under the tolerance
#: measured just over it.
GUARD_MARGIN = 1.3


def precision_capabilities(compute_capability: str | None) -> dict[str, str]:
    """Which precisions a device supports, and why, for a compute capability like "90" or "8.9" (None: CPU).

    bf16 tensor cores from sm_80; fp8 e4m3 tensor cores from sm_89 (Ada) and sm_90 (Hopper); our fp8 attention
    kernel uses wgmma and so needs sm_90a exactly.
    """
    if compute_capability is None:
        return {
            "float64": "available",
            "float32": "available",
            "bfloat16": "available (computed in float32; NumPy needs ml_dtypes)",
            "float16": "available (computed in float32)",
            FP8: "emulated only: no fp8 hardware on the CPU; PrecisionPolicy(..., emulate=True) runs the NumPy "
                 "emulation of the GPU kernel's math",
        }
    cc = int(compute_capability.replace(".", ""))
    name = f"sm_{cc}"
    caps = {"float64": "available (cupy-blocked)", "float32": "available (cupy-blocked, no TF32)"}
    if cc >= 80:
        caps["bfloat16"] = caps["float16"] = f"available (tensor cores, {name} >= sm_80)"
    else:
        caps["bfloat16"] = f"unavailable on fused kernels: {name} < sm_80 (no bf16 mma.sync); cupy-blocked only"
        caps["float16"] = "available (cupy-blocked; fused kernels need sm_80)"
    if cc == 90:
        caps[FP8] = "available (wgmma e4m3 tensor cores, sm_90a kernel attention_fwd_fp8_sm90)"
    elif cc >= 89:
        caps[FP8] = (f"unavailable: {name} has e4m3 tensor cores but our fp8 kernel uses Hopper wgmma "
                     "(sm_90a only)")
    else:
        caps[FP8] = f"unavailable: {name} has no fp8 tensor cores (sm_89/sm_90 and newer)"
    return caps


def round_e4m3(x: Any) -> Any:
    """x (float32, NumPy or CuPy) rounded to the nearest e4m3 value (ties to even), saturating at ±448:
    cvt.rn.satfinite.e4m3x2.f32. NaN stays NaN."""
    xp = namespace(library_name(x))
    x = x.astype(xp.float32)
    a = xp.minimum(xp.abs(x), xp.float32(E4M3_MAX))
    _, exponent = xp.frexp(a)  # a = m·2^exponent, m ∈ [0.5, 1): leading bit 2^(exponent − 1)
    # 3 mantissa bits below the leading one; subnormals (below 2^-6) share the quantum 2^-9.
    quantum = xp.ldexp(xp.ones_like(a), xp.maximum(exponent - 4, -9).astype(xp.int32))
    return xp.copysign(xp.minimum(xp.rint(a / quantum) * quantum, xp.float32(E4M3_MAX)), x).astype(xp.float32)


def e4m3_values() -> np.ndarray:
    """float32 value of every e4m3 byte (0x7f, 0xff: NaN), to decode the kernels' uint8 tensors."""
    byte = np.arange(256)
    sign = np.where(byte & 0x80, -1.0, 1.0)
    exponent, mantissa = (byte >> 3) & 0xF, byte & 7
    value = np.where(exponent == 0, mantissa / 8 * 2.0**-6, (1 + mantissa / 8) * 2.0 ** (exponent - 7.0))
    value = np.where((byte & 0x7F) == 0x7F, np.nan, value)
    return (sign * value).astype(np.float32)


@dataclass(frozen=True)
class Quantised:
    """Quantised inputs as float32 arrays on the e4m3 grid (NumPy or CuPy), logical key order, scales expanded.

    q [B, Hq, M, D] for the query rows `rows` with q_scale [B, Hq, M]; k [B, Hkv, Sk, D] (mean-smoothed) with
    k_scale [B, Hkv, Sk]; v [B, Hkv, Sk, D] (mean-smoothed) with v_scale [B, Hkv, D]. value ≈ grid value · scale.
    row_bias [B, Hq, M] = q·k̄ (the K shift), added (times scale) to lse; v_mean [B, Hkv, D], added to the output.
    """

    rows: Any
    row_bias: Any
    q: Any
    q_scale: Any
    k: Any
    k_scale: Any
    v: Any
    v_scale: Any
    v_mean: Any


def _block_quantise(x: Any, block: int, xp: Any) -> tuple[Any, Any]:
    """x [B, H, S, D] float32 → (grid values, per-row scale [B, H, S]) with one scale per `block` rows."""
    b, h, s, d = x.shape
    pad = -(-s // block) * block - s
    blocks = xp.concatenate([x, xp.zeros((b, h, pad, d), xp.float32)], axis=2).reshape(b, h, -1, block, d)
    amax = xp.abs(blocks).max(axis=(3, 4), keepdims=True)
    inv, scale = _scales(amax, xp)
    values = round_e4m3(blocks * inv).reshape(b, h, -1, d)[:, :, :s]
    return values, xp.repeat(scale[..., 0, 0], block, axis=2)[:, :, :s]


def _scales(amax: Any, xp: Any) -> tuple[Any, Any]:
    """(448 / amax, amax / 448) in float32, both 1 where amax = 0 (an all-zero block)."""
    positive = amax > 0
    safe = xp.where(positive, amax, xp.float32(1)).astype(xp.float32)
    inv = xp.where(positive, xp.float32(E4M3_MAX) / safe, xp.float32(1)).astype(xp.float32)
    return inv, xp.where(positive, safe / xp.float32(E4M3_MAX), xp.float32(1)).astype(xp.float32)


def hadamard(dim: int) -> np.ndarray:
    """The Sylvester Hadamard matrix of order `dim` divided by sqrt(dim): orthogonal. Raises ValueError unless
    `dim` is a power of two."""
    from scipy.linalg import hadamard as sylvester

    if dim < 1 or dim & (dim - 1):
        raise ValueError(f"hadamard: dim must be a power of two, got {dim}")
    return (sylvester(dim) / np.sqrt(dim)).astype(np.float32)


def quantise(problem: AttentionProblem, q: Any, k: Any, v: Any, rotate: bool = True) -> Quantised:
    """The kernels' quantisation (quantize_fp8.cu) in NumPy/CuPy float32: same scales, same roundings (the
    K mean and the rotation may differ in their last bits: the kernel sums in another order). `rotate`: Q and K
    multiplied by `hadamard(D)`, as the kernels do by default; skipped where D is not a power of two (no kernel
    runs those head dims, only this emulation)."""
    xp = namespace(problem.library)
    qf, kf, vf = (xp.asarray(x).astype(xp.float32) for x in (q, k, v))
    sampled = kf[:, :, ::K_MEAN_STRIDE]
    mean = sampled.sum(axis=2, keepdims=True) / xp.float32(max(sampled.shape[2], 1))
    kf = kf - mean
    row_bias = (qf @ xp.repeat(mean, problem.group_size, axis=1).swapaxes(-1, -2))[..., 0]
    d = problem.head_dim
    if rotate and d & (d - 1) == 0:
        rotation = xp.asarray(hadamard(d))
        qf, kf = qf @ rotation, kf @ rotation
    q_values, q_scale = _block_quantise(qf, FP8_BLOCK_M, xp)
    k_values, k_scale = _block_quantise(kf, fp8_k_block(problem.head_dim, problem.causal), xp)
    v_mean = vf.sum(axis=2) / xp.float32(max(problem.seqlen_k, 1))
    vf = vf - v_mean[:, :, None, :]
    inv, v_scale = _scales(xp.abs(vf).max(axis=2) if problem.seqlen_k else xp.zeros_like(v_mean), xp)
    v_values = round_e4m3(vf * inv[:, :, None, :])
    return Quantised(xp.arange(problem.seqlen_q), row_bias, q_values, q_scale, k_values, k_scale, v_values, v_scale,
                     v_mean)


def decode(problem: AttentionProblem, tensors: Any, rows: Any) -> Quantised:
    """`Quantised` view of the GPU kernels' `cuda_fp8.Fp8Tensors` (bytes decoded in float32 on the device),
    for the query rows `rows` only."""
    import cupy

    from .cuda_fp8 import key_positions

    # on_device: cached device copies, so that the guard makes no host-to-device copy (each would wait for the
    # stream) once a shape has been seen.
    table = on_device(cupy, e4m3_values())
    rows = on_device(cupy, rows)
    sk = problem.seqlen_k
    q = cupy.take(table, tensors.qq[:, :, rows])
    q_scale = tensors.sq[:, :, rows // FP8_BLOCK_M]
    k = cupy.take(table, tensors.kq[:, :, :sk])
    k_block = tensors.kq.shape[2] // tensors.sk.shape[2]  # keys per K scale, as these tensors were made
    k_scale = cupy.repeat(tensors.sk, k_block, axis=2)[:, :, :sk]
    vt = tensors.vt.transpose(0, 1, 3, 2, 4)  # [B, Hkv, chunks, D, 32] -> [B, Hkv, D, Sk']
    vt = vt.reshape(*vt.shape[:3], vt.shape[3] * vt.shape[4])
    v = cupy.take(table, vt[..., on_device(cupy, key_positions(sk))]).transpose(0, 1, 3, 2)
    return Quantised(rows, tensors.row_bias[:, :, rows], q, q_scale, k, k_scale, v, tensors.sv, tensors.v_mean)


def attend_fp8(problem: AttentionProblem, quant: Quantised, heads: list[int], *, online: bool) -> tuple[Any, Any]:
    """fp8 attention of the rows `quant.rows` for query heads `heads`: (out [B, n, M, D], lse [B, n, M]) float32.

    online=True follows the kernel step by step (key tiles of BLOCK_N, last to first, P rounded against the
    lazily moved reference max); online=False rounds P against the exact row max in one pass (the guard's cheap
    variant): P ≤ 2^P_SHIFT ≈ 56 there, the kernel's narrowest range for small P, so its estimate is the
    conservative end of what the kernel does.
    """
    xp = namespace(library_name(quant.q))
    heads_kv = [h // problem.group_size for h in heads]
    q, q_scale = quant.q[:, heads], quant.q_scale[:, heads]
    k, k_scale, v = quant.k[:, heads_kv], quant.k_scale[:, heads_kv], quant.v[:, heads_kv]
    rows = xp.asarray(quant.rows)
    row_factor = (xp.float32(problem.scale * LOG2E) * q_scale)[..., None]  # [B, n, M, 1]
    shape = q.shape[:3]
    row_max = xp.full(shape, -xp.inf, dtype=xp.float32)
    row_sum = xp.zeros(shape, dtype=xp.float32)
    acc = xp.zeros((*shape, problem.head_dim), dtype=xp.float32)
    tile = fp8_key_tile(problem.head_dim, problem.causal) if online else max(problem.seqlen_k, 1)
    for start in reversed(range(0, problem.seqlen_k, tile)):
        keys = xp.arange(start, min(start + tile, problem.seqlen_k))
        raw = q @ k[:, :, start : start + tile].swapaxes(-1, -2)
        factor = row_factor * k_scale[:, :, None, start : start + tile]
        if problem.causal:
            raw = xp.where(problem.visible(rows, keys), raw, -xp.inf)
        x = raw * factor
        tile_max = x.max(axis=-1)
        moved = tile_max > row_max + xp.float32(RESCALE_LOG2)
        corr = xp.exp2(xp.where(moved, row_max, 0) - xp.where(moved, tile_max, 0))  # 1 where m stays
        row_max = xp.where(moved, tile_max, row_max)
        safe = xp.where(xp.isneginf(row_max), xp.float32(0), row_max)
        p = xp.exp2(x - (safe - xp.float32(P_SHIFT))[..., None])
        row_sum = row_sum * corr + p.sum(axis=-1)
        acc = acc * corr[..., None] + round_e4m3(p) @ v[:, :, start : start + tile]
    seen = row_sum > 0
    norm = xp.where(seen, 1 / xp.where(seen, row_sum, 1), 0).astype(xp.float32)
    out = (acc * norm[..., None] * quant.v_scale[:, heads_kv][:, :, None, :]
           + xp.where(seen, xp.float32(1), xp.float32(0))[..., None] * quant.v_mean[:, heads_kv][:, :, None, :])
    bias = xp.float32(problem.scale * LOG2E) * quant.row_bias[:, heads]
    log_sum = xp.log2(xp.where(seen, row_sum, 1)) - xp.float32(P_SHIFT)
    lse = xp.where(seen, (row_max + log_sum + bias) / xp.float32(LOG2E), -xp.inf)
    return out.astype(xp.float32), lse.astype(xp.float32)


def round_to_dtype(x: Any, dtype: str) -> Any:
    """float32 x (NumPy or CuPy) rounded to `dtype` ("bfloat16": nearest even on the top 16 bits, as the
    kernels' pack2 does; "float16"; anything else: unchanged) and returned as float32."""
    xp = namespace(library_name(x))
    x = xp.ascontiguousarray(x, dtype=xp.float32)
    if dtype == "float16":
        return x.astype(xp.float16).astype(xp.float32)
    if dtype != "bfloat16":
        return x
    bits = x.view(xp.uint32)
    rounded = (bits + xp.uint32(0x7FFF) + ((bits >> xp.uint32(16)) & xp.uint32(1))) & xp.uint32(0xFFFF0000)
    return xp.where(xp.isfinite(x), rounded.view(xp.float32), x)


def emulate_forward(problem: AttentionProblem, q: Any, k: Any, v: Any, out: Any, lse: Any, heads: list[int],
                    artifacts: dict[str, Any] | None = None) -> None:
    """NumPy emulation of the fp8 forward (`attend_fp8` online, the kernel's order) for query heads `heads`.

    q, k, v: [B, H, S, D] NumPy views (any float dtype); out [B, Hq, Sq, D] view (written in its dtype) and
    lse [B, Hq, Sq] (float32; float64 for float64 inputs) for the heads in `heads`; other heads untouched.
    `artifacts["fp8_emulated"]` (a full-row `Quantised` left by the policy) is reused when present.
    """
    if not heads:
        return
    quant = (artifacts or {}).get("fp8_emulated")
    if not isinstance(quant, Quantised):
        quant = quantise(problem, q, k, v)
    result, result_lse = attend_fp8(problem, quant, heads, online=True)
    out[:, heads] = result.astype(out.dtype)
    lse[:, heads] = result_lse


def exact_rows(problem: AttentionProblem, q: Any, k: Any, v: Any, rows: Any, heads: list[int]) -> Any:
    """Attention of query rows `rows` for heads `heads` in float32 from the inputs: [B, n, M, D]."""
    xp = namespace(problem.library)
    rows = xp.asarray(rows)
    heads_kv = [h // problem.group_size for h in heads]
    qr = q[:, heads][:, :, rows].astype(xp.float32)
    kk, vv = k[:, heads_kv].astype(xp.float32), v[:, heads_kv].astype(xp.float32)
    scores = (qr @ kk.swapaxes(-1, -2)) * problem.scale
    probs, _ = masked_softmax(xp, scores, problem.visible(rows, xp.arange(problem.seqlen_k)), with_lse=False)
    return probs @ vv


def sample_rows(problem: AttentionProblem, count: int) -> np.ndarray:
    """Query rows for the guard: max(count − 8, 1) evenly spaced rows plus the last 8 (causal: they see the most
    keys), sorted without repeats (so at most count + 1 rows, fewer for short Sq)."""
    sq = problem.seqlen_q
    spaced = np.linspace(0, sq - 1, max(count - 8, 1)).round().astype(np.int64)
    return np.unique(np.concatenate([spaced, np.arange(max(sq - 8, 0), sq)]))


def head_statistics(problem: AttentionProblem, q: Any, k: Any, v: Any) -> dict[int, dict[str, float]]:
    """Per query head: crest factors max|x|/rms(x) of q and of k and v mean-smoothed over tokens, as they are
    quantised (per-block scaling keeps a crest below ~100 well inside e4m3's range), and the fraction of entries
    beyond 6 rms (outliers)."""
    xp = namespace(problem.library)
    stats = {}
    per_tensor = []
    for x, smooth in ((q, False), (k, True), (v, True)):
        xf = x.astype(xp.float32)
        if smooth:
            xf = xf - xf.mean(axis=2, keepdims=True)
        rms = xp.sqrt((xf * xf).mean(axis=(0, 2, 3)))
        amax = xp.abs(xf).max(axis=(0, 2, 3))
        outliers = (xp.abs(xf) > 6 * rms[None, :, None, None]).mean(axis=(0, 2, 3))
        per_tensor.append(tuple(map(to_host, (amax / xp.where(rms > 0, rms, 1), outliers))))
    (q_crest, q_out), (k_crest, k_out), (v_crest, v_out) = per_tensor
    for h in range(problem.heads_q):
        hk = h // problem.group_size
        stats[h] = {"q_crest": float(q_crest[h]), "k_crest": float(k_crest[hk]), "v_crest": float(v_crest[hk]),
                    "outlier_fraction": float(max(q_out[h], k_out[hk], v_out[hk]))}
    return stats


def fp8_unsupported_reason(problem: AttentionProblem, emulate: bool) -> str | None:
    """Why no fp8 path runs `problem` here (None: the sm_90 kernel, or the NumPy emulation when `emulate`)."""
    if problem.library == "numpy":
        return None if emulate else "CPU (NumPy): no fp8 hardware; PrecisionPolicy(..., emulate=True) emulates it"
    from .cuda_fp8 import unsupported_reason

    return unsupported_reason(problem)


class PrecisionPolicy(Policy):
    """Per-head choice between fp8 (e4m3) and the input's 16-bit precision under an estimated-error guard.

    preset: "quality", "balanced", "speed" or "fp8" (see the module docstring); tolerance overrides the
    preset's. overrides: {query head: "float8_e4m3" or the input dtype} forced regardless of the guard.
    sample_rows: query rows per head the guard computes twice. emulate: allow fp8 on NumPy inputs through
    the emulation (otherwise the CPU keeps the input precision, except under "fp8").

    Fills `report.estimates["precision"]` with the preset, tolerance, fp8 availability and, per head, the
    chosen precision, the estimated relative L2 error (None when not estimated) and statistics. Leaves the
    quantised tensors in `Plan.artifacts` ("fp8": GPU bytes, "fp8_emulated": NumPy) for the backend.
    Raises ValueError for an unknown preset or override, or fp8 forced where no fp8 path exists.
    """

    def __init__(self, preset: str = "balanced", *, overrides: dict[int, str] | None = None,
                 sample_rows: int = 64, emulate: bool = False, tolerance: float | None = None) -> None:
        if preset not in PRESETS:
            raise ValueError(f"PrecisionPolicy: preset must be one of {sorted(PRESETS)}, got {preset!r}")
        check_number("PrecisionPolicy", "sample_rows", sample_rows, int)
        if sample_rows < 1:
            raise ValueError(f"PrecisionPolicy: sample_rows must be >= 1, got {sample_rows}")
        if tolerance is not None:
            check_number("PrecisionPolicy", "tolerance", tolerance, float)
            if tolerance <= 0:
                raise ValueError(f"PrecisionPolicy: tolerance must be > 0, got {tolerance!r}")
        if overrides is not None and not isinstance(overrides, dict):
            raise TypeError(f"PrecisionPolicy: overrides must be a dict {{query head: precision}}, got {overrides!r}")
        for head, precision in (overrides or {}).items():
            check_number("PrecisionPolicy", "overrides key", head, int)
            if not isinstance(precision, str):
                raise TypeError(f"PrecisionPolicy: overrides[{head}] must be a precision name, got {precision!r}")
        check_flag("PrecisionPolicy: emulate", emulate)
        self.name = preset
        self.preset = preset
        self.tolerance = PRESETS[preset] if tolerance is None else float(tolerance)
        self.overrides = dict(overrides or {})
        self.sample_rows = sample_rows
        self.emulate = emulate

    def __repr__(self) -> str:
        return f"PrecisionPolicy({self.preset!r}, overrides={self.overrides}, tolerance={self.tolerance})"

    def for_gradients(self) -> PrecisionPolicy:
        """Every head at the input precision: the fp8 forward has no backward of its own, and the exact
        backward recomputing P from an fp8 forward's lse would not match it."""
        return PrecisionPolicy("quality", sample_rows=self.sample_rows, emulate=self.emulate)

    def plan(self, problem: AttentionProblem, q: Any, k: Any, v: Any, report: Report | None) -> Plan:
        hq, native = problem.heads_q, problem.dtype
        for head, precision in self.overrides.items():
            if not 0 <= head < hq:
                raise ValueError(f"PrecisionPolicy: overrides key must be a query head in [0, {hq}), got {head}")
            if precision not in (FP8, native):
                raise ValueError(f"PrecisionPolicy: override for head {head} must be {FP8!r} or the input dtype "
                                 f"{native!r}, got {precision!r}")
        if problem.seqlen_k == 0:
            # No keys: out = 0 and lse = -inf at any precision, which the dense path writes; nothing to quantise
            # (on the GPU the fp8 kernel does not take Sk = 0, so asking for fp8 here is not an error).
            reason, forced = "Sk = 0 (no keys to quantise)", []
        else:
            reason = fp8_unsupported_reason(problem, self.emulate or self.preset == "fp8")
            forced = [h for h, p in self.overrides.items() if p == FP8]
            if reason is not None and (forced or self.preset == "fp8"):
                asked = (f"the preset {self.preset!r}" if self.preset == "fp8"
                         else f"overrides for heads {sorted(forced)}")
                raise ValueError(f"PrecisionPolicy: fp8 requested by {asked} but unavailable: {reason}")
        chosen = {h: native for h in range(hq)}
        candidates = [h for h in range(hq) if h not in self.overrides]
        guarded = candidates if self.tolerance is not None and reason is None and not problem.is_empty else []
        fp8_heads = sorted(set(forced) | set(guarded))

        artifacts: dict[str, Any] = {}
        estimates: dict[int, float | None] = {}
        stats: dict[int, dict[str, float]] = {}
        if fp8_heads:
            artifacts = self._quantise(problem, q, k, v, fp8_heads)
            estimate_heads = guarded if (self.tolerance != math.inf or report is not None) else []
            if estimate_heads:
                estimates = self._estimate(problem, q, k, v, artifacts, estimate_heads)
                stats = head_statistics(problem, q, k, v) if report is not None else {}
        for h in guarded:
            if self.tolerance == math.inf or GUARD_MARGIN * estimates[h] <= self.tolerance:
                chosen[h] = FP8
        for h in forced:
            chosen[h] = FP8

        if report is not None:
            report.estimates["precision"] = {
                "preset": self.preset,
                "tolerance": self.tolerance,
                "fp8": "available" if reason is None else f"unavailable: {reason}",
                "heads": {h: {"precision": chosen[h], "estimated_error": estimates.get(h),
                              "overridden": h in self.overrides, **stats.get(h, {})} for h in range(hq)},
            }
        heads = tuple(HeadPlan(path="dense", precision=chosen[h]) for h in range(hq))
        return Plan(heads=heads, artifacts=artifacts)

    def _quantise(self, problem: AttentionProblem, q: Any, k: Any, v: Any, heads: list[int]) -> dict[str, Any]:
        """The quantised inputs as plan artifacts: the kernels' bytes on the GPU ("fp8"), the emulation's
        values on NumPy ("fp8_emulated")."""
        if problem.library == "numpy":
            return {"fp8_emulated": quantise(problem, q, k, v)}
        from .cuda_fp8 import quantize

        return {"fp8": quantize(problem, q, k, v, heads)}

    def _estimate(self, problem: AttentionProblem, q: Any, k: Any, v: Any, artifacts: dict[str, Any],
                  heads: list[int]) -> dict[int, float]:
        """Relative L2 error of the fp8 emulation (of the same quantised tensors) vs float32 on the sampled
        rows, per head."""
        rows = sample_rows(problem, self.sample_rows)
        if "fp8" in artifacts:
            quant = decode(problem, artifacts["fp8"], rows)
        else:
            full = artifacts["fp8_emulated"]
            quant = dataclasses.replace(full, rows=rows, row_bias=full.row_bias[:, :, rows], q=full.q[:, :, rows],
                                        q_scale=full.q_scale[:, :, rows])
        # All heads at once, in chunks that keep the [B, heads, rows, Sk] scores under ~256 MB.
        chunk = max(1, (1 << 26) // max(1, problem.batch * len(rows) * problem.seqlen_k))
        errors = {}
        for start in range(0, len(heads), chunk):
            group = heads[start : start + chunk]
            approx, _ = attend_fp8(problem, quant, group, online=False)
            approx = round_to_dtype(approx, problem.dtype)
            exact = exact_rows(problem, q, k, v, quant.rows, group)  # quant.rows: already on the device
            errors.update(zip(group, map(float, to_host(rel_l2_per_head(approx, exact)))))
        return errors


POLICIES.update({name: PrecisionPolicy(name) for name in PRESETS})
