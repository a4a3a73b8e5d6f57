"""CPU backend forward against the float64 reference over shapes, GQA, causal, layouts and strides."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close_to_naive, make_qkv, max_abs, naive_same_dtype, rel_l2

import adaattn_core as aa

SEQ_PAIRS = [(1, 1), (17, 17), (127, 127), (1000, 1000), (17, 127), (127, 17), (1, 1000)]
HEAD_DIMS = [16, 24, 64, 100, 128, 256]
GROUPS = [1, 2, 8]
TOLERANCE = {"float32": 1e-5, "float64": 1e-12}


def _check_against_reference(q, k, v, *, causal, layout, dtype):
    out, lse = aa.attention(q, k, v, causal=causal, layout=layout, return_lse=True)
    ref_out, ref_lse = aa.attention_reference(q, k, v, causal=causal, layout=layout)
    assert out.dtype == q.dtype and out.shape == q.shape[:-1] + (v.shape[-1],)
    assert lse.shape == (ref_lse.shape) and lse.dtype == (np.float64 if dtype == "float64" else np.float32)
    assert not np.isnan(np.asarray(out, dtype=np.float64)).any()
    assert rel_l2(out, ref_out) <= TOLERANCE[dtype]
    finite = np.isfinite(ref_lse)
    np.testing.assert_array_equal(np.isfinite(lse), finite)
    assert max_abs(lse[finite], ref_lse[finite]) <= 10 * TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q,seq_k", SEQ_PAIRS)
def test_seqlens(rng, seq_q, seq_k, causal, dtype):
    q, k, v = make_qkv(rng, batch=1, heads_q=4, heads_kv=2, seq_q=seq_q, seq_k=seq_k, dim=32, dtype=dtype)
    _check_against_reference(q, k, v, causal=causal, layout="bhsd", dtype=dtype)


@pytest.mark.parametrize("dim", HEAD_DIMS)
@pytest.mark.parametrize("group", GROUPS)
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims_and_gqa(rng, dim, group, causal):
    q, k, v = make_qkv(rng, batch=2, heads_q=8, heads_kv=8 // group, seq_q=45, seq_k=70, dim=dim)
    _check_against_reference(q, k, v, causal=causal, layout="bhsd", dtype="float32")


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("contiguous", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_layouts_and_strides(rng, layout, contiguous, causal):
    q, k, v = make_qkv(rng, heads_q=4, heads_kv=2, seq_q=129, seq_k=77, dim=40, layout=layout,
                       contiguous=contiguous, dtype="float64")
    _check_against_reference(q, k, v, causal=causal, layout=layout, dtype="float64")


def test_layouts_agree(rng):
    q, k, v = make_qkv(rng, seq_q=50, seq_k=60, dim=16, layout="bhsd")
    as_bshd = [np.ascontiguousarray(x.transpose(0, 2, 1, 3)) for x in (q, k, v)]
    out = aa.attention(q, k, v, causal=True)
    out_bshd = aa.attention(*as_bshd, causal=True, layout="bshd")
    np.testing.assert_array_equal(out, out_bshd.transpose(0, 2, 1, 3))


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
@pytest.mark.parametrize("causal", [False, True])
def test_half_precision_within_twice_naive(rng, dtype, causal):
    """Flash-attention's accuracy rule against a naive same-dtype implementation (`conftest.assert_close_to_naive`)."""
    q, k, v = make_qkv(rng, heads_q=4, heads_kv=1, seq_q=127, seq_k=300, dim=64, dtype=dtype)
    ref, _ = aa.attention_reference(q, k, v, causal=causal)
    out = aa.attention(q, k, v, causal=causal)
    naive = naive_same_dtype(q, k, v, causal=causal, layout="bhsd")
    assert out.dtype == q.dtype
    assert_close_to_naive(out, ref, naive)


def test_scale_is_applied(rng):
    q, k, v = make_qkv(rng, seq_q=20, dim=16, dtype="float64")
    ref, _ = aa.attention_reference(q, k, v, scale=0.37)
    assert rel_l2(aa.attention(q, k, v, scale=0.37), ref) <= 1e-12
    assert rel_l2(aa.attention(q, k, v), ref) > 1e-3


def test_fully_masked_rows_are_zero_not_nan(rng):
    """Causal with Sq > Sk: the first Sq - Sk rows see no key."""
    q, k, v = make_qkv(rng, seq_q=40, seq_k=9, dim=16)
    out, lse = aa.attention(q, k, v, causal=True, return_lse=True)
    assert np.all(out[:, :, :31] == 0) and np.all(np.isneginf(lse[:, :, :31]))
    assert np.all(np.isfinite(out)) and np.all(np.isfinite(lse[:, :, 31:]))


def test_out_argument_is_fully_written(rng):
    q, k, v = make_qkv(rng, seq_q=33, seq_k=47, dim=16, layout="bshd")
    out = np.full(q.shape, np.nan, dtype=q.dtype)
    returned = aa.attention(q, k, v, causal=True, layout="bshd", out=out)
    assert returned is out and np.isfinite(out).all()
    np.testing.assert_allclose(out, aa.attention(q, k, v, causal=True, layout="bshd"), rtol=0, atol=0)


def test_zero_sized_dimensions(rng):
    q, k, v = make_qkv(rng, seq_q=0, seq_k=5, dim=8)
    out, lse = aa.attention(q, k, v, return_lse=True)
    assert out.shape == (2, 4, 0, 8) and lse.shape == (2, 4, 0)
    q, k, v = make_qkv(rng, seq_q=6, seq_k=0, dim=8)
    out, lse = aa.attention(q, k, v, return_lse=True)
    assert np.all(out == 0) and np.all(np.isneginf(lse))
    q, k, v = make_qkv(rng, batch=0, seq_q=6, dim=8)
    assert aa.attention(q, k, v).shape == (0, 4, 6, 8)


def test_report_records_exact_plan(rng):
    q, k, v = make_qkv(rng, heads_q=6, heads_kv=3, seq_q=10, dim=8)
    report = aa.Report()
    aa.attention(q, k, v, report=report)
    assert report.backend == "cpu" and report.policy == "exact" and report.device == "cpu"
    assert report.decisions() == {"dense/float32": list(range(6))}
    assert report.estimates == {}


@pytest.mark.parametrize("causal", [False, True])
def test_mixed_plan_dispatches_dense_heads_by_subset(rng, causal):
    """A plan that sends only some heads to the dense path computes those heads alone, as the full call would."""
    from adaattn_core import backends
    from adaattn_core.problem import describe

    q, k, v = make_qkv(rng, batch=2, heads_q=6, heads_kv=3, seq_q=33, seq_k=47, dim=16, dtype="float32")
    full, full_lse = aa.attention(q, k, v, causal=causal, return_lse=True)
    heads = sorted(int(h) for h in rng.choice(6, size=4, replace=False))
    out = np.full(full.shape, np.nan, dtype=full.dtype)
    lse = np.full(full_lse.shape, np.nan, dtype=full_lse.dtype)
    problem = describe(q, k, v, causal=causal, scale=None, layout="bhsd")
    backends._blocked_heads(problem, heads, q, k, v, out, lse)
    others = [h for h in range(6) if h not in heads]
    assert np.isnan(out[:, others]).all() and np.isnan(lse[:, others]).all()
    np.testing.assert_allclose(out[:, heads], full[:, heads], rtol=0, atol=1e-6)
    np.testing.assert_allclose(lse[:, heads], full_lse[:, heads], rtol=0, atol=1e-5)
