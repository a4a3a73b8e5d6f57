"""Backend dispatch: which implementation computes a validated problem.

- "cpu": the blocked flash-style algorithm (`blocked.py`) on NumPy arrays.
- "cupy-blocked": the same algorithm on CuPy arrays, for what no fused kernel covers yet.
- "cuda": fused kernels from cuda_src/: forward and backward for float16/bfloat16 and the head dims of
  `launch_config` (the wgmma forward on Hopper, mma.sync elsewhere). float32 on the GPU runs
  cupy-blocked (cuBLAS in float32, no TF32), so float32 keeps float32 accuracy; other head dims also
  run cupy-blocked.
"""

from __future__ import annotations

from typing import Any

from . import blocked
from .policy import Plan
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
    """Compute the forward pass into `out`/`lse` ([B,H,S,D] views) and return the backend's name.

    `plan` carries the policy's per-head decisions; with the "exact" policy (the only one so far) every head
    is dense at the input precision, so one launch covers all heads.
    """
    backend = forward_backend(problem)
    if backend == "cuda":
        _cuda_forward().forward(problem, q, k, v, out, lse)
    else:
        blocked.forward(problem, q, k, v, out, lse)
    return backend


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
