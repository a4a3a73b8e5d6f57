"""The optional record of what one attention call decided and did.

Pass `report=Report()` to `attention`; the call fills it in. Fields only grow as features land, so code
that reads a report keeps working.
"""

from __future__ import annotations

from dataclasses import MISSING, dataclass, field, fields
from typing import Any

from .policy import Plan


@dataclass
class Report:
    """What an attention call did.

    backend:     "cpu" (blocked NumPy), "cupy-blocked" (the same algorithm on CuPy) or "cuda" (fused kernels)
    device:      "cpu" or the GPU's name
    policy:      the policy's name
    plan:        per-head decisions (path, precision, rank)
    estimates:   per-head statistics the policy computed (empty for "exact"), keyed by policy kind
                 ("precision", "rank")
    measure_error: set True before the call to have adaptive policies also measure each head's error
                 against a float64 recompute (costly: for tests and studies)
    measured:    with measure_error, "error": per query head the relative L2 error of the output against
                 float64 attention over all rows (`reference.head_errors`)
    timings_ms:  host-side wall times of the call's phases (no device synchronisation is added for them)
    """

    backend: str = ""
    device: str = ""
    policy: str = ""
    plan: Plan | None = None
    estimates: dict[str, Any] = field(default_factory=dict)
    measure_error: bool = False
    measured: dict[str, Any] = field(default_factory=dict)
    timings_ms: dict[str, float] = field(default_factory=dict)

    def begin(self) -> None:
        """Clear what a previous call recorded (`attention` calls this first, so a reused report describes only
        the latest call); `measure_error` stays as the caller set it."""
        for item in fields(self):
            if item.name != "measure_error":
                setattr(self, item.name, item.default_factory() if item.default is MISSING else item.default)

    def decisions(self) -> dict[str, list[int]]:
        """Head indices per decision, as readable strings like 'dense/bfloat16'."""
        if self.plan is None:
            return {}
        summary: dict[str, list[int]] = {}
        for head, indices in self.plan.groups().items():
            label = f"{head.path}/{head.precision}" + (f"/r={head.rank}" if head.rank is not None else "")
            summary[label] = indices
        return summary
