"""The rank policy: per query head, dense or low-rank(r), decided from estimates and guarded by probe rows.

For each call (`RankPolicy.plan`):

1. Too short to pay: when the low-rank path would compute more than `max_cost` · Sk scores per query
   (see `lowrank.Geometry.keys_per_query`), every head is dense and no estimator runs.
2. Probe (`estimators.probe`, Numba CUDA on CuPy): m = `probe_rows` exact query rows per head →
   entropy, top-k mass, column mass. Keys holding >= `sink_share` of the probe rows' mass (at most
   `max_sinks` per head) are sinks: the low-rank path attends to them exactly.
3. Pooled map (`estimators.pooled_map` with blocks of at least `block` tokens, at most MAP_BLOCKS a side;
   `estimators.spectrum`, with `spectral`): stable rank and the rank holding 95% of the energy. This is host
   linear algebra after a device synchronisation (milliseconds on a slow CPU): without it the guard
   starts at the balanced rank, and the report has no spectral entries.
4. Screening: a head whose mean normalised entropy H / log(keys seen) is below `min_entropy` and whose
   mass is not explained by sinks is peaked (retrieval-like): dense.
5. Guard: the other heads start at r = max(balanced rank, energy rank) (clipped to `max_rank`); the
   approximation is evaluated on the probe rows (`lowrank.approximate_rows`) and compared with their
   exact outputs: relative L2 error over the head's rows (all batch entries). Above `tolerance`, r doubles
   (at most `steps` tries, never beyond `max_rank`); a head that never passes stays dense.

Dense heads take the plan of the `then` policy (default "exact"), so this composes with a precision policy.
Low-rank heads get HeadPlan(path="lowrank", precision=<compute dtype>, rank=r); the plan's artifacts carry
``"sinks"``: {query head: key indices} for `lowrank.forward`, and ``"prepared"``: the guard's padded keys and
landmarks (`lowrank.Prepared`) when they cover exactly the low-rank heads, so the forward does not redo them.

Gradients: the low-rank path has no backward of its own, and the exact backward of the dense softmax is not
the gradient of the approximation. So when gradients will be taken the policy plans every head dense:
callers (the framework adapters) use `RankPolicy.for_gradients()`, which returns a copy with
``requires_grad=True``.

Report: ``report.estimates["rank"]`` = {"tolerance", "probe_rows", "heads": {h: {entropy, entropy_ratio,
topk_mass, sinks, sink_mass, stable_rank, energy_rank, spectral_norm (with `spectral`), path, rank,
estimated_error, tries, reason}}}; the measured error against float64 (``report.measure_error``) is the API's
``report.measured["error"]`` (`reference.head_errors`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

from . import estimators, lowrank
from ._arrays import compute_dtype, namespace
from .policy import POLICIES, HeadPlan, Plan, Policy, resolve_policy
from .precision import PrecisionPolicy
from .problem import AttentionProblem

if TYPE_CHECKING:
    from .report import Report

#: Largest pooled map side (blocks) the policy estimates the spectrum on.
MAP_BLOCKS = 32


def _host(x: Any) -> np.ndarray:
    """float64 host copy of a NumPy or CuPy array."""
    return np.asarray(x.get() if hasattr(x, "get") else x, dtype=np.float64)


def _rel_l2_per_head(approx: Any, exact: Any) -> np.ndarray:
    """‖approx − exact‖ / ‖exact‖ per head over (batch, rows, D); inputs [B, n, m, D]; 0/0 gives 0."""
    xp = namespace("cupy" if hasattr(approx, "get") else "numpy")
    diff = ((approx - exact) ** 2).sum(axis=(0, 2, 3))
    norm = (exact**2).sum(axis=(0, 2, 3))
    ratio = xp.sqrt(diff / xp.where(norm > 0, norm, 1))
    return _host(xp.where(norm > 0, ratio, xp.sqrt(diff)))


@dataclasses.dataclass(frozen=True, eq=False)
class RankPolicy(Policy):
    """Dense or low-rank(r) per head under an error guard (see the module docstring).

    Args:
        tolerance: largest relative L2 error on the probe rows for a low-rank head (> 0).
        probe_rows: exact rows per head, 1 ..= estimators.MAX_ROWS.
        block: smallest pooling block of the map the spectrum is estimated on (tokens, >= 1; larger when the
            map would exceed MAP_BLOCKS blocks a side).
        max_rank: largest number of coarse landmark segments tried (>= 1).
        steps: guard tries per head (r doubles after each failure, >= 1).
        min_entropy: normalised entropy below which a head without sinks is peaked, in [0, 1].
        sink_share: share of the probe rows' mass that makes a key a sink, in (0, 1].
        max_sinks: sinks per head attended exactly (>= 0).
        max_cost: low-rank only when it computes at most this share of the dense path's scores, in (0, 1].
        seed: seeds the probe rows and the randomized estimators (decisions are reproducible).
        spectral: estimate the pooled map's spectrum (seeds the starting rank; see the module docstring).
        requires_grad: plan every head dense (gradients will be taken; see `for_gradients`).
        then: the policy whose plan dense heads take (default the "exact" preset).
        name: the name reports show ("lowrank"; the combined preset is "adaptive").

    Raises ValueError for arguments out of range.
    """

    tolerance: float = 2e-2
    probe_rows: int = 8
    block: int = 256
    max_rank: int = 256
    steps: int = 3
    min_entropy: float = 0.5
    sink_share: float = 0.2
    max_sinks: int = 4
    max_cost: float = 0.25
    seed: int = 0
    spectral: bool = True
    requires_grad: bool = False
    then: Policy | None = None
    name: str = "lowrank"

    def __post_init__(self) -> None:
        checks = {
            "tolerance": self.tolerance > 0,
            "probe_rows": 1 <= self.probe_rows <= estimators.MAX_ROWS,
            "block": self.block >= 1,
            "max_rank": self.max_rank >= 1,
            "steps": self.steps >= 1,
            "min_entropy": 0 <= self.min_entropy <= 1,
            "sink_share": 0 < self.sink_share <= 1,
            "max_sinks": self.max_sinks >= 0,
            "max_cost": 0 < self.max_cost <= 1,
        }
        for field, ok in checks.items():
            if not ok:
                raise ValueError(f"RankPolicy: {field} out of range, got {getattr(self, field)!r}")

    def for_gradients(self) -> RankPolicy:
        """This policy for a call whose gradients will be taken: every head dense (exact backward applies)."""
        then = None if self.then is None else self.then.for_gradients()
        return dataclasses.replace(self, requires_grad=True, then=then)

    def _dense_policy(self) -> Policy:
        return self.then if self.then is not None else resolve_policy("exact")

    def plan(self, problem: AttentionProblem, q: Any, k: Any, v: Any, report: Report | None) -> Plan:
        dense = self._dense_policy().plan(problem, q, k, v, report)
        entries = [{"head": h, "path": "dense", "rank": None} for h in range(problem.heads_q)]
        reason = self._skip_reason(problem)
        if reason is not None:
            for entry in entries:
                entry["reason"] = reason
            self._record(report, entries)
            return dense
        decisions, prepared = self._decide(problem, q, k, v, entries)
        self._record(report, entries)
        if not decisions:
            return dense
        precision = compute_dtype(problem.dtype).name
        heads = tuple(HeadPlan(path="lowrank", precision=precision, rank=decisions[h]) if h in decisions
                      else dense.heads[h] for h in range(problem.heads_q))
        sinks = {h: entries[h]["sinks"] for h in decisions if entries[h]["sinks"]}
        artifacts = {**dense.artifacts, "sinks": sinks}
        if prepared is not None:
            artifacts["prepared"] = prepared
        return Plan(heads=heads, artifacts=artifacts)

    def _skip_reason(self, problem: AttentionProblem) -> str | None:
        """Why no head can go low-rank in this call (no estimator runs then), or None."""
        if self.requires_grad:
            return "gradients required"
        if problem.is_empty or problem.seqlen_k == 0:
            return "empty"
        cost = lowrank.geometry(problem.seqlen_q, problem.seqlen_k,
                                lowrank.balanced_rank(problem.seqlen_q, problem.seqlen_k)).keys_per_query()
        if cost > self.max_cost * problem.seqlen_k:
            return f"too short: low rank computes {cost} scores per query against {problem.seqlen_k} keys"
        return None

    def _decide(self, problem: AttentionProblem, q: Any, k: Any, v: Any, entries: list[dict[str, Any]]
                ) -> tuple[dict[int, int], lowrank.Prepared | None]:
        """Fill `entries` with the estimates; return {head: rank} for the heads that go low-rank, and the
        guard's `lowrank.Prepared` when it covers exactly those heads (else None)."""
        rows = estimators.probe_rows(problem, self.probe_rows, self.seed)
        probe = estimators.probe(problem, q, k, v, rows)
        # The map is capped at MAP_BLOCKS blocks a side and the spectrum runs with cheap settings: it runs on
        # the host inside the call, and it only seeds the starting rank (the guard decides).
        spectral: dict[str, np.ndarray] = {}
        if self.spectral:
            block = max(self.block, -(-max(problem.seqlen_q, problem.seqlen_k) // MAP_BLOCKS))
            spec = estimators.spectrum(estimators.pooled_map(problem, q, k, block), max_rank=16, seed=self.seed,
                                       power_iters=10, samples=30)
            shape = (problem.batch, problem.heads_q)
            spectral = {"stable_rank": spec.stable_rank.reshape(shape).max(axis=0),
                        "energy_rank": spec.energy_rank.reshape(shape).max(axis=0),
                        "spectral_norm": spec.spectral_norm.reshape(shape).max(axis=0)}
        seen = np.clip(estimators.row_limits(problem, rows), 1, None)
        entropy = _host(probe.entropy)  # [B, Hq, m]
        ratio = (entropy / np.maximum(np.log(seen), 1e-12)).mean(axis=(0, 2))
        rows_seen = max(1, int((np.isfinite(_host(probe.lse))).sum(axis=2).min()))
        col_share = _host(probe.col_mass) / rows_seen  # [B, Hq, Sk]
        topk_mass = _host(probe.topk_mass)
        start = max(lowrank.balanced_rank(problem.seqlen_q, problem.seqlen_k), 1)

        candidates = []
        for h, entry in enumerate(entries):
            share = col_share[:, h].max(axis=0)
            count = min(self.max_sinks, share.size)
            top = np.argpartition(-share, count - 1)[:count] if count else []
            sinks = sorted(int(j) for j in top if share[j] >= self.sink_share)
            entry.update(entropy=float(entropy[:, h].mean()), entropy_ratio=float(ratio[h]),
                         topk_mass=float(topk_mass[:, h].mean()), sinks=sinks,
                         sink_mass=float(share[sinks].sum()) if sinks else 0.0,
                         **{name: float(values[h]) for name, values in spectral.items()},
                         estimated_error=None, tries=[])
            # Low entropy is explained (and harmless to the approximation) when sinks hold most of the mass.
            if ratio[h] < self.min_entropy and entry["sink_mass"] < 0.5:
                entry["reason"] = "peaked: low entropy not explained by sinks"
            else:
                candidates.append(h)

        energy = spectral.get("energy_rank")
        rank = min(self.max_rank, max(start, int(energy[candidates].max()) if energy is not None and candidates
                                      else 1))
        chosen: dict[int, int] = {}
        reusable = None
        for _ in range(self.steps):
            if not candidates:
                break
            prepared = lowrank.prepare(problem, k, v, candidates, rank, {h: entries[h]["sinks"] for h in candidates})
            approx, _ = lowrank.approximate_rows(problem, q, rows, prepared)
            exact = probe.out[:, candidates].astype(approx.dtype)
            errors = _rel_l2_per_head(approx, exact)
            failed = []
            for h, error in zip(candidates, errors):
                entries[h]["tries"].append((rank, float(error)))
                entries[h]["estimated_error"] = float(error)
                if error <= self.tolerance:
                    chosen[h] = rank
                    entries[h].update(path="lowrank", rank=rank, reason="guard passed")
                else:
                    failed.append(h)
            if not failed and set(chosen) == set(prepared.heads):
                reusable = prepared  # exactly the low-rank heads, all at this rank: the forward reuses it
            candidates = failed
            if rank >= self.max_rank:
                break
            rank = min(self.max_rank, 2 * rank)
        for h in candidates:
            entries[h]["reason"] = f"guard failed: error above tolerance {self.tolerance:g}"
        return chosen, reusable

    def _record(self, report: Report | None, entries: list[dict[str, Any]]) -> None:
        if report is not None:
            report.estimates["rank"] = {"tolerance": self.tolerance, "probe_rows": self.probe_rows,
                                        "heads": dict(enumerate(entries))}


POLICIES.setdefault("lowrank", RankPolicy())
#: Rank and precision combined: low-rank where the rank guard allows, the "balanced" precision policy elsewhere.
POLICIES.setdefault("adaptive", RankPolicy(name="adaptive", then=PrecisionPolicy("balanced")))
