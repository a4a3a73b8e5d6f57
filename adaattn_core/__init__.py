"""AdaAttn core: framework-neutral attention on NumPy (CPU) and CuPy (GPU) arrays.

    from adaattn_core import attention
    out = attention(q, k, v, causal=True)               # q, k, v: [B, H, S, D]

Importing this package never imports CuPy, torch or jax.
"""

from .api import attention, attention_backward
from .device import Capabilities, capabilities
from .policy import POLICIES, HeadPlan, Plan, Policy, resolve_policy
from .precision import PrecisionPolicy, precision_capabilities  # registers "quality", "balanced", "speed", "fp8"
from .problem import AttentionProblem
from .rank_policy import RankPolicy  # registers "lowrank"
from .reference import attention_backward_reference, attention_reference
from .report import Report

__version__ = "0.1.0"

__all__ = [
    "POLICIES",
    "AttentionProblem",
    "Capabilities",
    "HeadPlan",
    "Plan",
    "Policy",
    "PrecisionPolicy",
    "RankPolicy",
    "Report",
    "__version__",
    "attention",
    "attention_backward",
    "attention_backward_reference",
    "attention_reference",
    "capabilities",
    "precision_capabilities",
    "resolve_policy",
]
