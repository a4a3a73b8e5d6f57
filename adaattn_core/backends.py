"""Backend dispatch: which implementation computes a validated problem.

- "cpu": the blocked flash-style algorithm (`blocked.py`) on NumPy arrays.
- "cupy-blocked": the same algorithm on CuPy arrays, for what no fused kernel covers yet.
- "cuda": fused kernels from cuda_src/ (added as they land).
"""

from __future__ import annotations

from typing import Any

from . import blocked
from .policy import Plan
from .problem import AttentionProblem


def name_for(problem: AttentionProblem) -> str:
    """The backend that computes `problem`."""
    return "cpu" if problem.library == "numpy" else "cupy-blocked"


def device_name(problem: AttentionProblem) -> str:
    if problem.library == "numpy":
        return "cpu"
    from .device import gpu_name

    return gpu_name()


def forward(
    problem: AttentionProblem, plan: Plan, q: Any, k: Any, v: Any, out: Any, lse: Any
) -> str:
    """Compute the forward pass into `out`/`lse` ([B,H,S,D] views) and return the backend's name."""
    blocked.forward(problem, q, k, v, out, lse)
    return name_for(problem)


def backward(
    problem: AttentionProblem,
    dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any,
    dq: Any, dk: Any, dv: Any,
) -> str:
    """Compute dq, dk, dv into [B,H,S,D] views and return the backend's name."""
    blocked.backward(problem, dout, q, k, v, out, lse, dq, dk, dv)
    return name_for(problem)
