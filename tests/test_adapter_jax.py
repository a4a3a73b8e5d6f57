"""JAX adapter: forward and gradients against jax.nn.dot_product_attention and the float64 reference, under jit.

CPU tests run in CI (pure_callback into the CPU backend); tests marked `gpu` run the buffer_callback path on
XLA's stream, held to flash-attention's accuracy rule (`conftest.assert_close_to_naive`).
"""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import (
    GRADIENT_FACTOR,
    assert_close_to_naive,
    close,
    make_qkv,
    max_abs,
    naive_same_dtype,
    rel_l2,
)

import adaattn_core as aa

os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
jax = pytest.importorskip("jax")
jnp = jax.numpy
ada = pytest.importorskip("adaattn_adapters.jax")


def _jax_sdpa(q, k, v, *, causal, layout, **kwargs):
    """jax.nn.dot_product_attention in our layout convention (it wants [B, T, N, H])."""
    if layout == "bhsd":
        q, k, v = (x.swapaxes(1, 2) for x in (q, k, v))
    out = jax.nn.dot_product_attention(q, k, v, is_causal=causal, **kwargs)
    return out.swapaxes(1, 2) if layout == "bhsd" else out


def _value_and_grads(fn, q, k, v, dout):
    out, vjp = jax.vjp(fn, q, k, v)
    return out, vjp(dout)


# --- CPU --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_jax_nn_under_jit(rng, layout, group, causal):
    """Sq == Sk (jax.nn's top-left causal mask equals our bottom-right one); forward and vjp under jit."""
    seq = int(rng.integers(1, 80))
    q, k, v = map(jnp.asarray, make_qkv(rng, heads_q=4, heads_kv=4 // group, seq_q=seq, dim=int(rng.choice([8, 32])),
                                        layout=layout))
    dout = jnp.asarray(rng.standard_normal(q.shape), jnp.float32)
    ours = jax.jit(lambda *a: _value_and_grads(lambda *x: ada.attention(*x, causal=causal, layout=layout), *a))
    theirs = jax.jit(lambda *a: _value_and_grads(lambda *x: _jax_sdpa(*x, causal=causal, layout=layout), *a))
    (out, grads), (ref, ref_grads) = ours(q, k, v, dout), theirs(q, k, v, dout)
    assert out.shape == q.shape and out.dtype == jnp.float32
    assert close(out, ref)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert g.shape == r.shape and close(g, r), name


@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("seq_q,seq_k", [(7, 40), (40, 7), (1, 33)])
def test_bottom_right_causal_matches_reference(rng, layout, seq_q, seq_k):
    arrays = make_qkv(rng, heads_q=4, heads_kv=2, seq_q=seq_q, seq_k=seq_k, dim=16, layout=layout)
    dout = rng.standard_normal(arrays[0].shape).astype(np.float32)
    fn = jax.jit(lambda *a: _value_and_grads(lambda *x: ada.attention(*x, causal=True, layout=layout), *a))
    out, grads = fn(*map(jnp.asarray, arrays), jnp.asarray(dout))
    ref, _ = aa.attention_reference(*arrays, causal=True, layout=layout)
    ref_grads = aa.attention_backward_reference(dout, *arrays, causal=True, layout=layout)
    assert rel_l2(np.asarray(out), ref) <= 1e-5
    for name, g, r in zip("qkv", grads, ref_grads):
        assert rel_l2(np.asarray(g), r) <= 1e-5, name


@pytest.mark.parametrize("causal", [False, True])
def test_check_grads_float64(rng, causal):
    from jax.test_util import check_grads

    with jax.enable_x64(True):
        q, k, v = map(jnp.asarray, make_qkv(rng, batch=1, heads_q=4, heads_kv=2, seq_q=5, seq_k=7, dim=4, layout="bshd",
                                            dtype="float64"))
        fn = jax.jit(lambda q, k, v: ada.attention(q, k, v, causal=causal, scale=0.7))
        assert fn(q, k, v).dtype == jnp.float64
        # Central differences with eps = 1e-6: truncation ~1e-12, rounding ~1e-10 (the default eps left
        # truncation errors near the tolerance on some random draws).
        check_grads(fn, (q, k, v), order=1, modes=["rev"], atol=1e-7, rtol=1e-7, eps=1e-6)


def test_grad_of_a_loss_under_jit(rng):
    q, k, v = map(jnp.asarray, make_qkv(rng, heads_q=4, heads_kv=1, seq_q=20, dim=16, layout="bshd"))

    def loss(fn, q, k, v):
        return jnp.sum(jnp.tanh(fn(q, k, v)))

    grads = jax.jit(jax.grad(lambda *a: loss(lambda *x: ada.attention(*x, causal=True), *a), argnums=(0, 1, 2)))
    ref = jax.grad(lambda *a: loss(lambda *x: jax.nn.dot_product_attention(*x, is_causal=True), *a), argnums=(0, 1, 2))
    for name, g, r in zip("qkv", grads(q, k, v), ref(q, k, v)):
        assert close(g, r), name


def test_bfloat16_on_cpu(rng):
    arrays = make_qkv(rng, heads_q=4, heads_kv=2, seq_q=50, seq_k=70, dim=32, dtype="bfloat16", layout="bshd")
    out = jax.jit(lambda *a: ada.attention(*a, causal=True))(*map(jnp.asarray, arrays))
    assert out.dtype == jnp.bfloat16
    ref, _ = aa.attention_reference(*arrays, causal=True, layout="bshd")
    naive = naive_same_dtype(*arrays, causal=True, layout="bshd")
    assert_close_to_naive(np.asarray(out), ref, naive)


def test_vmap(rng):
    q, k, v = map(jnp.asarray, make_qkv(rng, batch=3, heads_q=2, seq_q=9, dim=8))
    batched = jax.vmap(lambda q, k, v: ada.attention(q[None], k[None], v[None], layout="bhsd")[0])(q, k, v)
    assert close(batched, ada.attention(q, k, v, layout="bhsd"))


def test_core_errors_raise_at_trace_time(rng):
    q, k, v = map(jnp.asarray, make_qkv(rng, heads_q=3, heads_kv=2, seq_q=6, dim=8, layout="bshd"))
    with pytest.raises(ValueError, match="multiple"):
        jax.jit(ada.attention)(q, k, v)
    with pytest.raises(ValueError, match="layout"):
        ada.attention(q, k, v, layout="sbhd")
    with pytest.raises(TypeError, match="dtype"):
        ada.attention(q.astype(jnp.int32), k.astype(jnp.int32), v.astype(jnp.int32))
    with pytest.raises(ValueError, match="4-D"):
        jax.jit(ada.attention)(q[0], k[0], v[0])
    q, k, v = map(jnp.asarray, make_qkv(rng, heads_q=2, seq_q=6, dim=8, layout="bshd"))
    with pytest.raises(ValueError, match=r"policy must be one of .* got 'fastest'"):
        jax.jit(lambda *a: ada.attention(*a, policy="fastest"))(q, k, v)
    with pytest.raises(ValueError, match=r"policy must be one of .* got 'fastest'"):
        jax.grad(lambda q: ada.attention(q, k, v, policy="fastest").sum())(q)


# --- GPU --------------------------------------------------------------------------------------------------

def _gpu_bf16(rng, **shape):
    arrays = make_qkv(rng, dtype="float32", **shape)
    return [jax.device_put(jnp.asarray(a, jnp.bfloat16), jax.devices("gpu")[0]) for a in arrays]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bshd", "bhsd"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q,seq_k", [(256, 256), (100, 333), (333, 100)])
def test_gpu_bf16_forward_and_grads(rng, layout, causal, seq_q, seq_k):
    import cupy

    q, k, v = _gpu_bf16(rng, heads_q=8, heads_kv=2, seq_q=seq_q, seq_k=seq_k, dim=128, layout=layout)
    dout = jnp.asarray(rng.standard_normal(q.shape), jnp.bfloat16)
    fn = jax.jit(lambda *a: _value_and_grads(lambda *x: ada.attention(*x, causal=causal, layout=layout), *a))
    out, grads = fn(q, k, v, dout)
    host = [np.asarray(x, np.float64) for x in (q, k, v)]
    ref, _ = aa.attention_reference(*host, causal=causal, layout=layout)
    naive = naive_same_dtype(*(cupy.asarray(h).astype("bfloat16") for h in host), causal=causal, layout=layout)
    assert_close_to_naive(np.asarray(out), ref, naive)
    if seq_q == seq_k:
        cudnn = np.asarray(_jax_sdpa(q, k, v, causal=causal, layout=layout, implementation="cudnn"), np.float64)
        # As accurate as cuDNN by the same rule (its agreement with us follows from the naive check above).
        assert_close_to_naive(np.asarray(out), ref, cudnn, what="output, against cuDNN's error")
    ref_grads = aa.attention_backward_reference(np.asarray(dout, np.float64), *host, causal=causal, layout=layout)
    naive_fn = jax.jit(lambda *a: _value_and_grads(lambda *x: _naive_bf16(*x, causal=causal, layout=layout), *a))
    _, naive_grads = naive_fn(q, k, v, dout)
    for name, g, r, n in zip("qkv", grads, ref_grads, naive_grads):
        assert g.dtype == jnp.bfloat16, name
        assert_close_to_naive(np.asarray(g), r, np.asarray(n), what=f"d{name}", factor=GRADIENT_FACTOR)


def _naive_bf16(q, k, v, *, causal, layout):
    """Attention with every intermediate in the inputs' dtype (XLA's math path), the error baseline."""
    if layout == "bshd":
        q, k, v = (x.swapaxes(1, 2) for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    k, v = jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1)
    scores = (q @ k.swapaxes(-1, -2)) * jnp.asarray(q.shape[-1] ** -0.5, q.dtype)
    sq, sk = scores.shape[-2:]
    visible = jnp.tril(jnp.ones((sq, sk), bool), sk - sq) if causal else jnp.ones((sq, sk), bool)
    # Finite fill and a zeroing product: rows that see no key give 0 (and zero gradients), not NaN.
    probs = jax.nn.softmax(jnp.where(visible, scores, jnp.finfo(scores.dtype).min), axis=-1) * visible
    out = probs.astype(q.dtype) @ v
    return out.swapaxes(1, 2) if layout == "bshd" else out


@pytest.mark.gpu
def test_gpu_ordering_on_xla_stream(rng):
    """q is produced by a long chain of XLA matmuls in the same jit: the callback must wait for it on XLA's stream."""
    q, k, v = _gpu_bf16(rng, batch=2, heads_q=8, heads_kv=8, seq_q=2048, dim=64)
    x = jnp.asarray(rng.standard_normal((4096, 4096)) / 64, jnp.float32)

    def produce(q, x):
        for _ in range(30):
            x = jnp.tanh(x @ x)
        return q + (x.mean() * 1e-30).astype(q.dtype)

    chained = jax.jit(lambda q, k, v, x: ada.attention(produce(q, x), k, v, causal=True))
    expected = jax.jit(lambda *a: ada.attention(*a, causal=True))(jax.jit(produce)(q, x), k, v)
    assert max_abs(np.asarray(chained(q, k, v, x)), np.asarray(expected)) == 0.0
