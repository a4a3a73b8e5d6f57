"""The rank policy: per query head, dense or low-rank(r), decided from estimates and guarded by probe rows.

For each call (`RankPolicy.plan`):

1. Too short to pay: when the low-rank path would compute more than `max_cost` · Sk scores per query
   (see `lowrank.Geometry.keys_per_query`), every head is dense and no estimator runs.
2. Probe (`estimators.probe`, Numba CUDA on CuPy: three launches over all heads): m = `probe_rows` exact
   query rows per head → entropy, top-k mass, column mass. Reduced per head on the device
   (`estimators.head_statistics`, one more Numba launch on CuPy: entropy ratio, top-k mass, the `max_sinks`
   largest column shares by repeated argmax) into a statistics array and a device sink table. Sinks (attended
   exactly by the low-rank path): among those keys, the ones whose share of the probe rows' mass is
   >= min(`sink_share`, `sink_ratio` · a uniform row's share).
3. Pooled-map spectrum (only with `spectral`, off by default): `estimators.pooled_map` with blocks of at
   least `block` tokens (at most MAP_BLOCKS a side) and `estimators.spectrum` → stable rank and the rank
   holding 95% of the energy, which seeds the starting rank. Host linear algebra after a synchronisation
   (milliseconds), so the default decision is probe + guard; the estimators stay available and tested.
4. Screening: a head whose mean normalised entropy H / log(keys seen) is below `min_entropy` and whose
   mass is not explained by sinks (those >= `sink_share` holding < 50%) is peaked (retrieval-like): dense.
5. Guard: the other heads start at r = max(balanced rank, energy rank) (clipped to `max_rank`); the
   approximation is evaluated on the probe rows (`lowrank.guard_rows`) and compared with their
   exact outputs: relative L2 error over the head's rows (all batch entries). Above `tolerance` (but within
   `retry_margin` · tolerance), r doubles (at most `steps` tries, never beyond `max_rank`); a head that never
   passes stays dense. Without `spectral` the first rank is known before the statistics, so the first try runs
   speculatively on every head (the device sink table, no host value) and its errors travel with the
   statistics.

Host synchronisations (device-to-host transfers, `to_host64`; recorded as ``transfers`` in the report): one per
plan, plus one per retry at a larger rank; `spectral` adds one (the pooled map) and moves the first try after
the statistics' transfer. Launches: the probe's three Numba kernels and the statistics' one (~4·max_sinks + 13
array operations instead beyond `estimators.MAX_SINK_SLOTS` sinks), then `lowrank.prepare` and
`lowrank.guard_rows` once per try, each over all its heads at once (no per-head loop). Where the fused low-rank
kernel takes the call (CuPy bf16/fp16, D 64 or 128), `prepare` is two launches (cuda_src/lowrank_landmarks.cu) and
`guard_rows` that kernel's whole forward of the tried heads (one launch; the forward then copies the passing
heads' rows from it); elsewhere both are batched array operations (`guard_rows`: `lowrank.approximate_rows` on
the probe rows only).
The speculative try costs a peaked batch its `prepare` and guard rows (work a diffuse batch needs anyway) in
exchange for the second synchronisation.

Dense heads take the plan of the `then` policy (default "exact"), so this composes with a precision policy.
Low-rank heads get HeadPlan(path="lowrank", precision=<compute dtype>, rank=r); the plan's artifacts carry
``"sinks"``: {query head: key indices} for `lowrank.forward`, and ``"prepared"``: the guard's keys and landmarks
(a list of `lowrank.Prepared`, one per rank at which heads passed, holding only those heads and their sink
columns, and the guard's fused forward output when it ran one), so the forward does not redo them.

Gradients: the low-rank path has no backward of its own, and the exact backward of the dense softmax is not
the gradient of the approximation. So when gradients will be taken the policy plans every head dense:
callers (the framework adapters) use `RankPolicy.for_gradients()`, which returns a copy with
``requires_grad=True``.

Report: ``report.estimates["rank"]`` = {"tolerance", "probe_rows", "transfers", "heads": {h: {entropy, entropy_ratio,
topk_mass, sinks, sink_mass, stable_rank, energy_rank, spectral_norm (with `spectral`), path, rank,
estimated_error, tries, reason}}}; the measured error against float64 (``report.measure_error``) is the API's
``report.measured["error"]`` (`reference.head_errors`).
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Any

import numpy as np

from . import estimators, lowrank
from ._arrays import compute_dtype, namespace, on_device, to_host64
from .policy import POLICIES, HeadPlan, Plan, Policy, check_number, resolve_policy
from .precision import PrecisionPolicy
from .problem import AttentionProblem, check_flag
from .reference import rel_l2_per_head

if TYPE_CHECKING:
    from .report import Report

#: Largest pooled map side (blocks) the policy estimates the spectrum on.
MAP_BLOCKS = 32


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
        retry_margin: a head whose guard error exceeds retry_margin · tolerance is not retried at a larger
            rank (its error comes from within-block spread that coarser-to-finer segments do not remove), >= 1.
        min_entropy: normalised entropy below which a head without sinks is peaked, in [0, 1].
        sink_share: share of the probe rows' mass that makes a key a sink whatever S, in (0, 1]; sinks holding
            >= 50% together explain a low entropy (the head is not peaked).
        sink_ratio: a key is also a sink when its share is >= sink_ratio times a uniform row's share (> 0):
            a sink's share falls like 1/S (e^logit / (e^logit + S)), so an absolute threshold alone misses
            sinks at long S / large D that still ruin a landmark (its block mean dilutes the logit by w).
        max_sinks: sinks per head attended exactly (>= 0).
        max_cost: low-rank only when it computes at most this share of the dense path's scores, in (0, 1].
        seed: seeds the probe rows and the randomized estimators (decisions are reproducible).
        spectral: estimate the pooled map's spectrum (seeds the starting rank; see the module docstring).
            Off by default: the guard decides alone, and the spectrum costs a host synchronisation and host
            linear algebra (milliseconds) per call.
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
    retry_margin: float = 4.0
    min_entropy: float = 0.5
    sink_share: float = 0.2
    sink_ratio: float = 32.0
    max_sinks: int = 4
    max_cost: float = 0.25
    seed: int = 0
    spectral: bool = False
    requires_grad: bool = False
    then: Policy | None = None
    name: str = "lowrank"

    def __post_init__(self) -> None:
        for field in dataclasses.fields(self):  # each option's kind is its default's type
            kind = type(field.default)
            if kind in (int, float):
                check_number("RankPolicy", field.name, getattr(self, field.name), kind)
            elif kind is bool:
                check_flag(f"RankPolicy: {field.name}", getattr(self, field.name))
        if self.then is not None and not isinstance(self.then, Policy):
            raise TypeError(f"RankPolicy: then must be a Policy or None, got {self.then!r}")
        checks = {
            "tolerance": (self.tolerance > 0, "> 0"),
            "probe_rows": (1 <= self.probe_rows <= estimators.MAX_ROWS, f"in [1, {estimators.MAX_ROWS}]"),
            "block": (self.block >= 1, ">= 1"),
            "max_rank": (self.max_rank >= 1, ">= 1"),
            "steps": (self.steps >= 1, ">= 1"),
            "min_entropy": (0 <= self.min_entropy <= 1, "in [0, 1]"),
            "sink_share": (0 < self.sink_share <= 1, "in (0, 1]"),
            "sink_ratio": (self.sink_ratio > 0, "> 0"),
            "retry_margin": (self.retry_margin >= 1, ">= 1"),
            "max_sinks": (self.max_sinks >= 0, ">= 0"),
            "max_cost": (0 < self.max_cost <= 1, "in (0, 1]"),
            "seed": (self.seed >= 0, ">= 0"),
        }
        for field, (ok, expected) in checks.items():
            if not ok:
                raise ValueError(f"RankPolicy: {field} must be {expected}, got {getattr(self, field)!r}")

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
            self._record(report, entries, 0)
            return dense
        decisions, prepared, transfers = self._decide(problem, q, k, v, entries)
        self._record(report, entries, transfers)
        if not decisions:
            return dense
        precision = compute_dtype(problem.dtype).name
        heads = tuple(HeadPlan(path="lowrank", precision=precision, rank=decisions[h]) if h in decisions
                      else dense.heads[h] for h in range(problem.heads_q))
        sinks = {h: entries[h]["sinks"] for h in decisions if entries[h]["sinks"]}
        artifacts = {**dense.artifacts, "sinks": sinks}
        if prepared:
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
                ) -> tuple[dict[int, int], list[lowrank.Prepared], int]:
        """Fill `entries` with the estimates; return {head: rank} for the heads that go low-rank, the guard's
        `lowrank.Prepared` of each rank that passed heads (only those heads and sink columns: the forward takes
        their keys), and the number of device-to-host transfers made (see the module docstring)."""
        xp = namespace(problem.library)
        heads = list(range(problem.heads_q))
        rows = estimators.probe_rows(problem, self.probe_rows, self.seed)
        probe = estimators.probe(problem, q, k, v, rows)
        limits = problem.keys_seen(rows)
        stats, sink_keys = self._head_stats(problem, limits, probe)
        start = lowrank.balanced_rank(problem.seqlen_q, problem.seqlen_k)
        spectral: dict[str, np.ndarray] = {}
        transfers = 1
        if self.spectral:  # the starting rank depends on the screening: the statistics come first
            stats = to_host64(stats)
            # Capped at MAP_BLOCKS blocks a side, cheap settings: it only seeds the starting rank.
            block = max(self.block, -(-max(problem.seqlen_q, problem.seqlen_k) // MAP_BLOCKS))
            spec = estimators.spectrum(estimators.pooled_map(problem, q, k, block), max_rank=16, seed=self.seed,
                                       power_iters=10, samples=30)
            transfers += 1
            shape = (problem.batch, problem.heads_q)
            spectral = {"stable_rank": spec.stable_rank.reshape(shape).max(axis=0),
                        "energy_rank": spec.energy_rank.reshape(shape).max(axis=0),
                        "spectral_norm": spec.spectral_norm.reshape(shape).max(axis=0)}
            first = None
        else:  # speculative first try on every head at the starting rank: statistics and errors in one transfer
            first = lowrank.prepare(problem, k, v, heads, min(self.max_rank, start), sink_keys)
            packed = to_host64(xp.concatenate([stats, self._guard_errors(problem, q, rows, probe, first)[:, None]],
                                              axis=1))
            stats, first_errors = packed[:, :-1], packed[:, -1]

        candidates = []
        count = (stats.shape[1] - 4) // 2
        for h, entry in enumerate(entries):
            ratio, entropy, topk, dominant = (float(x) for x in stats[h, :4])
            shares, keys = stats[h, 4: 4 + count], stats[h, 4 + count:]
            kept = keys >= 0
            entry.update(entropy=entropy, entropy_ratio=ratio, topk_mass=topk,
                         sinks=sorted(int(key) for key in keys[kept]), sink_mass=float(shares[kept].sum()),
                         **{name: float(values[h]) for name, values in spectral.items()},
                         estimated_error=None, tries=[])
            # Low entropy is explained (and harmless to the approximation) when sinks hold most of the mass.
            if ratio < self.min_entropy and dominant < 0.5:
                # Not sinks: a peaked head's few probe rows each put their mass on their own key.
                entry.update(sinks=[], sink_mass=0.0, reason="peaked: low entropy not explained by sinks")
            else:
                candidates.append(h)

        energy = spectral.get("energy_rank")
        rank = min(self.max_rank, max(start, int(energy[candidates].max()) if energy is not None and candidates
                                      else 1))
        chosen: dict[int, int] = {}
        passed: list[lowrank.Prepared] = []
        for _ in range(self.steps):
            if not candidates:
                break
            if first is not None:  # the speculative try (at this rank: no spectrum) covered every head
                prepared, errors, first = first, first_errors[candidates], None
            else:
                prepared = lowrank.prepare(problem, k, v, candidates, rank,
                                           {h: entries[h]["sinks"] for h in candidates})
                errors = to_host64(self._guard_errors(problem, q, rows, probe, prepared))  # one transfer per try
                transfers += 1
            retry = []
            for h, error in zip(candidates, errors):
                entries[h]["tries"].append((rank, float(error)))
                entries[h]["estimated_error"] = float(error)
                if error <= self.tolerance:
                    chosen[h] = rank
                    entries[h].update(path="lowrank", rank=rank, reason="guard passed")
                elif error <= self.retry_margin * self.tolerance:
                    retry.append(h)
                else:
                    entries[h]["reason"] = f"guard failed: error above {self.retry_margin:g} x tolerance " \
                                           f"{self.tolerance:g}, a larger rank would not help"
            passing = [h for h in prepared.heads if chosen.get(h) == rank]
            if passing:  # only their keys and sink columns travel to the forward
                passed.append(prepared.subset(xp, passing, max(len(entries[h]["sinks"]) for h in passing)))
            candidates = retry
            if rank >= self.max_rank:
                break
            rank = min(self.max_rank, 2 * rank)
        for h in candidates:
            entries[h]["reason"] = f"guard failed: error above tolerance {self.tolerance:g}"
        return chosen, passed, transfers

    @staticmethod
    def _guard_errors(problem: AttentionProblem, q: Any, rows: np.ndarray, probe: estimators.ProbeResult,
                      prepared: lowrank.Prepared) -> Any:
        """[n] relative L2 error per prepared head of the approximation on the probe rows (`lowrank.guard_rows`:
        with the fused kernel, the whole forward of those heads, kept on `prepared` for the forward) against
        their exact outputs (`rel_l2_per_head`), on the device: no transfer."""
        xp = namespace(problem.library)
        approx = lowrank.guard_rows(problem, q, rows, prepared)
        exact = probe.out if prepared.heads == tuple(range(problem.heads_q)) else \
            probe.out[:, on_device(xp, prepared.heads, np.int64)]
        return rel_l2_per_head(approx, exact.astype(approx.dtype, copy=False))

    def _sink_threshold(self, limits: np.ndarray) -> float:
        """Column share from which a key is a sink: min(sink_share, sink_ratio · u), u = mean over the probe
        rows of 1 / (keys the row sees: `limits`, from `AttentionProblem.keys_seen`), the share the most visible
        key has when every row is uniform."""
        seen = np.clip(limits, 1, None)
        return min(self.sink_share, self.sink_ratio * float(np.mean(1.0 / seen)))

    def _head_stats(self, problem: AttentionProblem, limits: np.ndarray, probe: estimators.ProbeResult
                    ) -> tuple[Any, Any]:
        """Per query head, on the probe's device (no transfer): ([Hq, 4 + 2c] float64 statistics, [Hq, c] int64
        sink table) of `estimators.head_statistics` with c = min(max_sinks, Sk) candidate sinks, the share
        threshold `_sink_threshold` and `sink_share`. `limits`: the probe rows' `AttentionProblem.keys_seen`."""
        return estimators.head_statistics(probe, limits, self._sink_threshold(limits), self.sink_share,
                                          min(self.max_sinks, problem.seqlen_k))

    def _record(self, report: Report | None, entries: list[dict[str, Any]], transfers: int) -> None:
        if report is not None:
            report.estimates["rank"] = {"tolerance": self.tolerance, "probe_rows": self.probe_rows,
                                        "transfers": transfers, "heads": dict(enumerate(entries))}


POLICIES.setdefault("lowrank", RankPolicy())
#: Rank and precision combined: low-rank where the rank guard allows, the "balanced" precision policy elsewhere.
POLICIES.setdefault("adaptive", RankPolicy(name="adaptive", then=PrecisionPolicy("balanced")))
