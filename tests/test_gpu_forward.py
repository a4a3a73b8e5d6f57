"""GPU forward (fused kernel for float16/bfloat16, cupy-blocked otherwise) against float64.

Flash-attention's accuracy rule (`conftest.assert_close_to_naive`), ref in float64 on the GPU. Outputs are
poisoned with NaN through `out=` so an unwritten element fails the test.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import assert_close_to_naive, forced_kernel, make_qkv, max_abs, naive_same_dtype, rel_l2, to_host64

import adaattn_core as aa

pytestmark = pytest.mark.gpu

SEQ_PAIRS = [(1, 1), (17, 17), (128, 128), (129, 129), (1000, 1000), (4097, 4097),
             (17, 1000), (1000, 17), (128, 4097), (4097, 129), (1, 4097)]
HEAD_DIMS = [32, 64, 96, 128, 192, 256]


@pytest.fixture(scope="module", params=["sm80", "sm90"])
def cp(request):
    """CuPy, with each forward kernel forced in turn: mma.sync, and the warp-specialised wgmma kernel where it
    has tiles (Hopper only)."""
    cupy = pytest.importorskip("cupy")
    from adaattn_core import cuda_forward

    with forced_kernel("ADAATTN_FORWARD_KERNEL", request.param, cuda_forward._launch):
        yield cupy


def _check(cp, q, k, v, *, causal, layout, expect_backend="cuda"):
    out = cp.full(q.shape[:-1] + (v.shape[-1],), cp.nan, dtype=q.dtype)
    report = aa.Report()
    _, lse = aa.attention(q, k, v, causal=causal, layout=layout, out=out, return_lse=True, report=report)
    assert report.backend == expect_backend
    ref, ref_lse = aa.attention_reference(q, k, v, causal=causal, layout=layout)
    naive = naive_same_dtype(q, k, v, causal=causal, layout=layout)
    out64 = to_host64(out)
    assert np.isfinite(out64).all(), "unwritten (NaN-poisoned) or non-finite output"
    assert_close_to_naive(out, ref, naive)
    lse64, ref_lse64 = to_host64(lse), to_host64(ref_lse)
    finite = np.isfinite(ref_lse64)
    np.testing.assert_array_equal(np.isfinite(lse64), finite)
    if finite.any():
        assert np.abs(lse64[finite] - ref_lse64[finite]).max() <= 1e-3


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("dim", HEAD_DIMS)
@pytest.mark.parametrize("seq_q,seq_k", SEQ_PAIRS)
def test_shapes(cp, rng, seq_q, seq_k, dim, causal, dtype):
    q, k, v = make_qkv(rng, batch=1, heads_q=4, heads_kv=2, seq_q=seq_q, seq_k=seq_k, dim=dim,
                       dtype=dtype, xp=cp)
    _check(cp, q, k, v, causal=causal, layout="bhsd")


@pytest.mark.parametrize("group", [1, 4, 8])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
@pytest.mark.parametrize("strides", ["contiguous", "aligned-slice", "misaligned-slice"])
@pytest.mark.parametrize("dim", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_gqa_layouts_strides(cp, rng, group, layout, strides, dim, causal):
    q, k, v = make_qkv(rng, batch=2, heads_q=8, heads_kv=8 // group, seq_q=300, seq_k=257, dim=dim,
                       dtype="bfloat16", layout=layout, contiguous=strides == "contiguous",
                       offset=8 if strides == "aligned-slice" else 3, xp=cp)
    _check(cp, q, k, v, causal=causal, layout=layout)


@pytest.mark.parametrize("dim", [64, 128])
def test_broadcast_strides(cp, rng, dim):
    """K and V broadcast over heads and Q over the batch (stride 0): the mma.sync kernel reads them in place, and
    a TMA tensor map cannot step by 0, so the wgmma launcher must copy them, not misread them."""
    q, k, v = make_qkv(rng, batch=1, heads_q=4, heads_kv=1, seq_q=1000, seq_k=777, dim=dim, dtype="bfloat16", xp=cp)
    q = cp.broadcast_to(q, (3,) + q.shape[1:])
    k, v = (cp.broadcast_to(x, (3, 4) + x.shape[2:]) for x in (k, v))
    assert 0 in q.strides and 0 in k.strides
    _check(cp, q, k, v, causal=True, layout="bhsd")


@pytest.mark.parametrize("dim", [64, 128])
def test_reversed_strides(cp, rng, dim):
    """K and V reversed along the sequence and Q along the heads (negative strides): the mma.sync kernel reads them
    in place, and a TMA tensor map takes positive strides only, so the wgmma launcher must copy them."""
    q, k, v = make_qkv(rng, batch=2, heads_q=4, heads_kv=2, seq_q=500, seq_k=777, dim=dim, dtype="bfloat16", xp=cp)
    q, k, v = q[:, ::-1], k[:, :, ::-1], v[:, :, ::-1]
    assert q.strides[1] < 0 and k.strides[2] < 0
    _check(cp, q, k, v, causal=True, layout="bhsd")


def test_many_heads_and_batches(cp, rng):
    q, k, v = make_qkv(rng, batch=16, heads_q=32, heads_kv=8, seq_q=77, seq_k=140, dim=64,
                       dtype="float16", layout="bshd", xp=cp)
    _check(cp, q, k, v, causal=True, layout="bshd")


def test_no_keys(cp, rng):
    q, k, v = make_qkv(rng, seq_q=5, seq_k=0, dim=64, dtype="bfloat16", xp=cp)
    out, lse = aa.attention(q, k, v, return_lse=True)
    assert bool((out == 0).all()) and bool(cp.isneginf(lse).all())


def test_fully_masked_rows(cp, rng):
    q, k, v = make_qkv(rng, seq_q=300, seq_k=40, dim=128, dtype="bfloat16", xp=cp)
    out, lse = aa.attention(q, k, v, causal=True, return_lse=True)
    assert bool((out[:, :, :260] == 0).all()) and bool(cp.isneginf(lse[:, :, :260]).all())
    assert bool(cp.isfinite(out.astype(cp.float32)).all())


@pytest.mark.parametrize("dtype,dim", [("float32", 64), ("float64", 32), ("bfloat16", 80)])
def test_blocked_fallback(cp, rng, dtype, dim):
    """float32/float64 and head dims outside the tile table run the blocked algorithm with cuBLAS."""
    q, k, v = make_qkv(rng, heads_q=4, heads_kv=2, seq_q=130, seq_k=257, dim=dim, dtype=dtype, xp=cp)
    if dtype == "bfloat16":
        _check(cp, q, k, v, causal=True, layout="bhsd", expect_backend="cupy-blocked")
        return
    ref, _ = aa.attention_reference(q, k, v, causal=True)
    report = aa.Report()
    out = aa.attention(q, k, v, causal=True, report=report)
    assert report.backend == "cupy-blocked"
    assert rel_l2(out, ref) <= (1e-5 if dtype == "float32" else 1e-12)


def test_tile_over_the_gpus_shared_memory_runs_blocked(cp, rng, monkeypatch):
    """Where the chosen kernel's tile needs more shared memory per block than the GPU allows (an A100's 163 KB
    against 192-193 KB for either D = 256 tile, mma.sync or wgmma), the forward declines it, naming the bytes, and
    the blocked path gives the answer."""
    from adaattn_core import cuda_forward
    from adaattn_core.problem import describe

    a100 = 166_912
    monkeypatch.setattr(cuda_forward, "shared_memory_optin", lambda device_id: a100)
    cuda_forward._shared_memory_reason.cache_clear()
    try:
        q, k, v = make_qkv(rng, heads_q=2, heads_kv=1, seq_q=130, seq_k=300, dim=256, dtype="bfloat16", xp=cp)
        problem = describe(q, k, v, causal=False, scale=None, layout="bhsd")
        needed = cuda_forward._select(problem, cp.cuda.Device().id).smem_bytes
        assert cuda_forward.unsupported_reason(problem).endswith(
            f"needs {needed} bytes of shared memory per block, this GPU allows {a100}")
        _check(cp, q, k, v, causal=False, layout="bhsd", expect_backend="cupy-blocked")
    finally:
        cuda_forward._shared_memory_reason.cache_clear()


def test_backward_on_gpu(cp, rng):
    """Until the fused backward lands, CuPy gradients come from the blocked algorithm."""
    q, k, v = make_qkv(rng, heads_q=4, heads_kv=2, seq_q=100, seq_k=120, dim=64, dtype="float32", xp=cp)
    out, lse = aa.attention(q, k, v, causal=True, return_lse=True)
    dout = cp.asarray(rng.standard_normal(out.shape), dtype=cp.float32)
    grads = aa.attention_backward(dout, q, k, v, out, lse, causal=True)
    ref = aa.attention_backward_reference(dout, q, k, v, causal=True)
    for g, r in zip(grads, ref):
        assert rel_l2(g, r) <= 1e-5


def test_no_hidden_allocations(cp, rng):
    """Contiguous inputs: the call allocates exactly out and lse, nothing else."""
    from cupy.cuda import memory_hook

    class Count(memory_hook.MemoryHook):
        name = "count"

        def __init__(self):
            self.sizes = []

        def malloc_preprocess(self, **kwargs):
            self.sizes.append(kwargs["size"])

    q, k, v = make_qkv(rng, batch=2, heads_q=8, heads_kv=2, seq_q=1024, dim=128, dtype="bfloat16", xp=cp)
    aa.attention(q, k, v, causal=True)  # compile and warm the pool outside the count
    cp.get_default_memory_pool().free_all_blocks()
    hook = Count()
    with hook:
        out, lse = aa.attention(q, k, v, causal=True, return_lse=True)
    assert sorted(hook.sizes) == sorted([out.nbytes, lse.nbytes]), hook.sizes


def test_runs_on_current_stream_without_sync(cp, rng):
    q, k, v = make_qkv(rng, seq_q=2048, dim=64, dtype="bfloat16", xp=cp)
    expected = aa.attention(q, k, v)
    stream = cp.cuda.Stream(non_blocking=True)
    with stream:
        out = aa.attention(q, k, v)
    stream.synchronize()
    assert max_abs(out, expected) == 0.0


@pytest.mark.parametrize("scale", [0.0, -0.2])
def test_non_positive_scale_falls_back(cp, rng, scale):
    q, k, v = make_qkv(rng, seq_q=40, seq_k=50, dim=64, dtype="bfloat16", xp=cp)
    _check_scaled = aa.Report()
    out = aa.attention(q, k, v, causal=True, scale=scale, report=_check_scaled)
    ref, _ = aa.attention_reference(q, k, v, causal=True, scale=scale)
    assert _check_scaled.backend == "cupy-blocked"
    assert rel_l2(out, ref) <= 1e-2


def test_auto_kernel_choice(monkeypatch):
    """On Hopper "auto" takes the wgmma kernel from SM90_MIN_SEQLEN_K keys on, the mma.sync kernel below."""
    cupy = pytest.importorskip("cupy")
    from adaattn_core import cuda_forward
    from adaattn_core.launch_config import SM90_MIN_SEQLEN_K

    hopper = cupy.cuda.Device().compute_capability == "90"
    monkeypatch.delenv("ADAATTN_FORWARD_KERNEL", raising=False)
    for seq_k, expect_sm90 in ((SM90_MIN_SEQLEN_K - 1, False), (SM90_MIN_SEQLEN_K, hopper)):
        problem = aa.AttentionProblem(batch=1, heads_q=2, heads_kv=2, seqlen_q=64, seqlen_k=seq_k, head_dim=128,
                                      dtype="bfloat16", library="cupy", layout="bhsd", causal=False, scale=0.1)
        assert cuda_forward._use_sm90(problem, cupy.cuda.Device().id) is expect_sm90


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", ["bhsd", "bshd"])
def test_head_subset_launch(cp, rng, causal, layout):
    """A launch over a head-index list (one policy group) writes exactly those heads, as a full launch would."""
    from adaattn_core import cuda_forward
    from adaattn_core.problem import describe, to_bhsd

    q, k, v = make_qkv(rng, batch=2, heads_q=8, heads_kv=2, seq_q=700, seq_k=900, dim=128,
                       dtype="bfloat16", layout=layout, xp=cp)
    full, full_lse = aa.attention(q, k, v, causal=causal, layout=layout, return_lse=True)
    problem = describe(q, k, v, causal=causal, scale=None, layout=layout)
    heads = [int(h) for h in rng.choice(8, size=3, replace=False)]
    out = cp.full(full.shape, cp.nan, dtype=full.dtype)
    lse = cp.full(full_lse.shape, cp.nan, dtype=full_lse.dtype)
    cuda_forward.forward(problem, *(to_bhsd(x, layout) for x in (q, k, v)), to_bhsd(out, layout), lse, heads)
    out, full = to_bhsd(out, layout), to_bhsd(full, layout)
    others = [h for h in range(8) if h not in heads]
    assert bool(cp.isnan(out[:, others].astype(cp.float32)).all()) and bool(cp.isnan(lse[:, others]).all())
    assert max_abs(out[:, heads], full[:, heads]) == 0.0
    assert max_abs(lse[:, heads], full_lse[:, heads]) == 0.0


def test_empty_head_list_launches_nothing(cp, rng):
    """An empty head group (a policy that sends every head elsewhere) writes nothing and launches no kernel."""
    from adaattn_core import cuda_forward
    from adaattn_core.problem import describe

    q, k, v = make_qkv(rng, batch=1, heads_q=4, heads_kv=2, seq_q=600, seq_k=700, dim=64, dtype="bfloat16", xp=cp)
    problem = describe(q, k, v, causal=True, scale=None, layout="bhsd")
    out = cp.full(q.shape, cp.nan, dtype=q.dtype)
    lse = cp.full(q.shape[:-1], cp.nan, dtype=cp.float32)
    cuda_forward.forward(problem, q, k, v, out, lse, heads=[])
    assert bool(cp.isnan(out.astype(cp.float32)).all()) and bool(cp.isnan(lse).all())


def test_persistent_schedule(cp, rng):
    """The wgmma kernel is persistent: its blocks take work tiles from a per-stream counter that each launch's
    last block zeroes. Launches back to back and on two streams at once, with fewer and more tiles than SMs and
    fully masked tiles (causal, Sq > Sk), must each compute every tile and leave the counters at zero."""
    from adaattn_core import cuda_common, cuda_forward

    probe = aa.AttentionProblem(batch=1, heads_q=2, heads_kv=2, seqlen_q=600, seqlen_k=600, head_dim=64,
                                dtype="bfloat16", library="cupy", layout="bhsd", causal=False, scale=0.125)
    if not cuda_forward._launch(probe, cp.cuda.Device().id, 2)[2].persistent:
        pytest.skip("the forward kernel forced here is not persistent")
    shapes = [  # batch, heads_q, heads_kv, seq_q, seq_k, dim, causal
        (1, 2, 1, 600, 600, 64, False),
        (4, 16, 4, 2000, 2000, 128, True),
        (1, 3, 1, 1000, 600, 256, True),
        (1, 4, 2, 4097, 4097, 64, True),
        (3, 8, 8, 1500, 1700, 128, False),
    ]
    cases = [make_qkv(rng, batch=b, heads_q=hq, heads_kv=hkv, seq_q=sq, seq_k=sk, dim=d, dtype="bfloat16", xp=cp)
             + (causal,) for b, hq, hkv, sq, sk, d, causal in shapes * 2]
    cp.cuda.Device().synchronize()  # inputs were written on the default stream
    streams = [cp.cuda.Stream(non_blocking=True) for _ in range(2)]
    outs = []
    for i, (q, k, v, causal) in enumerate(cases):
        with streams[i % 2]:
            outs.append(aa.attention(q, k, v, causal=causal))
    for stream in streams:
        stream.synchronize()
    for (q, k, v, causal), out in zip(cases, outs):
        ref, _ = aa.attention_reference(q, k, v, causal=causal)
        naive = naive_same_dtype(q, k, v, causal=causal, layout="bhsd")
        assert_close_to_naive(out, ref, naive, what=f"output {q.shape} causal={causal}")
    device = cp.cuda.Device().id
    for stream in streams:
        assert (stream.ptr, 0) in cuda_common._counters[device][1], "the launches took no counter of their stream"
        assert to_host64(cuda_common.tile_counter(device, stream.ptr)).tolist() == [0, 0]


@pytest.mark.parametrize("section", [1, 3, "all"])
def test_causal_sections(cp, rng, monkeypatch, section):
    """The causal wgmma kernel hands out tiles longest first within sections of (batch, head) pairs sized by
    CAUSAL_SECTION_BYTES: one pair per section, sections that leave a short last one (3 of 2 · 8 pairs, and of the
    2 · 5 pairs of a subset of heads) and one section of every pair must each compute every tile once."""
    from adaattn_core import cuda_forward, launch_config
    from adaattn_core.problem import describe

    seq_q, seq_k, dim, heads = int(rng.integers(700, 1300)), int(rng.integers(900, 1300)), 64, [0, 2, 3, 5, 7]
    q, k, v = make_qkv(rng, batch=2, heads_q=8, heads_kv=2, seq_q=seq_q, seq_k=seq_k, dim=dim, dtype="bfloat16",
                       xp=cp)
    per_head = 4 * seq_k * dim // 4  # K and V, 16-bit, shared by a group of 4 query heads
    budget = {1: 0, 3: 3 * per_head, "all": 1 << 40}[section]
    monkeypatch.setattr(launch_config, "CAUSAL_SECTION_BYTES", budget)
    cuda_forward._launch.cache_clear()
    try:
        problem = describe(q, k, v, causal=True, scale=None, layout="bhsd")
        _, _, launch, schedule = cuda_forward._launch(problem, cp.cuda.Device().id, 8)
        if not launch.persistent:
            pytest.skip("the forward kernel forced here is not persistent")
        assert int(schedule[1]) == (16 if section == "all" else section)
        ref, _ = aa.attention_reference(q, k, v, causal=True)
        naive = naive_same_dtype(q, k, v, causal=True, layout="bhsd")
        out = cp.full(q.shape, cp.nan, dtype=q.dtype)
        lse = cp.full(q.shape[:-1], cp.nan, dtype=cp.float32)
        cuda_forward.forward(problem, q, k, v, out, lse)
        assert np.isfinite(to_host64(out)).all(), "a tile was not written"
        assert_close_to_naive(out, ref, naive, what=f"sections of {section}")
        part = cp.full(q.shape, cp.nan, dtype=q.dtype)
        cuda_forward.forward(problem, q, k, v, part, lse, heads)
        assert max_abs(part[:, heads], out[:, heads]) == 0.0
        assert bool(cp.isnan(part[:, [1, 4, 6]].astype(cp.float32)).all())
    finally:
        cuda_forward._launch.cache_clear()


def test_inputs_on_another_gpu(cp, rng, monkeypatch):
    """CuPy inputs on a GPU that is not the current one are computed on their own GPU: outputs land there, the
    current device is restored, an `out` or `dout` on another GPU is refused naming both, and the kernel checks
    ask for that GPU's compute capability. Needs two GPUs."""
    from adaattn_core import device

    if cp.cuda.runtime.getDeviceCount() < 2:
        pytest.skip("needs two GPUs")
    with cp.cuda.Device(1):
        q, k, v = make_qkv(rng, batch=2, heads_q=4, heads_kv=2, seq_q=300, seq_k=500, dim=64, dtype="bfloat16", xp=cp)
        ref, _ = aa.attention_reference(q, k, v, causal=True)
        naive = naive_same_dtype(q, k, v, causal=True, layout="bhsd")
        dout = cp.ones(q.shape, dtype=q.dtype)  # *_like would allocate on the current device, not the prototype's
    asked = []
    ask = device.compute_capability
    monkeypatch.setattr(device, "compute_capability", lambda device_id: asked.append(device_id) or ask(device_id))
    with cp.cuda.Device(0):
        wrong = cp.empty(q.shape, dtype=q.dtype)  # on GPU 0
        report = aa.Report()
        out, lse = aa.attention(q, k, v, causal=True, return_lse=True, report=report)
        assert cp.cuda.runtime.getDevice() == 0, "the call left another device current"
        assert out.device.id == 1 and lse.device.id == 1
        assert report.backend == "cuda"
        assert asked and set(asked) == {1}, f"compute capability asked of devices {sorted(set(asked))}"
        dq, dk, dv = aa.attention_backward(dout, q, k, v, out, lse, causal=True)
        assert {x.device.id for x in (dq, dk, dv)} == {1}
        with pytest.raises(ValueError, match="out is on GPU 0 but the inputs are on GPU 1"):
            aa.attention(q, k, v, causal=True, out=wrong)
        with pytest.raises(ValueError, match="dout is on GPU 0 but the inputs are on GPU 1"):
            aa.attention_backward(wrong, q, k, v, out, lse, causal=True)
    with cp.cuda.Device(1):
        assert_close_to_naive(out, ref, naive, what="inputs on GPU 1")
        assert bool(cp.isfinite(dq.astype(cp.float32)).all())
