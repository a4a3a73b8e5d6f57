"""Policies: how each head of an attention call is computed.

A policy turns an `AttentionProblem` (and, for adaptive policies, the inputs themselves) into a `Plan`:
per query head a `HeadPlan` naming the path ("dense" or "lowrank" with a rank) and the precision.
Backends launch one kernel per kind of head (`Plan.by_kind`: low-rank heads of every rank together, dense heads
per precision).

"exact" runs every head dense at the input precision with no estimation, so it adds no work. The adaptive
policies (precision presets in `precision.py`, "lowrank" in `rank_policy.py`) register themselves in
`POLICIES`; user-defined policies subclass `Policy`.
"""

from __future__ import annotations

import math
import numbers
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import TYPE_CHECKING, Any

import numpy as np

from .problem import AttentionProblem

if TYPE_CHECKING:
    from .report import Report

PATHS = ("dense", "lowrank")
#: The precision name of the fp8 path (e4m3 operands, fp32 accumulation); dense heads otherwise run at
#: the input dtype.
FP8 = "float8_e4m3"


def _is_int(value: Any) -> bool:
    """A Python or NumPy integer, not a bool (True is an int to Python)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


@dataclass(frozen=True)
class HeadPlan:
    """How one query head is computed: `path` in PATHS, `precision` a dtype name, `rank` for lowrank."""

    path: str = "dense"
    precision: str = "float32"
    rank: int | None = None

    def __post_init__(self) -> None:
        """Raises ValueError for a path not in PATHS, or a rank that is not a positive integer exactly when the
        path is "lowrank" (a custom policy's plan would otherwise run a head on a path it did not ask for)."""
        if self.path not in PATHS:
            raise ValueError(f"HeadPlan: path must be one of {PATHS}, got {self.path!r}")
        rank_ok = _is_int(self.rank) and self.rank >= 1
        if (self.path == "lowrank") != rank_ok:
            expected = "a positive int" if self.path == "lowrank" else "None"
            raise ValueError(f"HeadPlan: rank of a {self.path} head must be {expected}, got {self.rank!r}")


@dataclass(frozen=True)
class Plan:
    """Per-query-head decisions, `heads[h]` for h in range(Hq).

    `artifacts` holds what the policy computed and the backend reuses (quantised tensors, probe rows,
    landmarks), keyed by the module that consumes it; it takes no part in equality or hashing.
    """

    heads: tuple[HeadPlan, ...]
    artifacts: dict[str, Any] = field(default_factory=dict, compare=False, hash=False, repr=False)

    def __post_init__(self) -> None:
        """Raises TypeError for an entry that is not a HeadPlan (a checked decision)."""
        for index, head in enumerate(self.heads):
            if not isinstance(head, HeadPlan):
                raise TypeError(f"Plan: heads[{index}] must be a HeadPlan, got {type(head).__name__}")

    def groups(self) -> dict[HeadPlan, list[int]]:
        """Head indices per distinct decision, in head order (what reports list; launches go by `by_kind`)."""
        grouped: dict[HeadPlan, list[int]] = {}
        for index, head in enumerate(self.heads):
            grouped.setdefault(head, []).append(index)
        return grouped

    @cached_property
    def by_kind(self) -> dict[str, list[int]]:
        """Head indices per kind of launch, in head order: "lowrank" for low-rank heads, else the precision
        name (FP8 or a dense dtype). Computed once per plan, so the shared exact plans pay it once; read-only."""
        kinds: dict[str, list[int]] = {}
        for index, head in enumerate(self.heads):
            kinds.setdefault("lowrank" if head.path == "lowrank" else head.precision, []).append(index)
        return kinds


class Policy(ABC):
    """Decides a `Plan` for one call. Subclasses set `name` and implement `plan`."""

    name: str = ""

    @abstractmethod
    def plan(self, problem: AttentionProblem, q: Any, k: Any, v: Any, report: Report | None) -> Plan:
        """Return the per-head plan; `q`, `k`, `v` are [B, H, S, D] views, `report` may be filled."""

    def for_gradients(self) -> Policy:
        """The policy for a call whose gradients will be taken. The backward is always the exact one, so a
        policy whose forward approximates returns a variant that keeps every head exact; the default is self."""
        return self

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class ExactPolicy(Policy):
    """Every head dense at the input precision; estimators never run."""

    name = "exact"

    def plan(self, problem: AttentionProblem, q: Any, k: Any, v: Any, report: Report | None) -> Plan:
        return _all_dense(problem.dtype, problem.heads_q)


@lru_cache(maxsize=256)
def _all_dense(dtype: str, heads: int) -> Plan:
    """The exact plan, built once per (dtype, head count): it carries no artifacts, so calls can share it."""
    return Plan(heads=(HeadPlan(path="dense", precision=dtype),) * heads)


def check_number(owner: str, name: str, value: Any, kind: type) -> None:
    """A policy's numeric option: an int (kind=int; not a bool) or a real number that is not NaN (kind=float; inf
    may be meaningful, e.g. the "fp8" preset's tolerance); TypeError or ValueError naming `owner`'s option
    otherwise (range checks are the caller's)."""
    if kind is int and not _is_int(value):
        raise TypeError(f"{owner}: {name} must be an int, got {value!r}")
    if kind is float:
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, numbers.Real):
            raise TypeError(f"{owner}: {name} must be a real number, got {value!r}")
        if math.isnan(value):
            raise ValueError(f"{owner}: {name} must be a number, not NaN, got {value!r}")


def check_plan(plan: Any, problem: AttentionProblem, policy: Policy) -> Plan:
    """`plan` if it is a `Plan` with one entry per query head whose dense heads run at a precision there is a path
    for (the input dtype or FP8; each `HeadPlan` checked its path and rank when it was made); else
    TypeError/ValueError naming the policy, before anything is written (a short plan would leave heads unwritten)."""
    who = f"policy {policy.name or type(policy).__name__!r}"
    if not isinstance(plan, Plan):
        raise TypeError(f"{who}: plan() must return a Plan, got {type(plan).__name__}")
    if len(plan.heads) != problem.heads_q:
        raise ValueError(f"{who}: the plan has {len(plan.heads)} head entries, expected one per query head "
                         f"({problem.heads_q})")
    for kind, indices in plan.by_kind.items():
        if kind not in (problem.dtype, FP8, "lowrank"):
            raise ValueError(f"{who}: head {indices[0]} asks for precision {kind!r} with {problem.dtype} inputs, "
                             f"expected {problem.dtype!r} or {FP8!r}")
    return plan


#: Presets by name. Later policies add themselves here.
POLICIES: dict[str, Policy] = {"exact": ExactPolicy()}


def resolve_policy(policy: str | Policy) -> Policy:
    """The `Policy` for a preset name or a `Policy` instance; raises for anything else."""
    if isinstance(policy, Policy):
        return policy
    if isinstance(policy, str):
        if policy in POLICIES:
            return POLICIES[policy]
        raise ValueError(f"policy must be one of {sorted(POLICIES)} or a Policy instance, got {policy!r}")
    raise TypeError(f"policy must be a str or a Policy instance, got {type(policy).__name__}")
