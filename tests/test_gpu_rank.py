"""GPU: the Numba CUDA probe kernels and the CuPy low-rank path against NumPy and float64, and the rank policy
end to end on bfloat16 inputs."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from conftest import make_qkv, rel_l2, to_host64
from test_lowrank import TOLERANCE, _heads

import adaattn_core as aa
from adaattn_core import estimators, lowrank
from adaattn_core.problem import describe
from adaattn_core.rank_policy import RankPolicy

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module")
def cp():
    return pytest.importorskip("cupy")


def _host32(x):
    return to_host64(x).astype(np.float32)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32", "float64"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q,seq_k,heads_kv", [(1000, 1000, 4), (300, 4097, 1), (4097, 300, 2)])
def test_probe_kernels_match_numpy(cp, rng, dtype, causal, seq_q, seq_k, heads_kv):
    q, k, v = make_qkv(rng, batch=2, heads_q=4, heads_kv=heads_kv, seq_q=seq_q, seq_k=seq_k, dim=128,
                       dtype=dtype, contiguous=False, offset=8, xp=cp)
    problem = describe(q, k, v, causal=causal, scale=None, layout="bhsd")
    # Rows 0 and 1 beside the probe rows: causal with Sq > Sk, they see no key (out 0, lse -inf).
    rows = np.unique(np.r_[0, 1, estimators.probe_rows(problem, estimators.MAX_ROWS - 2, seed=2)])
    got = estimators.probe(problem, q, k, v, rows, topk=8)
    host = [_host32(x) for x in (q, k, v)]
    ref = estimators.probe(describe(*host, causal=causal, scale=None, layout="bhsd"), *host, rows, topk=8)
    for name in ("out", "lse", "entropy", "topk_mass", "col_mass"):
        a, b = to_host64(getattr(got, name)), np.asarray(getattr(ref, name), dtype=np.float64)
        np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b), err_msg=name)
        finite = np.isfinite(b)
        np.testing.assert_allclose(a[finite], b[finite], atol=2e-4, rtol=1e-4, err_msg=name)


def test_probe_runs_on_cupys_current_stream(cp, rng, monkeypatch):
    q, k, v = make_qkv(rng, batch=1, heads_q=2, seq_q=2048, dim=64, dtype="bfloat16", xp=cp)
    problem = describe(q, k, v, causal=True, scale=None, layout="bhsd")
    rows = estimators.probe_rows(problem, 8)
    expected = to_host64(estimators.probe(problem, q, k, v, rows).out)
    # Every launch is handed CuPy's current stream: the legacy default stream would also order the kernels before
    # the copy below, so the values alone could not tell.
    handed: list[int] = []
    configured = estimators._configured
    monkeypatch.setattr(estimators, "_configured", lambda kernel, grid, block, numba_stream: handed.append(
        int(numba_stream)) or configured(kernel, grid, block, numba_stream))
    with cp.cuda.Stream(non_blocking=True) as stream:
        got = estimators.probe(problem, q, k, v, rows).out
        stream.synchronize()
    assert handed == [stream.ptr] * 3, (handed, stream.ptr)
    # Not bit-equal: the output kernel sums its 256-key chunks with float atomics, in any order.
    np.testing.assert_allclose(to_host64(got), expected, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q,seq_k", [(2048, 2048), (777, 3001), (3001, 777)])
def test_lowrank_cupy_matches_numpy_and_float64(cp, rng, causal, seq_q, seq_k):
    q, k, v = make_qkv(rng, batch=2, heads_q=4, heads_kv=2, seq_q=seq_q, seq_k=seq_k, dim=128)
    q, k = 0.1 * q, 0.1 * k
    dev = [cp.asarray(x).astype("bfloat16") for x in (q, k, v)]
    host = [_host32(x) for x in dev]
    problem = describe(*dev, causal=causal, scale=None, layout="bhsd")
    out = cp.full(dev[0].shape, cp.nan, dtype=dev[0].dtype)
    lse = cp.full(dev[0].shape[:3], cp.nan, dtype=cp.float32)
    heads, rank = [0, 2, 3], 5
    lowrank.forward(problem, *dev, out, lse, heads, [rank] * 3, {"sinks": {2: [3]}})
    assert cp.isnan(out[:, 1].astype(cp.float32)).all() and cp.isnan(lse[:, 1]).all()
    ref_out = np.full(host[0].shape, np.nan, dtype=np.float32)
    ref_lse = np.full(host[0].shape[:3], np.nan, dtype=np.float32)
    host_problem = describe(*host, causal=causal, scale=None, layout="bhsd")
    lowrank.forward(host_problem, *host, ref_out, ref_lse, heads, [rank] * 3, {"sinks": {2: [3]}})
    assert rel_l2(out[:, heads], ref_out[:, heads]) < 1e-2  # bf16 output rounding
    finite = np.isfinite(ref_lse[:, heads])
    np.testing.assert_array_equal(np.isfinite(to_host64(lse[:, heads])), finite)
    np.testing.assert_allclose(to_host64(lse[:, heads])[finite], ref_lse[:, heads][finite], atol=1e-4)
    exact = aa.attention_reference(*dev, causal=causal)[0]
    assert rel_l2(out[:, heads], exact[:, heads]) < TOLERANCE
    rows = np.array([0, seq_q // 2, seq_q - 1])
    prepared = lowrank.prepare(problem, dev[1], dev[2], heads, rank, {2: [3]})
    rows_out, _ = lowrank.approximate_rows(problem, dev[0], rows, prepared)
    np.testing.assert_allclose(to_host64(rows_out), to_host64(out[:, heads][:, :, rows]), atol=1e-2)


@pytest.mark.parametrize("causal", [False, True])
def test_policy_dispatches_mixed_heads_on_gpu(cp, rng, causal):
    kinds = ["diffuse", "peaked", "sink", "random", "diffuse", "peaked", "sink", "random"]
    q, k, v = _heads(rng, kinds, seq=8192, dim=128)
    dev = [cp.asarray(x).astype("bfloat16") for x in (q, k, v)]
    report = aa.Report(measure_error=True)
    aa.attention(*dev, causal=causal, policy=RankPolicy(), report=report)
    paths = [head.path for head in report.plan.heads]
    heads = report.estimates["rank"]["heads"]
    assert paths == ["lowrank", "dense", "lowrank", "dense"] * 2, heads
    assert report.estimates["rank"]["transfers"] == 1  # no head retried: the plan synchronised once
    for h, (path, error) in enumerate(zip(paths, report.measured["error"])):
        assert error < (TOLERANCE if path == "lowrank" else 1e-2), (h, error, heads[h])


#: The fused low-rank kernel against the float32 path: it rounds the landmark means, P and out to the input dtype.
#: Bounds at about twice the errors of a NumPy emulation of that rounding (bf16: relative L2 of out 2.5e-3, lse
#: 8.3e-4; fp16: 3.4e-4 and 1.0e-4, over these shapes).
FUSED_TOLERANCE = {"bfloat16": (5e-3, 2e-3), "float16": (1e-3, 3e-4)}


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q,seq_k,rank,sinks", [(1, 1, 1, {}), (17, 17, 2, {2: [3]}), (127, 1000, 3, {}),
                                                     (1000, 127, 4, {0: [0, 5]}),
                                                     (4097, 4097, 8, {0: [17, 2000], 2: [4096]})])
def test_fused_lowrank_kernel_matches_the_float32_path(cp, rng, dtype, dim, causal, seq_q, seq_k, rank, sinks):
    """cuda_src/lowrank_fwd.cu against lowrank._all_rows (float32 batched matmuls) on the same prepared keys: odd
    sizes, Sq != Sk both ways (causal rows with no key: out 0, lse -inf), GQA, strided q and out (aligned, read
    and written in place), sinks, heads not listed left untouched; tolerances in FUSED_TOLERANCE."""
    from adaattn_core import cuda_lowrank

    q, k, v = make_qkv(rng, batch=2, heads_q=4, heads_kv=2, seq_q=seq_q, seq_k=seq_k, dim=dim, dtype=dtype,
                       contiguous=False, offset=8, xp=cp)
    problem = describe(q, k, v, causal=causal, scale=None, layout="bhsd")
    assert cuda_lowrank.unsupported_reason(problem) is None
    heads = [0, 2, 3]
    prepared = lowrank.prepare(problem, k, v, heads, rank, sinks)
    out_buffer = cp.full((2, 4, seq_q + 3, dim + 8), cp.nan, dtype=q.dtype)
    out = out_buffer[:, :, 2: 2 + seq_q, 8:]  # strides the kernel writes in place
    lse = cp.full(q.shape[:3], cp.nan, dtype=cp.float32)
    cuda_lowrank.forward(problem, q, out, lse, heads, prepared)
    assert cp.isnan(out[:, 1].astype(cp.float32)).all() and cp.isnan(lse[:, 1]).all()
    assert cp.isnan(out_buffer[:, :, :2].astype(cp.float32)).all()  # nothing written outside the view
    assert cp.isnan(out_buffer[..., :8].astype(cp.float32)).all()
    q_sel = lowrank._scaled(cp, cp.dtype(cp.float32), problem, q[:, heads])
    ref_out, ref_lse = lowrank._all_rows(cp, cp.dtype(cp.float32), prepared.geometry, causal, q_sel, prepared.keys)
    got_out, got_lse = to_host64(out[:, heads]), to_host64(lse[:, heads])
    ref_out, ref_lse = to_host64(ref_out), to_host64(ref_lse)
    assert np.isfinite(got_out).all()
    np.testing.assert_array_equal(np.isfinite(got_lse), np.isfinite(ref_lse))
    empty = ~np.isfinite(ref_lse)
    assert (got_out[empty] == 0).all()
    out_tol, lse_tol = FUSED_TOLERANCE[dtype]
    assert rel_l2(got_out, ref_out) <= out_tol
    np.testing.assert_allclose(got_lse[~empty], ref_lse[~empty], atol=lse_tol, rtol=0)


def test_fused_lowrank_is_the_default_and_reference_is_selectable(cp, rng, monkeypatch):
    """lowrank.forward takes the fused kernel for CuPy bf16 (its output differs from the float32 path's by the
    kernel's rounding, within 1e-2), the float32 path under ADAATTN_LOWRANK_KERNEL=reference, and names the
    variable for another value."""
    q, k, v = make_qkv(rng, batch=1, heads_q=2, seq_q=1000, dim=64, dtype="bfloat16", xp=cp)
    problem = describe(q, k, v, causal=True, scale=None, layout="bhsd")
    outs = {}
    for choice in ("auto", "reference"):
        monkeypatch.setenv("ADAATTN_LOWRANK_KERNEL", choice)
        assert (lowrank.fused_kernel(problem) is None) == (choice == "reference")
        out = cp.empty_like(q)
        lse = cp.empty(q.shape[:3], dtype=cp.float32)
        lowrank.forward(problem, q, k, v, out, lse, [0, 1], [4, 4], {})
        outs[choice] = to_host64(out)
    assert 0 < rel_l2(outs["auto"], outs["reference"]) <= 1e-2
    monkeypatch.setenv("ADAATTN_LOWRANK_KERNEL", "fused")
    with pytest.raises(ValueError, match="ADAATTN_LOWRANK_KERNEL"):
        lowrank.fused_kernel(problem)


@pytest.mark.parametrize("causal", [False, True])
def test_guard_runs_the_fused_forward_and_the_forward_copies_it(cp, rng, causal):
    """With the fused kernel the guard's rows come from the kernel's whole forward of the tried heads (within
    FUSED_TOLERANCE of approximate_rows' float32 rows), kept on the plan's prepared keys; lowrank.forward copies
    the rows of those heads from it (a marker written there comes out); end to end the low-rank heads match a
    fresh lowrank.forward of the same heads, ranks and sinks (up to the sinks' order) and the rank tolerance."""
    kinds = ["diffuse", "peaked", "sink", "diffuse"]
    q, k, v = _heads(rng, kinds, seq=4096, dim=128)
    dev = [cp.asarray(x).astype("bfloat16") for x in (q, k, v)]
    problem = describe(*dev, causal=causal, scale=None, layout="bhsd")
    plan = RankPolicy().plan(problem, *dev, None)
    low = [h for h, head in enumerate(plan.heads) if head.path == "lowrank"]
    assert {0, 3} <= set(low) and 1 not in low, plan.heads
    prepared = plan.artifacts["prepared"]
    assert sorted(h for p in prepared for h in p.heads) == low and all(p.output is not None for p in prepared)

    first = prepared[0]
    rows = estimators.probe_rows(problem, 8)
    fused_rows = lowrank.guard_rows(problem, dev[0], rows, first)
    float32_rows, _ = lowrank.approximate_rows(problem, dev[0], rows, first)
    assert rel_l2(fused_rows, float32_rows) <= FUSED_TOLERANCE["bfloat16"][0]

    heads = list(first.heads)
    first.output[0][:, heads] = 3
    first.output[1][:, heads] = -5
    out = cp.full(dev[0].shape, cp.nan, dtype=dev[0].dtype)
    lse = cp.full(dev[0].shape[:3], cp.nan, dtype=cp.float32)
    lowrank.forward(problem, *dev, out, lse, heads, [first.rank] * len(heads), {"prepared": [first]})
    assert (to_host64(out[:, heads]) == 3).all() and (to_host64(lse[:, heads]) == -5).all()
    others = [h for h in range(len(kinds)) if h not in heads]
    assert cp.isnan(out[:, others].astype(cp.float32)).all()

    report = aa.Report(measure_error=True)
    got = aa.attention(*dev, causal=causal, policy=RankPolicy(), report=report)
    assert [h.path for h in report.plan.heads] == [h.path for h in plan.heads]
    fresh = cp.empty_like(dev[0])
    fresh_lse = cp.empty(dev[0].shape[:3], dtype=cp.float32)
    lowrank.forward(problem, *dev, fresh, fresh_lse, low, [plan.heads[h].rank for h in low],
                    {"sinks": plan.artifacts["sinks"]})
    assert rel_l2(got[:, low], fresh[:, low]) <= 1e-3
    for h in low:
        assert report.measured["error"][h] < TOLERANCE, (h, report.measured["error"])


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("seq_q,seq_k,rank,sinks", [(1000, 1000, 4, {0: [3, 500]}), (127, 1000, 3, {2: [999]}),
                                                     (1000, 127, 2, {}), (4096, 4096, 8, {0: [0], 3: [17, 2000]})])
def test_landmark_kernels_match_the_array_path(cp, rng, monkeypatch, dtype, seq_q, seq_k, rank, sinks):
    """cuda_src/lowrank_landmarks.cu (lowrank.prepare where the fused kernel takes the problem) against
    lowrank._keys' array operations (ADAATTN_LOWRANK_KERNEL=reference) on the same inputs: GQA, strided k and v,
    grids padded for Sq > Sk and Sq < Sk, sinks (a mid-sequence one excluded from its block's landmark)."""
    q, k, v = make_qkv(rng, batch=2, heads_q=4, heads_kv=2, seq_q=seq_q, seq_k=seq_k, dim=64, dtype=dtype,
                       contiguous=False, offset=8, xp=cp)
    problem = describe(q, k, v, causal=True, scale=None, layout="bhsd")
    from adaattn_core import cuda_lowrank

    assert cuda_lowrank.unsupported_reason(problem) is None  # else both calls below take the array path
    heads = [0, 2, 3]
    monkeypatch.setenv("ADAATTN_LOWRANK_KERNEL", "reference")
    want = lowrank.prepare(problem, k, v, heads, rank, sinks).keys
    monkeypatch.setenv("ADAATTN_LOWRANK_KERNEL", "auto")
    got = lowrank.prepare(problem, k, v, heads, rank, sinks).keys
    for field in dataclasses.fields(got):
        a, b = to_host64(getattr(got, field.name)), to_host64(getattr(want, field.name))
        assert a.shape == b.shape, (field.name, a.shape, b.shape)
        np.testing.assert_array_equal(np.isfinite(a), np.isfinite(b), err_msg=field.name)
        finite = np.isfinite(b)
        np.testing.assert_allclose(a[finite], b[finite], rtol=1e-5, atol=1e-6, err_msg=field.name)


@pytest.mark.parametrize("causal", [False, True])
def test_head_statistics_kernel_matches_the_array_path(cp, rng, causal):
    """estimators.head_statistics' Numba kernel against its array path on one GPU probe: GQA, batch 2, a sink key
    (every query leans along u, key 5 is 40 u: a logit near 7 against ~2000 keys near 0, about a quarter of each
    row's mass), Sq > Sk (causal rows with no key)."""
    q, k, v = make_qkv(rng, batch=2, heads_q=4, heads_kv=2, seq_q=3000, seq_k=2000, dim=128)
    u = rng.standard_normal(128).astype(np.float32)
    u /= np.linalg.norm(u)
    q += 2 * u
    k[:, :, 5] = 40 * u
    q, k, v = (cp.asarray(x).astype("bfloat16") for x in (q, k, v))
    problem = describe(q, k, v, causal=causal, scale=None, layout="bhsd")
    rows = estimators.probe_rows(problem, 8)
    probe = estimators.probe(problem, q, k, v, rows)
    limits = problem.keys_seen(rows)
    args = (limits, 0.05, 0.2, 4)
    got = estimators.head_statistics(probe, *args, kernel=True)
    want = estimators.head_statistics(probe, *args, kernel=False)
    np.testing.assert_allclose(to_host64(got[0]), to_host64(want[0]), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(to_host64(got[1]), to_host64(want[1]))
    assert (to_host64(want[1])[:, 0] == 5).any()  # the planted sink is found
