"""CPU backend backward against float64 formulas and finite differences."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import make_qkv, max_abs, naive_same_dtype, rel_l2

import adaattn_core as aa


def _grads(rng, q, k, v, *, causal, layout="bhsd", scale=None):
    out, lse = aa.attention(q, k, v, causal=causal, layout=layout, scale=scale, return_lse=True)
    dout = rng.standard_normal(out.shape).astype(out.dtype)
    grads = aa.attention_backward(dout, q, k, v, out, lse, causal=causal, layout=layout, scale=scale)
    ref = aa.attention_backward_reference(dout, q, k, v, causal=causal, layout=layout, scale=scale)
    return dout, grads, ref


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q,seq_k", [(1, 1), (17, 17), (127, 127), (17, 300), (300, 17), (1000, 1000)])
def test_float64_matches_reference(rng, seq_q, seq_k, causal):
    q, k, v = make_qkv(rng, batch=1, heads_q=4, heads_kv=2, seq_q=seq_q, seq_k=seq_k, dim=24, dtype="float64")
    _, grads, ref = _grads(rng, q, k, v, causal=causal)
    for name, g, r in zip("qkv", grads, ref):
        assert g.shape == r.shape and g.dtype == np.float64, name
        assert np.isfinite(g).all(), name
        assert rel_l2(g, r) <= 1e-12, name


@pytest.mark.parametrize("dim", [16, 64, 128, 256])
@pytest.mark.parametrize("group", [1, 2, 8])
@pytest.mark.parametrize("causal", [False, True])
def test_float32_head_dims_gqa(rng, dim, group, causal):
    q, k, v = make_qkv(rng, heads_q=8, heads_kv=8 // group, seq_q=70, seq_k=50, dim=dim)
    _, grads, ref = _grads(rng, q, k, v, causal=causal)
    for name, g, r in zip("qkv", grads, ref):
        assert g.dtype == np.float32, name
        assert rel_l2(g, r) <= 1e-5, name


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("contiguous", [True, False])
def test_layouts_and_strides(rng, layout, contiguous):
    q, k, v = make_qkv(rng, heads_q=4, heads_kv=2, seq_q=65, seq_k=129, dim=32, layout=layout,
                       contiguous=contiguous, dtype="float64")
    _, grads, ref = _grads(rng, q, k, v, causal=True, layout=layout, scale=0.3)
    for name, g, r, x in zip("qkv", grads, ref, (q, k, v)):
        assert g.shape == x.shape, name
        assert rel_l2(g, r) <= 1e-12, name


@pytest.mark.parametrize("causal", [False, True])
def test_finite_differences(rng, causal):
    """Directional derivative of <dout, attention(q, k, v)> by central differences in float64."""
    q, k, v = make_qkv(rng, batch=1, heads_q=4, heads_kv=2, seq_q=9, seq_k=13, dim=8, dtype="float64")
    dout, grads, _ = _grads(rng, q, k, v, causal=causal)
    directions = [rng.standard_normal(x.shape) for x in (q, k, v)]
    eps = 1e-6

    def loss(step):
        shifted = [x + step * d for x, d in zip((q, k, v), directions)]
        return float((aa.attention(*shifted, causal=causal) * dout).sum())

    numeric = (loss(eps) - loss(-eps)) / (2 * eps)
    analytic = sum(float((g * d).sum()) for g, d in zip(grads, directions))
    assert abs(numeric - analytic) <= 1e-6 * max(1.0, abs(analytic))


def test_fully_masked_rows_have_finite_zero_grads(rng):
    q, k, v = make_qkv(rng, seq_q=30, seq_k=7, dim=16)
    _, (dq, dk, dv), _ = _grads(rng, q, k, v, causal=True)
    assert all(np.isfinite(g).all() for g in (dq, dk, dv))
    assert np.all(dq[:, :, :23] == 0)


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision(rng, dtype):
    q, k, v = make_qkv(rng, heads_q=4, heads_kv=2, seq_q=64, seq_k=96, dim=32, dtype=dtype)
    _, grads, ref = _grads(rng, q, k, v, causal=True)
    for name, g, r in zip("qkv", grads, ref):
        assert g.dtype == q.dtype, name
        assert rel_l2(g, r) <= 1e-2, name


def test_backward_with_empty_batch(rng):
    q, k, v = make_qkv(rng, batch=0, seq_q=5, dim=8)
    out, lse = aa.attention(q, k, v, return_lse=True)
    dq, dk, dv = aa.attention_backward(out, q, k, v, out, lse)
    assert dq.shape == q.shape and dk.shape == k.shape and dv.shape == v.shape


def test_naive_baseline_is_a_real_baseline(rng):
    """Guard the test helper: the same-dtype naive result must differ from float64 but stay close."""
    q, k, v = make_qkv(rng, seq_q=64, dim=32, dtype="bfloat16")
    ref, _ = aa.attention_reference(q, k, v)
    err = max_abs(naive_same_dtype(q, k, v, causal=False, layout="bhsd"), ref)
    assert 1e-4 < err < 1e-1
