"""The public entry points: `attention` and `attention_backward`."""

from __future__ import annotations

import time
from typing import Any

from . import backends
from ._arrays import lse_dtype, namespace, on_inputs_device
from .policy import Policy, check_plan, resolve_policy
from .problem import check_flag, check_outputs, describe, describe_backward, to_bhsd
from .reference import head_errors
from .report import Report


@on_inputs_device
def attention(
    q: Any,
    k: Any,
    v: Any,
    *,
    causal: bool = False,
    scale: float | None = None,
    layout: str = "bhsd",
    policy: str | Policy = "exact",
    return_lse: bool = False,
    out: Any | None = None,
    lse_out: Any | None = None,
    report: Report | None = None,
) -> Any:
    """Scaled dot-product attention.

    Computes, for every batch b, query head h and query row i::

        out[b, h, i] = Σ_j softmax_j(scale · q[b, h, i] · k[b, h // G, j]) · v[b, h // G, j]
        lse[b, h, i] = log Σ_j exp(scale · q[b, h, i] · k[b, h // G, j])      (natural log)

    where G = Hq / Hkv (grouped-query / multi-query attention when Hkv < Hq) and, with ``causal=True``,
    key j is visible to query i only if j <= i + (Sk − Sq) (bottom-right alignment, as flash-attn >= 2.1).
    Rows that see no key (causal with Sq > Sk, or Sk = 0) give out = 0 and lse = −inf.

    CuPy inputs are computed on their own GPU, which is CuPy's current device for the duration of the call (so
    the work runs on that device's current stream and the outputs are allocated there), whichever device was
    current before.

    Args:
        q: [B, Hq, Sq, D] ("bhsd") or [B, Sq, Hq, D] ("bshd"); NumPy (CPU backend) or CuPy (GPU).
        k, v: [B, Hkv, Sk, D] or [B, Sk, Hkv, D], same library, dtype and device as q; Hq % Hkv == 0.
            Any strides are accepted; an input the fused kernels cannot read in place (innermost stride ≠ 1,
            other strides not multiples of 8 elements, base not 16-byte aligned; on the TMA-loading Hopper
            kernels also a broadcast or reversed dimension) is copied once, as a whole.
        causal: apply the bottom-right causal mask.
        scale: multiplier of q·k, default 1/sqrt(D); must be finite.
        layout: "bhsd" (torch SDPA order) or "bshd" (flash-attn order), for inputs and outputs alike.
        policy: a preset name or a `Policy` instance. "exact" (default): every head dense at the input
            precision, no estimation. "quality", "balanced", "speed", "fp8": `PrecisionPolicy` (fp8 per head under
            an error guard; on NumPy inputs only "fp8" emulates it). "lowrank", "adaptive": `RankPolicy` (dense or
            low-rank per head under an error guard; "adaptive" adds "balanced" precision for dense heads).
        return_lse: also return lse.
        out: optional preallocated output (shape and dtype of the result, same library and device, writable,
            sharing no memory with q, k or v); every element is written.
        lse_out: optional preallocated lse, C-contiguous [B, Hq, Sq] of the lse dtype (same library and
            device); every element is written. Adapters pass buffers their framework allocated.
        report: optional `Report` to fill with the backend, the per-head plan and host timings (cleared first,
            so a reused report describes this call only).

    Returns:
        out with q's dtype and the caller's layout; with ``return_lse`` the pair (out, lse), lse of shape
        [B, Hq, Sq] in float32 (float64 for float64 inputs).

    Dtypes: float16 and bfloat16 (computed with float32 accumulation), float32, float64.
    Zero-size inputs: B, Hq or Sq = 0 give empty outputs; Sk = 0 gives out = 0 and lse = −inf; D = 0 is
    an error.

    Raises:
        TypeError: inputs are not NumPy/CuPy arrays, mix libraries, have unsupported or differing dtypes,
            or an option has the wrong type.
        ValueError: wrong rank, mismatched batch/heads/sequence/head dims, Hq not a multiple of Hkv,
            D = 0, unknown layout or policy, non-finite scale (or one past float32's range for inputs that
            compute in float32), inputs on different GPUs, an `out` / `lse_out` of the wrong shape, read-only or
            sharing memory with the inputs (or a non-contiguous `lse_out`), or a policy whose plan does not
            cover every query head with a known path (dense heads at the input dtype or fp8).
    """
    started = time.perf_counter()
    problem = describe(q, k, v, causal=causal, scale=scale, layout=layout)
    chosen = resolve_policy(policy)
    check_flag("return_lse", return_lse)
    if report is not None:
        if not isinstance(report, Report):
            raise TypeError(f"report must be a Report instance or None, got {report!r}")
        report.begin()
    check_outputs(problem, q, k, v, out, lse_out)  # before allocating: fresh buffers overlap nothing
    xp = namespace(problem.library)
    out = xp.empty(problem.output_shape(), dtype=q.dtype) if out is None else out
    lse = xp.empty(problem.lse_shape(), dtype=lse_dtype(problem.dtype)) if lse_out is None else lse_out

    qb, kb, vb, ob = (to_bhsd(x, layout) for x in (q, k, v, out))
    planned = time.perf_counter()
    plan = check_plan(chosen.plan(problem, qb, kb, vb, report), problem, chosen)
    if problem.is_empty:
        backend = backends.forward_backend(problem)
    else:
        backend = backends.forward(problem, plan, qb, kb, vb, ob, lse)
        if report is not None and report.measure_error:
            report.measured["error"] = head_errors(qb, kb, vb, ob, causal=problem.causal, scale=problem.scale)
    if report is not None:
        report.backend = backend
        report.device = backends.device_name(problem)
        report.policy = chosen.name
        report.plan = plan
        report.timings_ms["validate"] = (planned - started) * 1e3
        report.timings_ms["plan"] = (time.perf_counter() - planned) * 1e3
    return (out, lse) if return_lse else out


@on_inputs_device
def attention_backward(
    dout: Any,
    q: Any,
    k: Any,
    v: Any,
    out: Any,
    lse: Any,
    *,
    causal: bool = False,
    scale: float | None = None,
    layout: str = "bhsd",
    deterministic: bool = False,
) -> tuple[Any, Any, Any]:
    """Gradients of `attention` with respect to q, k and v.

    With P = softmax(scale · Q Kᵀ) recomputed from ``lse`` (no S×S buffer is stored)::

        δ = rowsum(dout ∘ out),  dV = Pᵀ dout,  dS = P ∘ (dout Vᵀ − δ),  dQ = scale · dS K,  dK = scale · dSᵀ Q

    dK and dV are summed over the G = Hq / Hkv query heads that share each key/value head.

    Args:
        dout: gradient of the output, shape and dtype of ``out``.
        q, k, v, causal, scale, layout: exactly as passed to the forward call.
        out, lse: the forward's outputs (``return_lse=True``); lse float32 (float64 for float64 inputs).
        deterministic: bitwise-reproducible gradients on the GPU (the fused backward then computes dq in
            a separate pass instead of with fp32 atomics; ~1.4× the tensor work). CPU results are always
            reproducible.

    CuPy inputs are computed on q's GPU, CuPy's current device for the duration of the call, as in `attention`.

    Memory: no S×S buffer. The fused GPU backward allocates one float32 workspace of
    2·B·Hq·Sq' (+ B·Hq·Sq'·D unless deterministic) elements, Sq' = Sq rounded up to 128.

    Returns:
        (dq, dk, dv) with the shapes, layout and dtype of (q, k, v). Fully masked query rows get dq = 0.

    Raises:
        TypeError / ValueError: as `attention`, plus dout/out/lse of the wrong library, shape or dtype.
    """
    problem = describe_backward(
        dout, q, k, v, out, lse, causal=causal, scale=scale, layout=layout, deterministic=deterministic
    )
    xp = namespace(problem.library)
    dq = xp.empty(q.shape, dtype=q.dtype)
    dk = xp.empty(k.shape, dtype=k.dtype)
    dv = xp.empty(v.shape, dtype=v.dtype)
    if problem.is_empty:
        dk[...] = 0
        dv[...] = 0
        return dq, dk, dv
    views = (to_bhsd(x, layout) for x in (dout, q, k, v, out))
    grads = (to_bhsd(x, layout) for x in (dq, dk, dv))
    backends.backward(problem, *views, lse, *grads, deterministic=deterministic)
    return dq, dk, dv
