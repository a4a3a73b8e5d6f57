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


def name_for(problem: AttentionProblem) -> str:
    """The backend that computes the forward of `problem`."""
    if problem.library == "numpy":
        return "cpu"
    from . import cuda_forward

    return "cuda" if cuda_forward.unsupported_reason(problem) is None else "cupy-blocked"


def device_name(problem: AttentionProblem) -> str:
    if problem.library == "numpy":
        return "cpu"
    from .device import gpu_name

    return gpu_name()


def forward(
    problem: AttentionProblem, plan: Plan, q: Any, k: Any, v: Any, out: Any, lse: Any
) -> str:
    """Compute the forward pass into `out`/`lse` ([B,H,S,D] views) and return the backend's name."""
    backend = name_for(problem)
    if backend == "cuda":
        from . import cuda_forward

        cuda_forward.forward(problem, q, k, v, out, lse)
    else:
        blocked.forward(problem, q, k, v, out, lse)
    return backend


def backward_name_for(problem: AttentionProblem) -> str:
    """The backend that computes the backward of `problem`."""
    if problem.library == "numpy":
        return "cpu"
    from . import cuda_backward

    return "cuda" if cuda_backward.unsupported_reason(problem) is None else "cupy-blocked"


def backward(
    problem: AttentionProblem,
    dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any,
    dq: Any, dk: Any, dv: Any,
    *,
    deterministic: bool = False,
) -> str:
    """Compute dq, dk, dv into [B,H,S,D] views and return the backend's name."""
    backend = backward_name_for(problem)
    if backend == "cuda":
        from . import cuda_backward

        cuda_backward.backward(problem, dout, q, k, v, out, lse, dq, dk, dv, deterministic=deterministic)
    else:
        blocked.backward(problem, dout, q, k, v, out, lse, dq, dk, dv)
    return backend
