"""The low-rank path (CPU) and the rank policy: exactness where the approximation is exact, error on diffuse
heads, causal leaks, sinks, and per-head dispatch of mixed batches through `attention`."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_qkv, np_dtype, rel_l2

import adaattn_core as aa
from adaattn_core import estimators, lowrank
from adaattn_core.problem import describe
from adaattn_core.rank_policy import RankPolicy
from adaattn_core.reference import head_errors

TOLERANCE = 2e-2


def _lowrank(q, k, v, *, causal, rank, heads=None, sinks=None):
    """(out, lse) of `lowrank.forward` for `heads` (default all); other heads left NaN."""
    problem = describe(q, k, v, causal=causal, scale=None, layout="bhsd")
    heads = list(range(problem.heads_q)) if heads is None else heads
    out = np.full(q.shape[:3] + (v.shape[3],), np.nan, dtype=q.dtype)
    lse = np.full(q.shape[:3], np.nan, dtype=np.float64 if q.dtype == np.float64 else np.float32)
    lowrank.forward(problem, q, k, v, out, lse, heads, [rank] * len(heads), {"sinks": sinks or {}})
    return out, lse


def _heads(rng, kinds, *, seq=2048, dim=64, batch=1):
    """q, k, v with one head per entry of `kinds`: diffuse (q, k scaled by 0.1), peaked (each query a scaled
    copy of one key: retrieval), sink (diffuse plus one key that takes most of every row's mass), random."""
    q, k, v = make_qkv(rng, batch=batch, heads_q=len(kinds), seq_q=seq, dim=dim)
    for h, kind in enumerate(kinds):
        if kind == "diffuse":
            q[:, h] *= 0.1
            k[:, h] *= 0.1
        elif kind == "peaked":
            q[:, h] = 4 * k[:, h][:, rng.permutation(seq)]
        elif kind == "sink":
            u = rng.standard_normal(dim)
            u /= np.linalg.norm(u)
            q[:, h] = 0.1 * q[:, h] + 4 * u
            k[:, h] *= 0.1
            k[:, h, 0] = 20 * u  # logit 4·20/√64 = 10 over ~S keys near 0: most of the mass
    return q, k, v


def test_geometry():
    geo = lowrank.geometry(1000, 3000, 7)
    assert geo.length == 3000 and geo.q_offset == 2000 and geo.k_offset == 0
    assert geo.segment % geo.block == 0 and geo.padded % geo.segment == 0 and geo.padded >= 3000
    assert geo.segments <= 7 and geo.keys_per_query() == geo.block + geo.fine + geo.segments
    assert lowrank.balanced_rank(32768, 32768) == 32 and lowrank.geometry(32768, 32768, 32).padded == 32768
    assert lowrank.balanced_rank(1500, 1500) == 5
    with pytest.raises(ValueError, match="rank"):
        lowrank.geometry(10, 10, 0)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q,seq_k", [(300, 300), (100, 257), (257, 100), (5, 5), (1, 700)])
def test_exact_when_blocks_are_constant(rng, causal, seq_q, seq_k):
    """Keys constant along the sequence make every landmark exact: the approximation equals attention."""
    q, k, v = make_qkv(rng, batch=2, heads_q=4, heads_kv=2, seq_q=seq_q, seq_k=seq_k, dim=16, dtype="float64")
    k[...] = k[:, :, :1]
    out, lse = _lowrank(q, k, v, causal=causal, rank=3)
    ref, ref_lse = aa.attention_reference(q, k, v, causal=causal)
    assert rel_l2(out, ref) < 1e-12
    np.testing.assert_array_equal(np.isfinite(lse), np.isfinite(ref_lse))
    finite = np.isfinite(ref_lse)
    np.testing.assert_allclose(lse[finite], ref_lse[finite], atol=1e-12)
    if causal and seq_q > seq_k:  # rows that see no key
        assert np.all(out[:, :, : seq_q - seq_k] == 0) and np.all(np.isneginf(lse[:, :, : seq_q - seq_k]))


@pytest.mark.parametrize("causal", [False, True])
def test_diffuse_heads_within_tolerance(rng, causal):
    q, k, v = _heads(rng, ["diffuse"] * 3, seq=2048)
    out, _ = _lowrank(q, k, v, causal=causal, rank=lowrank.balanced_rank(2048, 2048))
    assert rel_l2(out, aa.attention_reference(q, k, v, causal=causal)[0]) < TOLERANCE


def test_no_future_token_leaks(rng):
    """Causal: changing keys/values after position p leaves every row <= p unchanged."""
    q, k, v = make_qkv(rng, batch=1, heads_q=2, seq_q=777, dim=16, dtype="float64")
    out, lse = _lowrank(q, k, v, causal=True, rank=4)
    k2, v2 = k.copy(), v.copy()
    k2[:, :, 400:] = rng.standard_normal(k2[:, :, 400:].shape) * 5
    v2[:, :, 400:] = rng.standard_normal(v2[:, :, 400:].shape) * 5
    out2, lse2 = _lowrank(q, k2, v2, causal=True, rank=4)
    np.testing.assert_array_equal(out[:, :, :400], out2[:, :, :400])
    np.testing.assert_array_equal(lse[:, :, :400], lse2[:, :, :400])


@pytest.mark.parametrize("causal", [False, True])
def test_rows_match_forward_and_only_selected_heads_are_written(rng, causal):
    q, k, v = make_qkv(rng, batch=2, heads_q=6, heads_kv=3, seq_q=333, seq_k=400, dim=24, contiguous=False)
    heads = [1, 4, 5]
    out, lse = _lowrank(q, k, v, causal=causal, rank=5, heads=heads, sinks={4: [7, 100]})
    untouched = [h for h in range(6) if h not in heads]
    assert np.isnan(out[:, untouched]).all() and np.isnan(lse[:, untouched]).all()
    assert not np.isnan(out[:, heads]).any()
    problem = describe(q, k, v, causal=causal, scale=None, layout="bhsd")
    rows = np.array([0, 17, 200, 332])
    prepared = lowrank.prepare(problem, k, v, heads, 5, {4: [7, 100]})
    rows_out, rows_lse = lowrank.approximate_rows(problem, q, rows, prepared)
    np.testing.assert_allclose(rows_out, out[:, heads][:, :, rows], atol=1e-5)
    np.testing.assert_allclose(rows_lse, lse[:, heads][:, :, rows], atol=1e-5)


def test_sinks_are_attended_exactly(rng):
    q, k, v = _heads(rng, ["sink"] * 2, seq=1024, dim=64)
    ref = aa.attention_reference(q, k, v, causal=True)[0]
    with_sinks, _ = _lowrank(q, k, v, causal=True, rank=4, sinks={0: [0], 1: [0]})
    without, _ = _lowrank(q, k, v, causal=True, rank=4)
    assert rel_l2(with_sinks, ref) < TOLERANCE < rel_l2(without, ref)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float64"])
def test_dtypes(rng, dtype):
    q, k, v = _heads(rng, ["diffuse"] * 2, seq=512, dim=32)
    q, k, v = (x.astype(np_dtype(dtype)) for x in (q, k, v))
    out, lse = _lowrank(q, k, v, causal=True, rank=3)
    assert out.dtype == np_dtype(dtype) and lse.dtype == (np.float64 if dtype == "float64" else np.float32)
    assert rel_l2(out, aa.attention_reference(q, k, v, causal=True)[0]) < TOLERANCE


def test_forward_rejects_mismatched_ranks(rng):
    q, k, v = make_qkv(rng, seq_q=10, dim=8)
    problem = describe(q, k, v, causal=False, scale=None, layout="bhsd")
    with pytest.raises(ValueError, match="same length"):
        lowrank.forward(problem, q, k, v, q.copy(), q[..., 0].copy(), [0, 1], [2], {})


# --------------------------------------------------------------------------------------------------------------
# The policy


def test_registered_and_validated():
    assert isinstance(aa.POLICIES["lowrank"], RankPolicy)
    with pytest.raises(ValueError, match="tolerance"):
        RankPolicy(tolerance=0)
    with pytest.raises(ValueError, match="probe_rows"):
        RankPolicy(probe_rows=estimators.MAX_ROWS + 1)


@pytest.mark.parametrize("causal,spectral", [(False, False), (True, False), (True, True)])
def test_mixed_batch_dispatches_each_head(rng, causal, spectral):
    kinds = ["diffuse", "peaked", "sink", "random", "diffuse", "peaked"]
    q, k, v = _heads(rng, kinds, seq=2048, dim=64, batch=2)
    report = aa.Report()
    out = aa.attention(q, k, v, causal=causal, policy=RankPolicy(spectral=spectral), report=report)
    paths = [head.path for head in report.plan.heads]
    assert paths == ["lowrank", "dense", "lowrank", "dense", "lowrank", "dense"], report.estimates["rank"]
    ref = aa.attention_reference(q, k, v, causal=causal)[0]
    entries = report.estimates["rank"]["heads"]
    for h in range(len(kinds)):
        error = rel_l2(out[:, h], ref[:, h])
        if paths[h] == "lowrank":
            assert error < TOLERANCE and entries[h]["estimated_error"] <= TOLERANCE
            assert entries[h]["rank"] == report.plan.heads[h].rank >= 1
        else:
            assert error < 1e-5
    assert entries[2]["sinks"] == [0] and report.plan.artifacts["sinks"] == {2: [0]}
    assert entries[1]["reason"].startswith("peaked") and entries[3]["reason"].startswith("guard failed")
    spectral_keys = ("stable_rank", "energy_rank", "spectral_norm") if spectral else ()
    for key in ("entropy", "entropy_ratio", "topk_mass", *spectral_keys):
        assert all(np.isfinite(e[key]) for e in entries.values())
    assert spectral or "stable_rank" not in entries[0]
    rows = estimators.probe_rows(describe(q, k, v, causal=causal, scale=None, layout="bhsd"), 32, seed=5)
    errors = head_errors(q, k, v, out, causal=causal, scale=1 / 8, rows=rows)
    assert all(e < TOLERANCE for e in errors)


def test_gqa_and_odd_sizes(rng):
    q, k, v = make_qkv(rng, batch=1, heads_q=4, heads_kv=2, seq_q=1500, seq_k=2500, dim=40)
    q *= 0.1
    k *= 0.1
    report = aa.Report()
    out = aa.attention(q, k, v, causal=True, policy=RankPolicy(), report=report)
    assert all(head.path == "lowrank" for head in report.plan.heads)
    assert rel_l2(out, aa.attention_reference(q, k, v, causal=True)[0]) < TOLERANCE


def test_estimators_do_not_run_when_they_cannot_pay(rng, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("estimator ran")

    monkeypatch.setattr(estimators, "probe", forbidden)
    monkeypatch.setattr(estimators, "pooled_map", forbidden)
    q, k, v = _heads(rng, ["diffuse"] * 2, seq=2048)
    aa.attention(q, k, v, policy="exact")
    report = aa.Report()
    aa.attention(q, k, v, policy=RankPolicy().for_gradients(), report=report)
    assert all(h.path == "dense" for h in report.plan.heads)
    assert report.estimates["rank"]["heads"][0]["reason"] == "gradients required"
    short = [x[:, :, :256] for x in (q, k, v)]
    aa.attention(*short, policy=RankPolicy(), report=report)
    assert report.estimates["rank"]["heads"][0]["reason"].startswith("too short")


def test_dense_heads_follow_the_then_policy(rng):
    class Marked(aa.Policy):
        name = "marked"

        def plan(self, problem, q, k, v, report):
            return aa.Plan(heads=(aa.HeadPlan(path="dense", precision="marked"),) * problem.heads_q)

    q, k, v = _heads(rng, ["diffuse", "peaked"], seq=2048)
    plan = RankPolicy(then=Marked()).plan(describe(q, k, v, causal=False, scale=None, layout="bhsd"), q, k, v,
                                          None)
    assert plan.heads[0].path == "lowrank" and plan.heads[1] == aa.HeadPlan(path="dense", precision="marked")


def test_forward_reuses_the_guards_prepared_keys(rng, monkeypatch):
    calls = []
    original = lowrank.prepare
    monkeypatch.setattr(lowrank, "prepare", lambda *args, **kwargs: calls.append(args[3]) or original(*args, **kwargs))
    q, k, v = _heads(rng, ["diffuse", "random", "diffuse"], seq=2048)
    report = aa.Report()
    out = aa.attention(q, k, v, causal=True, policy=RankPolicy(), report=report)
    assert [h.path for h in report.plan.heads] == ["lowrank", "dense", "lowrank"]
    # The guard's one try prepared every head; the plan hands on the passing heads' keys, the forward takes them.
    assert calls == [[0, 1, 2]] and [p.heads for p in report.plan.artifacts["prepared"]] == [(0, 2)]
    ref = aa.attention_reference(q, k, v, causal=True)[0]
    assert rel_l2(out[:, [0, 2]], ref[:, [0, 2]]) < TOLERANCE and rel_l2(out[:, 1], ref[:, 1]) < 1e-5


def test_default_decision_runs_no_spectrum_and_no_hopeless_retry(rng, monkeypatch):
    monkeypatch.setattr(estimators, "spectrum", lambda *args, **kwargs: pytest.fail("spectrum ran"))
    monkeypatch.setattr(estimators, "pooled_map", lambda *args, **kwargs: pytest.fail("pooled map ran"))
    q, k, v = _heads(rng, ["diffuse", "peaked", "random"], seq=2048)
    report = aa.Report()
    aa.attention(q, k, v, policy=RankPolicy(), report=report)
    assert [h.path for h in report.plan.heads] == ["lowrank", "dense", "dense"]
    entries = report.estimates["rank"]["heads"]
    assert "stable_rank" not in entries[0]
    # The random head's error (~0.8) is far above retry_margin · tolerance: one try, no doubling.
    assert len(entries[2]["tries"]) == 1 and "would not help" in entries[2]["reason"]


@pytest.mark.parametrize("causal", [False, True])
def test_sinks_found_at_long_sequences(rng, causal):
    """S = 8192, D = 128 (the GPU test's shape): the sink's logit 4·20/√128 ≈ 7 gives it ~1/8 of each row's mass,
    below sink_share; the relative rule (sink_ratio × a uniform share) still finds it, and the head goes low-rank
    with the sink exact. Before, this head failed the guard (error ~1) and ran dense."""
    kinds = ["diffuse", "peaked", "sink", "random"]
    q, k, v = (x.astype(np.float32) for x in _heads(rng, kinds, seq=8192, dim=128))
    problem = describe(q, k, v, causal=causal, scale=None, layout="bhsd")
    report = aa.Report()
    plan = RankPolicy().plan(problem, q, k, v, report)
    entries = report.estimates["rank"]["heads"]
    assert [h.path for h in plan.heads] == ["lowrank", "dense", "lowrank", "dense"], entries
    assert entries[2]["sinks"] == [0] and entries[2]["estimated_error"] <= TOLERANCE
    assert entries[0]["sinks"] == [] and entries[3]["sinks"] == []


@pytest.mark.parametrize("kinds", [["diffuse"] * 4, ["peaked"] * 4, ["diffuse", "peaked", "sink", "random"]])
def test_plan_makes_one_host_transfer(rng, monkeypatch, kinds):
    """Probe statistics and the guard's first try on every head in one transfer: the plan's only host sync on a
    GPU whenever no head is retried at a larger rank (diffuse, peaked and mixed batches alike)."""
    from adaattn_core import rank_policy

    transfers = []
    original = rank_policy.to_host64
    monkeypatch.setattr(rank_policy, "to_host64", lambda x: transfers.append(x.shape) or original(x))
    q, k, v = _heads(rng, kinds, seq=2048)
    report = aa.Report()
    plan = RankPolicy().plan(describe(q, k, v, causal=True, scale=None, layout="bhsd"), q, k, v, report)
    assert [h.path for h in plan.heads] == [{"diffuse": "lowrank", "sink": "lowrank"}.get(kind, "dense")
                                            for kind in kinds], report.estimates["rank"]
    assert transfers == [(4, 4 + 2 * 4 + 1)] and report.estimates["rank"]["transfers"] == 1


def test_retries_transfer_once_per_try(rng, monkeypatch):
    """A tolerance below every error with a wide retry margin: each head is tried `steps` times at doubling ranks,
    the first try with the statistics (one transfer), each retry in one more; no head passes, nothing is handed on."""
    from adaattn_core import rank_policy

    transfers = []
    original = rank_policy.to_host64
    monkeypatch.setattr(rank_policy, "to_host64", lambda x: transfers.append(x.shape) or original(x))
    q, k, v = _heads(rng, ["diffuse", "sink"], seq=2048)
    report = aa.Report()
    policy = RankPolicy(tolerance=1e-7, retry_margin=1e9, steps=3)
    plan = policy.plan(describe(q, k, v, causal=False, scale=None, layout="bhsd"), q, k, v, report)
    entries = report.estimates["rank"]["heads"]
    start = lowrank.balanced_rank(2048, 2048)
    assert all(h.path == "dense" for h in plan.heads) and "prepared" not in plan.artifacts
    assert [[rank for rank, _ in entries[h]["tries"]] for h in (0, 1)] == [[start, 2 * start, 4 * start]] * 2
    assert entries[1]["sinks"] == [0] and all(error > 1e-7 for _, error in entries[1]["tries"])
    assert transfers == [(2, 4 + 2 * 4 + 1), (2,), (2,)] and report.estimates["rank"]["transfers"] == 3
