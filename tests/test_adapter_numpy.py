"""NumPy adapter: host arrays in and out; the CPU backend here, the GPU (one copy each way) where there is one."""

from __future__ import annotations

import numpy as np
import pytest
from adaattn_adapters import numpy as ada
from conftest import assert_close_to_naive, make_qkv, naive_same_dtype, rel_l2

import adaattn_core as aa


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("causal", [False, True])
def test_forward_and_backward_match_reference(rng, layout, causal):
    q, k, v = make_qkv(rng, heads_q=4, heads_kv=2, seq_q=37, seq_k=51, dim=16, layout=layout)
    out, lse = ada.attention(q, k, v, causal=causal, layout=layout, return_lse=True)
    assert isinstance(out, np.ndarray) and isinstance(lse, np.ndarray)
    ref, ref_lse = aa.attention_reference(q, k, v, causal=causal, layout=layout)
    assert rel_l2(out, ref) <= 1e-5
    assert np.allclose(lse, ref_lse, rtol=1e-5, atol=1e-5)
    dout = rng.standard_normal(out.shape).astype(np.float32)
    grads = ada.attention_backward(dout, q, k, v, out, lse, causal=causal, layout=layout)
    for name, g, r in zip("qkv", grads, aa.attention_backward_reference(dout, q, k, v, causal=causal, layout=layout)):
        assert isinstance(g, np.ndarray) and rel_l2(g, r) <= 1e-5, name


def test_out_and_report(rng):
    q, k, v = make_qkv(rng, heads_q=2, seq_q=20, dim=8)
    out = np.full(q.shape, np.nan, dtype=q.dtype)
    report = aa.Report()
    result = ada.attention(q, k, v, out=out, report=report)
    assert result is out and np.isfinite(out).all()
    assert report.backend in (("cuda", "cupy-blocked") if ada.gpu_usable() else ("cpu",))


def test_lse_out_like_the_core(rng):
    """lse_out takes the core's meaning: written on every call, returned with return_lse."""
    q, k, v = make_qkv(rng, heads_q=2, seq_q=20, dim=8)
    lse_out = np.full(q.shape[:-1], np.nan, dtype=np.float32)
    out, lse = ada.attention(q, k, v, lse_out=lse_out, return_lse=True)
    assert lse is lse_out and np.isfinite(lse_out).all()
    np.testing.assert_allclose(lse_out, aa.attention_reference(q, k, v)[1], rtol=1e-5, atol=1e-5)
    written = np.full(q.shape[:-1], np.nan, dtype=np.float32)
    ada.attention(q, k, v, lse_out=written)
    np.testing.assert_array_equal(written, lse_out)
    with pytest.raises(ValueError, match="out must not share memory with q"):
        ada.attention(q, k, v, out=q)


def test_core_errors_propagate(rng):
    q, k, v = make_qkv(rng, heads_q=3, heads_kv=2, seq_q=6, dim=8)
    with pytest.raises(ValueError, match="multiple"):
        ada.attention(q, k, v)
    with pytest.raises(TypeError, match="numpy"):
        ada.attention(q.tolist(), k, v)
    q, k, v = make_qkv(rng, heads_q=2, seq_q=6, dim=8)
    with pytest.raises(ValueError, match=r"policy must be one of .* got 'fastest'"):
        ada.attention(q, k, v, policy="fastest")
    out, lse = ada.attention(q, k, v, return_lse=True)
    with pytest.raises(TypeError, match=r"deterministic must be True or False, got 'yes' \(builtins.str\)"):
        ada.attention_backward(out, q, k, v, out, lse, deterministic="yes")
    grads = ada.attention_backward(out, q, k, v, out, lse)
    for g, d in zip(grads, ada.attention_backward(out, q, k, v, out, lse, deterministic=True)):
        np.testing.assert_array_equal(g, d)


# --- GPU --------------------------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_gpu_runs_on_the_device(rng, dtype):
    assert ada.gpu_usable()
    q, k, v = make_qkv(rng, heads_q=8, heads_kv=2, seq_q=300, seq_k=257, dim=128, dtype=dtype, layout="bshd")
    report = aa.Report()
    out, lse = ada.attention(q, k, v, causal=True, layout="bshd", return_lse=True, report=report)
    assert report.backend == ("cuda" if dtype == "bfloat16" else "cupy-blocked")
    assert isinstance(out, np.ndarray) and out.dtype == q.dtype and lse.dtype == np.float32
    ref, _ = aa.attention_reference(q, k, v, causal=True, layout="bshd")
    if dtype == "bfloat16":
        assert_close_to_naive(out, ref, naive_same_dtype(q, k, v, causal=True, layout="bshd"))
    else:
        assert rel_l2(out, ref) <= 1e-5
    dout = rng.standard_normal(out.shape).astype(out.dtype)
    grads = ada.attention_backward(dout, q, k, v, out, lse, causal=True, layout="bshd")
    ref_grads = aa.attention_backward_reference(dout, q, k, v, causal=True, layout="bshd")
    for name, g, r in zip("qkv", grads, ref_grads):
        assert isinstance(g, np.ndarray) and g.dtype == q.dtype, name
        assert rel_l2(g, r) <= (1e-2 if dtype == "bfloat16" else 1e-5), name


@pytest.mark.gpu
def test_gpu_out_strided_and_errors_before_transfer(rng):
    q, k, v = make_qkv(rng, heads_q=4, seq_q=64, dim=64, dtype="float32")
    buffer = np.full((2, 4, 64, 80), np.nan, dtype=np.float32)
    out = buffer[..., 8:72]
    assert ada.attention(q, k, v, out=out) is out
    assert rel_l2(out, aa.attention_reference(q, k, v)[0]) <= 1e-5
    with pytest.raises(ValueError, match="out"):
        ada.attention(q, k, v, out=buffer)
