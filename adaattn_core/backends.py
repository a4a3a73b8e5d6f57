"""Backend dispatch: which implementation computes a validated problem.

- "cpu": the blocked flash-style algorithm (`blocked.py`) on NumPy arrays.
- "cupy-blocked": the same algorithm on CuPy arrays, for what no fused kernel covers yet.
- "cuda": fused kernels from cuda_src/: forward and backward for float16/bfloat16 and the head dims of
  `launch_config` (the wgmma forward on Hopper, mma.sync elsewhere). float32 on the GPU runs
  cupy-blocked (cuBLAS in float32, no TF32), so float32 keeps float32 accuracy; other head dims also
  run cupy-blocked.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from . import blocked
from ._arrays import namespace
from .policy import FP8, Plan
from .problem import AttentionProblem


def _fused_or_blocked(problem: AttentionProblem, launcher: Any) -> str:
    """"cpu" for NumPy; on CuPy "cuda" when `launcher` (a cuda_* module) takes the problem, else "cupy-blocked"."""
    if problem.library == "numpy":
        return "cpu"
    return "cuda" if launcher().unsupported_reason(problem) is None else "cupy-blocked"


def _cuda_forward() -> Any:
    from . import cuda_forward

    return cuda_forward


def _cuda_backward() -> Any:
    from . import cuda_backward

    return cuda_backward


def forward_backend(problem: AttentionProblem) -> str:
    """The backend that computes the forward of `problem`."""
    return _fused_or_blocked(problem, _cuda_forward)


def backward_backend(problem: AttentionProblem) -> str:
    """The backend that computes the backward of `problem`."""
    return _fused_or_blocked(problem, _cuda_backward)


def device_name(problem: AttentionProblem) -> str:
    if problem.library == "numpy":
        return "cpu"
    from .device import gpu_name

    return gpu_name()


def forward(
    problem: AttentionProblem, plan: Plan, q: Any, k: Any, v: Any, out: Any, lse: Any
) -> str:
    """Compute the forward pass into `out`/`lse` ([B,H,S,D] views) and return the dense backend's name.

    One launch per kind of head in `plan` (checked by `policy.check_plan`): dense heads at the input precision
    through the fused kernel (or the blocked algorithm), fp8 heads through `cuda_fp8` (CPU: the emulation in
    `precision`), low-rank heads through `lowrank` with their ranks. A uniform dense plan launches over all heads.
    """
    backend = forward_backend(problem)
    kinds = plan.by_kind
    assert set(kinds) <= {problem.dtype, FP8, "lowrank"}, "an unchecked plan (policy.check_plan refuses it)"
    dense, fp8, lowrank = (kinds.get(kind) for kind in (problem.dtype, FP8, "lowrank"))
    if dense:
        heads = None if len(dense) == problem.heads_q else dense
        if backend == "cuda":
            _cuda_forward().forward(problem, q, k, v, out, lse, heads)
        elif heads is None:
            blocked.forward(problem, q, k, v, out, lse)
        else:
            _blocked_heads(problem, heads, q, k, v, out, lse)
    if fp8:
        if problem.library == "numpy":
            from .precision import emulate_forward as fp8_forward
        else:
            from .cuda_fp8 import forward as fp8_forward
        fp8_forward(problem, q, k, v, out, lse, fp8, plan.artifacts)
    if lowrank:
        from . import lowrank as lowrank_path

        ranks = [plan.heads[index].rank for index in lowrank]
        lowrank_path.forward(problem, q, k, v, out, lse, lowrank, ranks, plan.artifacts)
    return backend


def _blocked_heads(
    problem: AttentionProblem, heads: list[int], q: Any, k: Any, v: Any, out: Any, lse: Any
) -> None:
    """The blocked forward for the query heads `heads` only: each with its own K/V head, then scattered."""
    kv_heads = [head // problem.group_size for head in heads]
    part = replace(problem, heads_q=len(heads), heads_kv=len(heads))
    xp = namespace(problem.library)
    part_out = xp.empty((problem.batch, len(heads), problem.seqlen_q, problem.head_dim), dtype=out.dtype)
    part_lse = xp.empty((problem.batch, len(heads), problem.seqlen_q), dtype=lse.dtype)
    blocked.forward(part, q[:, heads], k[:, kv_heads], v[:, kv_heads], part_out, part_lse)
    out[:, heads] = part_out
    lse[:, heads] = part_lse


def backward(
    problem: AttentionProblem,
    dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any,
    dq: Any, dk: Any, dv: Any,
    *,
    deterministic: bool = False,
) -> str:
    """Compute dq, dk, dv into [B,H,S,D] views and return the backend's name."""
    backend = backward_backend(problem)
    if backend == "cuda":
        _cuda_backward().backward(problem, dout, q, k, v, out, lse, dq, dk, dv, deterministic=deterministic)
    else:
        blocked.backward(problem, dout, q, k, v, out, lse, dq, dk, dv)
    return backend
