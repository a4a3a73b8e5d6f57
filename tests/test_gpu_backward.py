"""GPU fused backward (cuda_src/attention_bwd_*.cu through `adaattn_core.cuda_backward`) against float64.

Rule (flash-attention's, `conftest.assert_close_to_naive`): per gradient, max |grad − ref| ≤ 3 × max |naive
same-dtype − ref| + 1e-5 (3×, not the output's 2×, as in FlashAttention-2's tests), with ref from
`attention_backward_reference` in float64 on the GPU and the naive baseline below (every intermediate rounded to
the input dtype). The launcher is called directly with NaN-poisoned output buffers, so an
unwritten element fails the test; both dQ paths (atomic default, deterministic) are covered, the atomic one
with each dK/dV kernel forced in turn (mma.sync, and on Hopper the wgmma kernel where it has tiles).
"""

from __future__ import annotations

import math
import os
from typing import Any

import numpy as np
import pytest
from conftest import GRADIENT_FACTOR, assert_close_to_naive, forced_kernel, make_qkv, max_abs, to_host64

import adaattn_core as aa
from adaattn_core.problem import describe_backward, to_bhsd

pytestmark = pytest.mark.gpu

SEQ_PAIRS = [(1, 1), (17, 17), (128, 128), (129, 129), (1000, 1000), (17, 1000), (1000, 17), (128, 129),
             (129, 1)]
HEAD_DIMS = [32, 64, 96, 128, 192, 256]


@pytest.fixture(scope="module", params=["sm80", "sm90"])
def cp(request):
    """CuPy, with each dK/dV kernel forced in turn ($ADAATTN_BACKWARD_KERNEL): mma.sync, and the wgmma kernel
    (Hopper, head dims 64/128, deterministic=False; elsewhere the same mma.sync kernels run)."""
    cupy = pytest.importorskip("cupy")
    from adaattn_core import cuda_backward

    with forced_kernel("ADAATTN_BACKWARD_KERNEL", request.param, cuda_backward._plan):
        yield cupy


def _is_sm90_run(cp: Any, dim: int, deterministic: bool) -> bool:
    """Whether the wgmma dK/dV kernel runs under the current fixture parameter."""
    from adaattn_core.launch_config import BACKWARD_TILES_SM90

    return (os.environ.get("ADAATTN_BACKWARD_KERNEL") == "sm90" and not deterministic and dim in BACKWARD_TILES_SM90
            and cp.cuda.Device().compute_capability == "90")


def naive_backward_same_dtype(dout: Any, q: Any, k: Any, v: Any, *, causal: bool, layout: str) -> tuple[Any, ...]:
    """(dq, dk, dv) of a naive implementation that stores S, P, O, dP and dS in the input dtype.

    Matmuls accumulate in float32 (as a tensor-core GEMM does); dk, dv are summed over each GQA group.
    """
    import cupy

    dtype = q.dtype

    def rounded(x: Any) -> Any:
        return x.astype(dtype).astype(cupy.float32)

    qb, kb, vb, dob = (to_bhsd(x, layout).astype(cupy.float32) for x in (q, k, v, dout))
    batch, heads_q, seq_q, dim = qb.shape
    heads_kv, seq_k = kb.shape[1], kb.shape[2]
    group = heads_q // heads_kv
    kb, vb = cupy.repeat(kb, group, axis=1), cupy.repeat(vb, group, axis=1)
    scale = np.float32(1 / math.sqrt(dim))
    scores = rounded(qb @ kb.swapaxes(-1, -2) * scale)
    if causal:
        visible = cupy.arange(seq_k)[None, :] <= cupy.arange(seq_q)[:, None] + (seq_k - seq_q)
        scores = cupy.where(visible, scores, -cupy.inf)
    row_max = scores.max(axis=-1, keepdims=True)
    weights = cupy.exp(scores - cupy.where(cupy.isneginf(row_max), 0, row_max))
    total = weights.sum(axis=-1, keepdims=True)
    probs = rounded(weights / cupy.where(total > 0, total, 1))
    out = rounded(probs @ vb)
    dprobs = rounded(dob @ vb.swapaxes(-1, -2))
    delta = (dob * out).sum(axis=-1, keepdims=True)
    dscores = rounded(probs * (dprobs - delta))
    dq = dscores @ kb * scale
    dk = (dscores.swapaxes(-1, -2) @ qb * scale).reshape(batch, heads_kv, group, seq_k, dim).sum(axis=2)
    dv = (probs.swapaxes(-1, -2) @ dob).reshape(batch, heads_kv, group, seq_k, dim).sum(axis=2)
    return tuple(to_bhsd(g.astype(dtype), layout) for g in (dq, dk, dv))


def _like(x: Any, rng: np.random.Generator, cp: Any, *, contiguous: bool = True, offset: int = 3) -> Any:
    """A random array with x's shape and dtype; with `contiguous=False`, a strided view as make_qkv makes."""
    if contiguous:
        return cp.asarray(rng.standard_normal(x.shape), dtype=cp.float32).astype(x.dtype)
    padded = cp.asarray(rng.standard_normal((2 * x.shape[0], *x.shape[1:3], x.shape[3] + 16)), dtype=cp.float32)
    return padded.astype(x.dtype)[::2, ..., offset : offset + x.shape[3]]


def _poisoned(x: Any, cp: Any, *, offset: int | None = None) -> Any:
    """NaN-filled output buffer shaped like x: contiguous, or (offset given) a strided view of a larger buffer
    starting `offset` elements into a padded last axis (3: misaligned, written through a temporary)."""
    if offset is None:
        return cp.full(x.shape, cp.nan, dtype=x.dtype)
    padded = cp.full((2 * x.shape[0], *x.shape[1:3], x.shape[3] + 16), cp.nan, dtype=x.dtype)
    return padded[::2, ..., offset : offset + x.shape[3]]


def _fused_backward(cp: Any, dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any, *, causal: bool, layout: str,
                    deterministic: bool, grad_offset: int | None = None) -> tuple[Any, Any, Any]:
    from adaattn_core import cuda_backward

    problem = describe_backward(dout, q, k, v, out, lse, causal=causal, scale=None, layout=layout)
    sm90 = _is_sm90_run(cp, problem.head_dim, deterministic)
    if os.environ.get("ADAATTN_BACKWARD_KERNEL") == "sm90" and not sm90:
        pytest.skip("no wgmma kernel for this case: the sm80 run covers the kernels that run")
    assert cuda_backward.unsupported_reason(problem) is None
    plan = cuda_backward._plan(problem, cp.cuda.runtime.getDevice(), deterministic)
    expected = "attention_bwd_dkdv_sm90<" if sm90 else "attention_bwd_dkdv<"
    assert plan.dkdv_name.startswith(expected), plan.dkdv_name
    grads = tuple(_poisoned(x, cp, offset=grad_offset) for x in (q, k, v))
    views = [to_bhsd(x, layout) for x in (dout, q, k, v, out)]
    cuda_backward.backward(problem, *views, lse, *(to_bhsd(g, layout) for g in grads), deterministic=deterministic)
    return grads


def _check(cp: Any, rng: np.random.Generator, q: Any, k: Any, v: Any, *, causal: bool, layout: str,
           deterministic: bool, grad_offset: int | None = None, dout: Any = None) -> None:
    out, lse = aa.attention(q, k, v, causal=causal, layout=layout, return_lse=True)
    dout = _like(out, rng, cp) if dout is None else dout
    grads = _fused_backward(cp, dout, q, k, v, out, lse, causal=causal, layout=layout, deterministic=deterministic,
                            grad_offset=grad_offset)
    refs = aa.attention_backward_reference(dout, q, k, v, causal=causal, layout=layout)
    naives = naive_backward_same_dtype(dout, q, k, v, causal=causal, layout=layout)
    for name, grad, ref, naive in zip(("dq", "dk", "dv"), grads, refs, naives):
        assert np.isfinite(to_host64(grad)).all(), f"{name}: unwritten (NaN-poisoned) or non-finite element"
        assert_close_to_naive(grad, ref, naive, what=name, factor=GRADIENT_FACTOR)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dim", HEAD_DIMS)
@pytest.mark.parametrize("seq_q,seq_k", SEQ_PAIRS)
def test_shapes(cp, rng, seq_q, seq_k, dim, causal, dtype, deterministic):
    q, k, v = make_qkv(rng, batch=1, heads_q=4, heads_kv=2, seq_q=seq_q, seq_k=seq_k, dim=dim, dtype=dtype, xp=cp)
    _check(cp, rng, q, k, v, causal=causal, layout="bhsd", deterministic=deterministic)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("strides", ["contiguous", "aligned-slice", "misaligned-slice"])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_layouts_strides(cp, rng, group, layout, strides, dim, causal, deterministic):
    contiguous = strides == "contiguous"
    offset = 8 if strides == "aligned-slice" else 3
    q, k, v = make_qkv(rng, batch=2, heads_q=8, heads_kv=8 // group, seq_q=300, seq_k=257, dim=dim,
                       dtype="bfloat16", layout=layout, contiguous=contiguous, offset=offset, xp=cp)
    dout = _like(cp.empty(q.shape, dtype=q.dtype), rng, cp, contiguous=contiguous, offset=offset)
    _check(cp, rng, q, k, v, causal=causal, layout=layout, deterministic=deterministic,
           grad_offset=None if contiguous else offset, dout=dout)


@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_long_gqa(cp, rng, dim, causal):
    """Many query tiles and two query heads per key/value head accumulated into each dK/dV tile."""
    q, k, v = make_qkv(rng, batch=1, heads_q=4, heads_kv=2, seq_q=2048, seq_k=2048, dim=dim, dtype="bfloat16",
                       xp=cp)
    _check(cp, rng, q, k, v, causal=causal, layout="bhsd", deterministic=False)


def test_many_heads_and_batches(cp, rng):
    q, k, v = make_qkv(rng, batch=16, heads_q=32, heads_kv=8, seq_q=77, seq_k=140, dim=64, dtype="float16",
                       layout="bshd", xp=cp)
    _check(cp, rng, q, k, v, causal=True, layout="bshd", deterministic=False)


@pytest.mark.parametrize("deterministic", [False, True])
def test_fully_masked_rows(cp, rng, deterministic):
    """Causal with Sq > Sk: rows before Sq − Sk see no key (lse = −inf); their dq is exactly 0."""
    q, k, v = make_qkv(rng, seq_q=300, seq_k=40, dim=128, dtype="bfloat16", xp=cp)
    out, lse = aa.attention(q, k, v, causal=True, return_lse=True)
    dout = _like(out, rng, cp)
    dq, dk, dv = _fused_backward(cp, dout, q, k, v, out, lse, causal=True, layout="bhsd", deterministic=deterministic)
    assert bool((dq[:, :, :260] == 0).all())
    for grad in (dq, dk, dv):
        assert bool(cp.isfinite(grad.astype(cp.float32)).all())


@pytest.mark.parametrize("deterministic", [False, True])
def test_reproducible(cp, rng, deterministic):
    """deterministic=True: 10 runs give identical bits for dq, dk, dv. Default: dk and dv still do (no
    atomics there); dq may differ in the last bits (fp32 atomics in varying order)."""
    q, k, v = make_qkv(rng, batch=2, heads_q=8, heads_kv=2, seq_q=1000, seq_k=1000, dim=128, dtype="bfloat16",
                       xp=cp)
    out, lse = aa.attention(q, k, v, causal=True, return_lse=True)
    dout = _like(out, rng, cp)
    runs = [_fused_backward(cp, dout, q, k, v, out, lse, causal=True, layout="bhsd", deterministic=deterministic)
            for _ in range(10)]
    first = [g.view(cp.uint16) for g in runs[0]]
    for grads in runs[1:]:
        checked = grads if deterministic else grads[1:]
        reference = first if deterministic else first[1:]
        for grad, ref in zip(checked, reference):
            assert bool((grad.view(cp.uint16) == ref).all())


@pytest.mark.parametrize("deterministic", [False, True])
def test_workspace_is_the_only_allocation(cp, rng, deterministic):
    """Contiguous inputs and outputs: one allocation, the documented workspace (no S×S buffer)."""
    from cupy.cuda import memory_hook

    from adaattn_core.launch_config import BACKWARD_ROW_PAD

    class Count(memory_hook.MemoryHook):
        name = "count"

        def __init__(self):
            self.sizes = []

        def malloc_preprocess(self, **kwargs):
            self.sizes.append(kwargs["size"])

    batch, heads, seq, dim = 2, 8, 1024, 128
    q, k, v = make_qkv(rng, batch=batch, heads_q=heads, heads_kv=2, seq_q=seq, dim=dim, dtype="bfloat16", xp=cp)
    out, lse = aa.attention(q, k, v, causal=True, return_lse=True)
    dout = _like(out, rng, cp)
    _fused_backward(cp, dout, q, k, v, out, lse, causal=True, layout="bhsd", deterministic=deterministic)
    grads = tuple(cp.empty_like(x) for x in (q, k, v))
    problem = describe_backward(dout, q, k, v, out, lse, causal=True, scale=None, layout="bhsd")
    cp.get_default_memory_pool().free_all_blocks()
    hook = Count()
    from adaattn_core import cuda_backward

    with hook:
        cuda_backward.backward(problem, dout, q, k, v, out, lse, *grads, deterministic=deterministic)
    rows = batch * heads * -(-seq // BACKWARD_ROW_PAD) * BACKWARD_ROW_PAD
    floats = 2 * rows + (0 if deterministic else rows * dim)
    assert len(hook.sizes) == 1 and hook.sizes[0] >= 4 * floats, hook.sizes
    assert hook.sizes[0] < 4 * floats + 1024, hook.sizes


def test_runs_on_current_stream_without_sync(cp, rng):
    q, k, v = make_qkv(rng, seq_q=2048, dim=64, dtype="bfloat16", xp=cp)
    out, lse = aa.attention(q, k, v, return_lse=True)
    dout = _like(out, rng, cp)
    expected = _fused_backward(cp, dout, q, k, v, out, lse, causal=False, layout="bhsd", deterministic=True)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        grads = _fused_backward(cp, dout, q, k, v, out, lse, causal=False, layout="bhsd", deterministic=True)
    stream.synchronize()
    for grad, ref in zip(grads, expected):
        assert max_abs(grad, ref) == 0.0


def test_public_api(cp, rng):
    """`attention_backward` on CuPy bf16 gives gradients within the same bound, whichever backend runs it."""
    q, k, v = make_qkv(rng, heads_q=8, heads_kv=2, seq_q=200, seq_k=333, dim=128, dtype="bfloat16",
                       layout="bshd", xp=cp)
    out, lse = aa.attention(q, k, v, causal=True, layout="bshd", return_lse=True)
    dout = _like(out, rng, cp)
    grads = aa.attention_backward(dout, q, k, v, out, lse, causal=True, layout="bshd")
    refs = aa.attention_backward_reference(dout, q, k, v, causal=True, layout="bshd")
    naives = naive_backward_same_dtype(dout, q, k, v, causal=True, layout="bshd")
    for name, grad, ref, naive in zip(("dq", "dk", "dv"), grads, refs, naives):
        assert_close_to_naive(grad, ref, naive, what=name, factor=GRADIENT_FACTOR)


@pytest.mark.parametrize("dtype,dim", [("float32", 64), ("bfloat16", 80)])
def test_unsupported(cp, rng, dtype, dim):
    from adaattn_core import cuda_backward

    q, k, v = make_qkv(rng, seq_q=16, dim=dim, dtype=dtype, xp=cp)
    out, lse = aa.attention(q, k, v, return_lse=True)
    problem = describe_backward(out, q, k, v, out, lse, causal=False, scale=None, layout="bhsd")
    assert cuda_backward.unsupported_reason(problem) is not None
