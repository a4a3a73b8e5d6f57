"""PyTorch adapter: forward and gradients against torch SDPA and the float64 reference, torch.compile, errors.

CPU tests run in CI; tests marked `gpu` run on CUDA tensors, held to flash-attention's accuracy rule
(`conftest.assert_close_to_naive`), plus stream ordering and zero-copy checks.
"""

from __future__ import annotations

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
    to_host64,
)

import adaattn_core as aa

torch = pytest.importorskip("torch")
F = torch.nn.functional
ada = pytest.importorskip("adaattn_adapters.torch")


def _tensors(arrays, *, device="cpu", dtype=None, grad=False):
    out = []
    for a in arrays:
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float64)).to(device)
        t = t.to(dtype) if dtype is not None else t.to(getattr(torch, a.dtype.name))
        out.append(t.requires_grad_(grad))
    return out


def _sdpa(q, k, v, *, causal=False, layout="bhsd"):
    """torch SDPA in our layout convention (it wants [B, H, S, D])."""
    if layout == "bshd":
        return _sdpa(*(x.transpose(1, 2) for x in (q, k, v)), causal=causal).transpose(1, 2)
    return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=q.shape[1] != k.shape[1])


def _grads(fn, inputs, dout):
    for x in inputs:
        x.grad = None
    out = fn(*inputs)
    out.backward(dout)
    return out.detach(), [x.grad.clone() for x in inputs]


# --- CPU --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("causal", [False, True])
def test_matches_sdpa_float32(rng, layout, group, causal):
    """Sq == Sk, where SDPA's top-left causal mask equals our bottom-right one."""
    seq = int(rng.integers(1, 80))
    arrays = make_qkv(rng, heads_q=4, heads_kv=4 // group, seq_q=seq, dim=int(rng.choice([8, 32, 64])), layout=layout)
    q, k, v = _tensors(arrays, grad=True)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(int(rng.integers(1 << 31))))
    out, grads = _grads(lambda *a: ada.attention(*a, causal=causal, layout=layout), (q, k, v), dout)
    ref, ref_grads = _grads(lambda *a: _sdpa(*a, causal=causal, layout=layout), (q, k, v), dout)
    assert out.shape == q.shape and out.dtype == torch.float32
    assert close(out, ref)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert close(g, r), name


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("seq_q,seq_k", [(7, 40), (40, 7), (1, 33), (33, 1)])
def test_bottom_right_causal_matches_reference(rng, layout, seq_q, seq_k):
    """Sq != Sk: our causal mask is bottom-right (SDPA's is top-left), so compare with the core's reference."""
    arrays = make_qkv(rng, heads_q=4, heads_kv=2, seq_q=seq_q, seq_k=seq_k, dim=16, layout=layout, dtype="float64")
    q, k, v = _tensors(arrays, grad=True)
    dout = rng.standard_normal(q.shape)
    out, grads = _grads(lambda *a: ada.attention(*a, causal=True, layout=layout), (q, k, v), torch.from_numpy(dout))
    ref, _ = aa.attention_reference(*arrays, causal=True, layout=layout)
    ref_grads = aa.attention_backward_reference(dout, *arrays, causal=True, layout=layout)
    assert rel_l2(out.numpy(), ref) <= 1e-12
    for name, g, r in zip("qkv", grads, ref_grads):
        assert rel_l2(g.numpy(), r) <= 1e-12, name


@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q,seq_k", [(5, 5), (3, 7), (7, 3)])
def test_gradcheck_float64(rng, layout, causal, seq_q, seq_k):
    arrays = make_qkv(rng, batch=1, heads_q=4, heads_kv=2, seq_q=seq_q, seq_k=seq_k, dim=4, layout=layout,
                      dtype="float64")
    inputs = _tensors(arrays, grad=True)
    scale = float(rng.uniform(0.2, 1.0))
    assert torch.autograd.gradcheck(
        lambda q, k, v: ada.attention(q, k, v, causal=causal, layout=layout, scale=scale), inputs
    )


def test_strided_inputs_and_expanded_gradient(rng):
    """Non-contiguous views go in without copies; `sum().backward()` sends a stride-0 gradient."""
    arrays = make_qkv(rng, heads_q=4, heads_kv=2, seq_q=20, seq_k=30, dim=16, dtype="float64", contiguous=False)
    q, k, v = (torch.from_numpy(a).requires_grad_() for a in arrays)
    assert not q.is_contiguous()
    ada.attention(q, k, v, causal=True).sum().backward()
    ref = aa.attention_backward_reference(np.ones(q.shape), *arrays, causal=True)
    for name, x, r in zip("qkv", (q, k, v), ref):
        assert rel_l2(x.grad.numpy(), r) <= 1e-12, name


def test_bfloat16_on_cpu(rng):
    """bfloat16 CPU tensors cross as ml_dtypes views; error within 2× a naive bf16 implementation's."""
    arrays = make_qkv(rng, heads_q=4, heads_kv=2, seq_q=50, seq_k=70, dim=32, dtype="bfloat16")
    q, k, v = (torch.from_numpy(a.view(np.int16)).view(torch.bfloat16).requires_grad_() for a in arrays)
    out = ada.attention(q, k, v, causal=True)
    assert out.dtype == torch.bfloat16
    ref, _ = aa.attention_reference(*arrays, causal=True)
    naive = naive_same_dtype(*arrays, causal=True, layout="bhsd")
    assert_close_to_naive(to_host64(out), ref, naive)
    out.float().sum().backward()
    assert all(x.grad.dtype == torch.bfloat16 and bool(torch.isfinite(x.grad.float()).all()) for x in (q, k, v))


def test_custom_op_registration(rng):
    """Schema, fake (meta) implementation and autograd registration agree with the real kernels."""
    for layout in ("bhsd", "bshd"):
        arrays = make_qkv(rng, batch=1, heads_q=4, heads_kv=2, seq_q=6, seq_k=9, dim=8, layout=layout)
        q, k, v = _tensors(arrays, grad=True)
        torch.library.opcheck(ada._attention_op, (q, k, v, True, None, layout, "exact", True))
        out, lse = ada._attention_op(q, k, v, True, 0.5, layout, "exact", True)
        tensors = (x.detach() for x in (torch.randn_like(out), q, k, v, out, lse))  # no double backward
        torch.library.opcheck(ada._attention_backward_op, (*tensors, True, 0.5, layout))


@pytest.mark.parametrize("dynamic", [False, True])
def test_torch_compile_fullgraph(rng, dynamic):
    """A model using the adapter compiles with fullgraph=True (no graph break) and gives eager's values."""
    torch._dynamo.reset()
    model = torch.nn.Sequential(torch.nn.Linear(16, 48), torch.nn.Unflatten(-1, (3, 2, 8)))
    attn = ada.AdaAttention(causal=True, layout="bshd")

    def loss(x):
        q, k, v = model(x).unbind(2)        # [B, S, 2, 8] each
        return attn(q, k, v).square().sum()

    x = torch.from_numpy(rng.standard_normal((2, 11, 16)).astype(np.float32))
    compiled = torch.compile(loss, fullgraph=True, dynamic=dynamic)
    for seq in (11, 7):
        model.zero_grad()
        expected = loss(x[:, :seq])
        expected.backward()
        eager_grads = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
        got = compiled(x[:, :seq])
        got.backward()
        assert abs(got.item() - expected.item()) <= 1e-5 * abs(expected.item())
        for g, e in zip((p.grad for p in model.parameters()), eager_grads):
            assert rel_l2(g.numpy(), e.numpy()) <= 1e-5


# --- SDPA drop-in, module, errors ------------------------------------------------------------------------------

@pytest.mark.parametrize("seq_q,seq_k", [(9, 9), (5, 12), (12, 5)])
@pytest.mark.parametrize("is_causal", [False, True])
def test_sdpa_drop_in_matches_sdpa(rng, seq_q, seq_k, is_causal):
    """SDPA's own conventions, top-left causal alignment included, forward and gradients."""
    q, k, v = _tensors(make_qkv(rng, heads_q=4, heads_kv=2, seq_q=seq_q, seq_k=seq_k, dim=8), grad=True)
    dout = torch.from_numpy(rng.standard_normal(q.shape).astype(np.float32))
    scale = float(rng.uniform(0.1, 0.5))
    kwargs = {"is_causal": is_causal, "scale": scale, "enable_gqa": True}
    out, grads = _grads(lambda *a: ada.scaled_dot_product_attention(*a, **kwargs), (q, k, v), dout)
    ref, ref_grads = _grads(lambda *a: F.scaled_dot_product_attention(*a, **kwargs), (q, k, v), dout)
    assert close(out, ref)
    for name, g, r in zip("qkv", grads, ref_grads):
        assert close(g, r), name


def test_sdpa_drop_in_rejects_what_it_cannot_do(rng):
    q, k, v = _tensors(make_qkv(rng, heads_q=4, heads_kv=2, seq_q=6, dim=8))
    mask = torch.ones(6, 6, dtype=torch.bool)
    with pytest.raises(ValueError, match="attn_mask"):
        ada.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)
    with pytest.raises(ValueError, match="dropout_p"):
        ada.scaled_dot_product_attention(q, k, v, dropout_p=0.1, enable_gqa=True)
    with pytest.raises(ValueError, match="enable_gqa"):
        ada.scaled_dot_product_attention(q, k, v)
    with pytest.raises(RuntimeError):  # SDPA itself refuses mismatched heads without enable_gqa
        F.scaled_dot_product_attention(q, k, v)


def test_module(rng):
    q, k, v = _tensors(make_qkv(rng, heads_q=2, seq_q=10, dim=8, layout="bshd"))
    layer = ada.AdaAttention(causal=True, layout="bshd", scale=0.25)
    assert "causal=True" in repr(layer)
    expected = F.scaled_dot_product_attention(*(x.transpose(1, 2) for x in (q, k, v)), is_causal=True, scale=0.25)
    assert rel_l2(layer(q, k, v).numpy(), expected.transpose(1, 2).numpy()) <= 1e-5


def test_core_errors_propagate(rng):
    q, k, v = _tensors(make_qkv(rng, heads_q=3, heads_kv=2, seq_q=6, dim=8))
    with pytest.raises(ValueError, match="multiple"):
        ada.attention(q, k, v)
    q, k, v = _tensors(make_qkv(rng, heads_q=2, seq_q=6, dim=8))
    with pytest.raises(ValueError, match="layout"):
        ada.attention(q, k, v, layout="sbhd")
    with pytest.raises(TypeError, match="dtype"):
        ada.attention(q.int(), k.int(), v.int())
    with pytest.raises(TypeError, match="k.dtype"):
        ada.attention(q, k.double(), v)
    with pytest.raises(ValueError, match="4-D"):
        ada.attention(q[0], k[0], v[0])


# --- GPU --------------------------------------------------------------------------------------------------

def _cuda_bf16(rng, **shape):
    arrays = make_qkv(rng, dtype="float32", **shape)
    return _tensors(arrays, device="cuda", dtype=torch.bfloat16)


def _naive_grads(q, k, v, dout, *, causal, layout):
    """Gradients of a naive attention computed entirely in the inputs' dtype (the error baseline)."""
    q, k, v = (x.detach().clone().requires_grad_() for x in (q, k, v))
    qb, kb, vb = (x.transpose(1, 2) if layout == "bshd" else x for x in (q, k, v))
    group = qb.shape[1] // kb.shape[1]
    kb, vb = kb.repeat_interleave(group, 1), vb.repeat_interleave(group, 1)
    scores = qb @ kb.transpose(-1, -2) * qb.shape[-1] ** -0.5
    sq, sk = scores.shape[-2:]
    visible = torch.ones(sq, sk, dtype=torch.bool, device=q.device)
    if causal:
        visible = visible.tril(sk - sq)
    # Finite fill and a zeroing product: rows that see no key give 0 (and zero gradients), not NaN.
    probs = scores.masked_fill(~visible, torch.finfo(scores.dtype).min).softmax(-1) * visible
    out = probs @ vb
    (out.transpose(1, 2) if layout == "bshd" else out).backward(dout)
    return [x.grad for x in (q, k, v)]


@pytest.mark.gpu
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q,seq_k", [(256, 256), (100, 333), (333, 100)])
def test_gpu_bf16_forward_and_grads(rng, layout, causal, seq_q, seq_k):
    q, k, v = _cuda_bf16(rng, heads_q=8, heads_kv=2, seq_q=seq_q, seq_k=seq_k, dim=128, layout=layout)
    for x in (q, k, v):
        x.requires_grad_()
    dout = torch.randn(q.shape, device=q.device, dtype=torch.bfloat16)
    out, grads = _grads(lambda *a: ada.attention(*a, causal=causal, layout=layout), (q, k, v), dout)
    host = [to_host64(x) for x in (q, k, v)]
    ref, _ = aa.attention_reference(*host, causal=causal, layout=layout)
    naive = _naive_forward(q, k, v, causal=causal, layout=layout)
    assert_close_to_naive(to_host64(out), ref, naive)
    if seq_q == seq_k:  # SDPA's top-left mask equals our bottom-right one here
        sdpa = to_host64(_sdpa(*(x.detach() for x in (q, k, v)), causal=causal, layout=layout))
        # As accurate as SDPA by the same rule (its agreement with us follows from the naive check above).
        assert_close_to_naive(to_host64(out), ref, sdpa, what="output, against SDPA's error")
    ref_grads = aa.attention_backward_reference(to_host64(dout), *host, causal=causal, layout=layout)
    naive_grads = _naive_grads(q, k, v, dout, causal=causal, layout=layout)
    for name, g, r, n in zip("qkv", grads, ref_grads, naive_grads):
        assert g.dtype == torch.bfloat16 and g.shape == r.shape, name
        assert_close_to_naive(to_host64(g), r, to_host64(n), what=f"d{name}", factor=GRADIENT_FACTOR)


def _naive_forward(q, k, v, *, causal, layout):
    import cupy

    views = [cupy.from_dlpack(x.detach()) for x in (q, k, v)]
    return naive_same_dtype(*views, causal=causal, layout=layout)


@pytest.mark.gpu
def test_gpu_runs_on_callers_stream_without_sync(rng):
    """Inputs written on a side stream after a long spin: a kernel on any other stream would read them early."""
    q0, k, v = _cuda_bf16(rng, batch=2, heads_q=8, heads_kv=8, seq_q=1024, dim=64)
    expected = ada.attention(q0, k, v, causal=True)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)          # ~0.1 s of GPU time queued before q is written
        q = q0 * 1
        out = ada.attention(q, k, v, causal=True)
        result = out.clone()
    side.synchronize()
    assert max_abs(to_host64(result), to_host64(expected)) == 0.0


@pytest.mark.gpu
def test_gpu_backward_on_callers_stream(rng):
    q, k, v = _cuda_bf16(rng, batch=1, heads_q=4, heads_kv=4, seq_q=512, dim=64)
    torch.cuda.synchronize()
    side = torch.cuda.Stream()
    with torch.cuda.stream(side):
        torch.cuda._sleep(200_000_000)
        q2 = (q * 1).requires_grad_()
        ada.attention(q2, k, v, causal=True).float().sum().backward()
        grad = q2.grad.clone()
    side.synchronize()
    q3 = q.detach().clone().requires_grad_()
    ada.attention(q3, k, v, causal=True).float().sum().backward()
    assert rel_l2(to_host64(grad), to_host64(q3.grad)) <= 1e-2   # the fused backward may accumulate dq atomically


@pytest.mark.gpu
def test_gpu_zero_copy(rng):
    """torch's allocator grows by exactly out and lse (the core writes both in place); CuPy allocates nothing."""
    import cupy
    from cupy.cuda import memory_hook

    class Count(memory_hook.MemoryHook):
        name = "count"

        def __init__(self):
            self.sizes = []

        def malloc_preprocess(self, **kwargs):
            self.sizes.append(kwargs["size"])

    q, k, v = _cuda_bf16(rng, batch=2, heads_q=8, heads_kv=2, seq_q=1024, dim=128)
    with torch.no_grad():
        ada.attention(q, k, v, causal=True)     # compile and warm up outside the count
        torch.cuda.synchronize()
        cupy.get_default_memory_pool().free_all_blocks()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        hook = Count()
        with hook:
            out = ada.attention(q, k, v, causal=True)
        grown = torch.cuda.memory_allocated() - before
        peak = torch.cuda.max_memory_allocated() - before
    # out (4 MiB) and lse ([B, H, S] float32, 64 KiB) are multiples of the caching allocator's 512-byte rounding;
    # lse is freed on return (no gradient needed), so it shows in the peak, not in what stays allocated.
    assert grown == out.nbytes, grown
    assert peak == out.nbytes + 2 * 8 * 1024 * 4, peak
    assert hook.sizes == [], hook.sizes


@pytest.mark.gpu
def test_gpu_compile_fullgraph(rng):
    torch._dynamo.reset()
    q, k, v = _cuda_bf16(rng, batch=1, heads_q=4, heads_kv=2, seq_q=300, dim=64)
    for x in (q, k, v):
        x.requires_grad_()

    def loss(q, k, v):
        return ada.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).float().square().sum()

    eager = loss(q, k, v)
    eager_grads = torch.autograd.grad(eager, (q, k, v))
    compiled = torch.compile(loss, fullgraph=True)(q, k, v)
    compiled_grads = torch.autograd.grad(compiled, (q, k, v))
    assert abs(compiled.item() - eager.item()) <= 1e-3 * abs(eager.item())
    for g, e in zip(compiled_grads, eager_grads):
        assert rel_l2(to_host64(g), to_host64(e)) <= 1e-2


@pytest.mark.parametrize("policy", ["adaptive", "lowrank", "fp8"])
def test_adaptive_policies_run_exact_under_autograd(rng, policy):
    """The backward is the exact one, so with gradients the policy's for_gradients() variant (all heads exact)
    runs the forward: output and gradients equal the exact policy's."""
    arrays = make_qkv(rng, batch=1, heads_q=4, heads_kv=2, seq_q=300, seq_k=300, dim=16, dtype="float32")
    q, k, v = _tensors(arrays, grad=True)
    q2, k2, v2 = (x.detach().clone().requires_grad_() for x in (q, k, v))
    out = ada.attention(q, k, v, causal=True, policy=policy)
    ref = ada.attention(q2, k2, v2, causal=True)
    assert torch.equal(out, ref)
    out.sum().backward()
    ref.sum().backward()
    assert torch.equal(q.grad, q2.grad) and torch.equal(k.grad, k2.grad) and torch.equal(v.grad, v2.grad)


@pytest.mark.gpu
def test_gpu_cuda_graph_capture(rng):
    """The forward allocates only through torch and launches on torch's current stream, so it can be captured
    in a CUDA graph (how to remove per-call host overhead entirely): replays follow new inputs exactly."""
    q, k, v = _cuda_bf16(rng, batch=2, heads_q=8, heads_kv=2, seq_q=777, dim=128)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side), torch.no_grad():
        ada.attention(q, k, v, causal=True)          # compile and warm up outside the capture
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.no_grad(), torch.cuda.graph(graph):
        captured = ada.attention(q, k, v, causal=True)
    for _ in range(2):
        for x in (q, k, v):
            x.copy_(torch.randn_like(x))
        graph.replay()
        torch.cuda.synchronize()
        with torch.no_grad():
            expected = ada.attention(q, k, v, causal=True)
        assert torch.equal(captured, expected)
