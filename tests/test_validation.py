"""Every bad input gets a TypeError/ValueError naming the argument, the expected and the actual value."""

from __future__ import annotations

import re

import numpy as np
import pytest
from conftest import make_qkv

import adaattn_core as aa
from adaattn_core import HeadPlan, Plan


@pytest.fixture
def qkv(rng):
    return make_qkv(rng, heads_q=4, heads_kv=2, seq_q=8, seq_k=6, dim=16)


def test_not_an_array(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match=r"k must be a numpy.ndarray or cupy.ndarray.*got builtins.list"):
        aa.attention(q, k.tolist(), v)


def test_wrong_rank(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"q must be 4-D, got 3-D with shape \(4, 8, 16\)"):
        aa.attention(q[0], k, v)


def test_unsupported_dtype(qkv):
    q, k, v = (x.astype(np.int32) for x in qkv)
    with pytest.raises(TypeError, match=r"q.dtype must be one of .*got int32"):
        aa.attention(q, k, v)


def test_dtype_mismatch(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match=r"v.dtype must equal q.dtype \(float32\), got float64"):
        aa.attention(q, k, v.astype(np.float64))


def test_head_dim_mismatch(rng):
    q, _, v = make_qkv(rng, dim=16)
    _, k, _ = make_qkv(rng, dim=8)
    with pytest.raises(ValueError, match=r"k head dimension must equal q's \(16\), got 8"):
        aa.attention(q, k, v)


def test_value_shape_mismatch(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"v must have k's heads and sequence length \(H=2, S=6\), got H=2, S=5"):
        aa.attention(q, k, v[:, :, :5])


def test_batch_mismatch(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"batch sizes differ: q has 2, k has 1, v has 2"):
        aa.attention(q, k[:1], v)


def test_gqa_divisibility(rng):
    q, k, v = make_qkv(rng, heads_q=6, heads_kv=4)
    with pytest.raises(ValueError, match=r"q heads \(6\) must be a multiple of k/v heads \(4\)"):
        aa.attention(q, k, v)


def test_zero_head_dim(rng):
    q, k, v = make_qkv(rng, dim=0)
    with pytest.raises(ValueError, match=r"head dimension D must be >= 1"):
        aa.attention(q, k, v)


@pytest.mark.parametrize("layout", ["BHSD", "bsdh", ""])
def test_bad_layout(qkv, layout):
    with pytest.raises(ValueError, match=r"layout must be one of \('bhsd', 'bshd'\), got"):
        aa.attention(*qkv, layout=layout)


def test_bad_policy_name(qkv):
    with pytest.raises(ValueError, match=r"policy must be one of \[.*'exact'.*\] or a Policy instance, got 'fastest'"):
        aa.attention(*qkv, policy="fastest")


def test_bad_policy_type(qkv):
    with pytest.raises(TypeError, match=r"policy must be a str or a Policy instance, got int"):
        aa.attention(*qkv, policy=3)


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scale(qkv, scale):
    with pytest.raises(ValueError, match=r"scale must be finite, got"):
        aa.attention(*qkv, scale=scale)


def test_scale_type(qkv):
    with pytest.raises(TypeError, match=r"scale must be a float or None, got str"):
        aa.attention(*qkv, scale="0.1")


@pytest.mark.parametrize("value", [1, "no", None, 0.0])
def test_flag_types(qkv, value):
    """causal and return_lse take True/False only: a truthy string would silently mean True."""
    with pytest.raises(TypeError, match=rf"causal must be True or False, got {re.escape(repr(value))}"):
        aa.attention(*qkv, causal=value)
    with pytest.raises(TypeError, match=rf"return_lse must be True or False, got {re.escape(repr(value))}"):
        aa.attention(*qkv, return_lse=value)


def test_numpy_bools_are_flags(qkv):
    """np.True_ (what a comparison returns) is as good as True."""
    q, k, v = qkv
    out = aa.attention(q, k, v, causal=np.bool_(True))
    np.testing.assert_array_equal(out, aa.attention(q, k, v, causal=True))
    assert isinstance(aa.attention(q, k, v, return_lse=np.bool_(True)), tuple)


def test_out_may_not_alias_the_inputs(rng):
    """Writing out while reading q, k or v would feed the blocked algorithm its own output: refused by name."""
    q, k, v = make_qkv(rng, heads_q=4, heads_kv=4, seq_q=8, seq_k=8, dim=16)  # out's shape fits k and v too
    for name, alias in (("q", q), ("k", k), ("v", v)):
        with pytest.raises(ValueError, match=rf"out must not share memory with {name}"):
            aa.attention(q, k, v, out=alias)
    shifted = np.empty(q.size + 16, np.float32)
    shifted[:q.size] = q.ravel()
    with pytest.raises(ValueError, match="out must not share memory with q"):  # a view one row past q's start
        aa.attention(shifted[:q.size].reshape(q.shape), k, v, out=shifted[16:].reshape(q.shape))
    packed = rng.standard_normal((2, 4, 8, 16 * 2)).astype(np.float32)
    q2, out = packed[..., :16], packed[..., 16:]  # interleaved views of one buffer that never overlap
    result = aa.attention(q2, k, v, out=out)
    assert result is out
    np.testing.assert_allclose(packed[..., 16:], aa.attention(np.ascontiguousarray(q2), k, v))
    arena = np.empty(2 * 4 * 8 * 16 + 64, np.float32)
    out, lse = arena[:1024].reshape(2, 4, 8, 16), arena[1000:1064].reshape(2, 4, 8)  # lse overlaps out's tail
    with pytest.raises(ValueError, match="lse_out must not share memory with out"):
        aa.attention(q, k, v, out=out, lse_out=lse, return_lse=True)
    readonly = np.empty_like(q)
    readonly.flags.writeable = False
    with pytest.raises(ValueError, match="out must be writable"):
        aa.attention(q, k, v, out=readonly)


def test_out_shape(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"out must have shape \(2, 4, 8, 16\), got \(2, 4, 8, 15\)"):
        aa.attention(q, k, v, out=np.empty((2, 4, 8, 15), np.float32))


def test_out_dtype(qkv):
    q, k, v = qkv
    with pytest.raises(TypeError, match=r"out.dtype must be float32, got float64"):
        aa.attention(q, k, v, out=np.empty(q.shape, np.float64))


def test_out_not_written_on_error(qkv):
    """Validation happens before any write: a failing call leaves a caller's buffer untouched."""
    q, k, v = qkv
    out = np.full(q.shape, 7.0, np.float32)
    with pytest.raises(ValueError):
        aa.attention(q, k, v, out=out, scale=float("nan"))
    assert np.all(out == 7.0)


def test_backward_lse_dtype(qkv):
    q, k, v = qkv
    out, lse = aa.attention(q, k, v, return_lse=True)
    with pytest.raises(TypeError, match=r"lse.dtype must be float32, got float64"):
        aa.attention_backward(out, q, k, v, out, lse.astype(np.float64))


def test_backward_dout_shape(qkv):
    q, k, v = qkv
    out, lse = aa.attention(q, k, v, return_lse=True)
    with pytest.raises(ValueError, match=r"dout must have shape \(2, 4, 8, 16\), got \(2, 4, 7, 16\)"):
        aa.attention_backward(out[:, :, :7], q, k, v, out, lse)


def test_mixed_libraries(qkv):
    class FakeCupy:
        __module__ = "cupy._core.core"
        ndim = 4

    FakeCupy.__name__ = "ndarray"
    q, k, v = qkv
    with pytest.raises(TypeError, match=r"v is a cupy array but q is a numpy array"):
        aa.attention(q, k, FakeCupy())


def test_lse_out(qkv):
    q, k, v = qkv
    lse = np.full((2, 4, 8), np.nan, np.float32)
    out, returned = aa.attention(q, k, v, lse_out=lse, return_lse=True)
    assert returned is lse and np.isfinite(lse).all()
    with pytest.raises(TypeError, match=r"lse_out.dtype must be float32, got float64"):
        aa.attention(q, k, v, lse_out=np.empty((2, 4, 8), np.float64))
    with pytest.raises(ValueError, match=r"lse_out must have shape \(2, 4, 8\), got \(2, 4, 7\)"):
        aa.attention(q, k, v, lse_out=np.empty((2, 4, 7), np.float32))
    with pytest.raises(ValueError, match=r"lse_out must be C-contiguous"):
        aa.attention(q, k, v, lse_out=np.empty((2, 8, 4), np.float32).transpose(0, 2, 1))


def test_remembered_signatures_still_check_option_types(qkv):
    """A valid call is remembered by signature; options equal in value but of another type still fail."""
    q, k, v = qkv
    aa.attention(q, k, v, scale=1, causal=True)
    aa.attention(q, k, v, scale=1, causal=True)
    with pytest.raises(TypeError, match=r"scale must be a float or None, got bool"):
        aa.attention(q, k, v, scale=True, causal=True)
    with pytest.raises(TypeError, match=r"causal must be True or False, got 1 \(builtins.int\)"):
        aa.attention(q, k, v, scale=1, causal=1)
    with pytest.raises(ValueError, match=r"k must be 4-D"):
        aa.attention(q, k[0], v)


@pytest.mark.parametrize("seq_q", [8, 0])
def test_bad_deterministic(qkv, seq_q):
    """Checked with the other backward inputs, before any work, empty problems included."""
    q, k, v = qkv
    q = q[:, :, :seq_q]
    out, lse = aa.attention(q, k, v, return_lse=True)
    with pytest.raises(TypeError, match=r"deterministic must be True or False, got 1 \(builtins.int\)"):
        aa.attention_backward(out, q, k, v, out, lse, deterministic=1)


@pytest.mark.parametrize("kwargs,named", [
    ({"itemsize": 4}, "itemsize 4, expected one of [1, 2]"),
    ({"shape": (1, 2, 64, 24)}, "rows of 24 x 2 bytes (shape (1, 2, 64, 24)), expected 32 or 64 bytes or a multiple "
                                "of 128"),
    ({"shape": (1, 2, 64, 8)}, "rows of 8 x 2 bytes (shape (1, 2, 64, 8)), expected 32 or 64 bytes or a multiple of "
                               "128"),
    ({"box_rows": 0}, "box_rows 0, expected 1..256"),
    ({"box_rows": 257}, "box_rows 257, expected 1..256"),
    ({"ptr": 0x1008}, "address 0x1008, expected a multiple of 16 bytes"),
    ({"strides": (4096, 2048, 4)}, "strides (4096, 2048, 4) (2-byte elements) must be positive multiples of 16 bytes"),
])
def test_tma_tile_map_names_the_argument_it_cannot_take(kwargs, named):
    """The host-side checks run before the driver is asked (no GPU needed) and say which argument is wrong."""
    from adaattn_core.tma import tile_map

    args = {"ptr": 0x1000, "shape": (1, 2, 64, 64), "strides": (8192, 4096, 64), "box_rows": 128, "itemsize": 2,
            **kwargs}
    with pytest.raises(ValueError, match=re.escape(named)):
        tile_map(**args)


class _FixedPlan(aa.Policy):
    """A user-defined policy that returns whatever plan it was given."""

    name = "fixed"

    def __init__(self, plan):
        self._plan = plan

    def plan(self, problem, q, k, v, report):
        return self._plan


@pytest.mark.parametrize("plan,error,message", [
    (None, TypeError, r"policy 'fixed': plan\(\) must return a Plan, got NoneType"),
    (Plan(heads=(HeadPlan(precision="float32"),) * 2), ValueError,
     r"policy 'fixed': the plan has 2 head entries, expected one per query head \(4\)"),
    (Plan(heads=(HeadPlan(precision="float32"),) * 3 + (HeadPlan(precision="float16"),)), ValueError,
     r"policy 'fixed': head 3 asks for precision 'float16' with float32 inputs, expected 'float32' or "
     r"'float8_e4m3'"),
])
def test_custom_policy_plans_are_checked(qkv, plan, error, message):
    """A custom policy's plan must cover every query head at a precision there is a path for: otherwise heads would
    go unwritten (out keeps whatever was in it)."""
    out = np.full(qkv[0].shape, 12345.0, np.float32)
    with pytest.raises(error, match=message):
        aa.attention(*qkv, policy=_FixedPlan(plan), out=out)
    assert (out == 12345.0).all(), "nothing may be written before the plan is checked"


@pytest.mark.parametrize("make,error,message", [
    (lambda: HeadPlan(path="sparse", precision="float32"), ValueError,
     r"HeadPlan: path must be one of \('dense', 'lowrank'\), got 'sparse'"),
    (lambda: HeadPlan(path="lowrank", precision="float32"), ValueError,
     r"HeadPlan: rank of a lowrank head must be a positive int, got None"),
    (lambda: HeadPlan(path="lowrank", precision="float32", rank=True), ValueError,
     r"HeadPlan: rank of a lowrank head must be a positive int, got True"),
    (lambda: HeadPlan(precision="float32", rank=8), ValueError, r"HeadPlan: rank of a dense head must be None, got 8"),
    (lambda: Plan(heads=("dense",) * 4), TypeError, r"Plan: heads\[0\] must be a HeadPlan, got str"),
])
def test_head_plans_check_themselves_when_made(make, error, message):
    """A plan entry with an unknown path, or a rank that is not a positive int exactly for low-rank heads, cannot
    be made, so no policy can hand the backends a head on a path it did not ask for."""
    with pytest.raises(error, match=message):
        make()


def test_report_type_and_reuse(qkv):
    """report= takes a Report (checked before any work), and a reused Report describes only the latest call."""
    with pytest.raises(TypeError, match=r"report must be a Report instance or None, got \{\}"):
        aa.attention(*qkv, report={})
    with pytest.raises(TypeError, match=r"report must be a Report instance or None, got <class"):
        aa.attention(*qkv, report=aa.Report)
    report = aa.Report()
    aa.attention(*qkv, policy="balanced", report=report)
    assert "precision" in report.estimates
    aa.attention(*qkv, report=report)
    assert report.estimates == {} and report.policy == "exact" and report.plan is not None


@pytest.mark.parametrize("kwargs,error,message", [
    ({"layout": "BHSD"}, ValueError, r"layout must be one of \('bhsd', 'bshd'\), got 'BHSD'"),
    ({"causal": "no"}, TypeError, r"causal must be True or False, got 'no'"),
    ({"scale": float("nan")}, ValueError, r"scale must be finite"),
])
def test_references_validate_like_attention(qkv, kwargs, error, message):
    """The exported float64 references take attention's arguments and refuse what it refuses, instead of reading
    "BHSD" as "bshd" or "no" as causal."""
    q, k, v = qkv
    with pytest.raises(error, match=message):
        aa.attention_reference(q, k, v, **kwargs)
    with pytest.raises(error, match=message):
        aa.attention_backward_reference(np.ones_like(q), q, k, v, **kwargs)


def test_references_check_heads_and_dout(rng):
    q, k, v = make_qkv(rng, heads_q=4, heads_kv=3, seq_q=8, seq_k=6, dim=16)
    with pytest.raises(ValueError, match=r"q heads \(4\) must be a multiple of k/v heads \(3\)"):
        aa.attention_reference(q, k, v)
    q, k, v = make_qkv(rng, heads_q=4, heads_kv=2, seq_q=8, seq_k=6, dim=16)
    with pytest.raises(ValueError, match=r"dout must have shape \(2, 4, 8, 16\), got \(2, 4, 8, 15\)"):
        aa.attention_backward_reference(np.ones((2, 4, 8, 15), np.float32), q, k, v)


def test_memory_mapped_inputs_work_and_masked_arrays_are_refused(qkv, tmp_path):
    """np.load(..., mmap_mode="r") gives np.memmap, an ndarray: accepted. A masked array's mask would be ignored:
    refused by name."""
    q, k, v = qkv
    np.save(tmp_path / "q.npy", q)
    mapped = np.load(tmp_path / "q.npy", mmap_mode="r")
    np.testing.assert_array_equal(aa.attention(mapped, k, v), aa.attention(q, k, v))
    with pytest.raises(TypeError, match=r"q must be a numpy.ndarray or cupy.ndarray.*MaskedArray"):
        aa.attention(np.ma.masked_array(q), k, v)


def test_scale_must_fit_the_compute_precision(qkv):
    """float16/bfloat16/float32 inputs compute in float32: a scale past its range would turn every score into inf."""
    q, k, v = qkv
    with pytest.raises(ValueError, match=r"scale must stay finite in float32 \(the compute precision of float32"):
        aa.attention(q, k, v, scale=3e38)  # below float32's max, not after the kernels' * log2(e)
    wide = aa.attention(q.astype(np.float64), k.astype(np.float64), v.astype(np.float64), scale=1e39)
    assert np.isfinite(wide).all()  # float64 takes it


@pytest.mark.parametrize("make,error,message", [
    (lambda: aa.RankPolicy(tolerance="x"), TypeError, r"RankPolicy: tolerance must be a real number, got 'x'"),
    (lambda: aa.RankPolicy(probe_rows=2.5), TypeError, r"RankPolicy: probe_rows must be an int, got 2.5"),
    (lambda: aa.RankPolicy(tolerance=float("nan")), ValueError,
     r"RankPolicy: tolerance must be a number, not NaN, got nan"),
    (lambda: aa.RankPolicy(spectral="yes"), TypeError, r"RankPolicy: spectral must be True or False, got 'yes'"),
    (lambda: aa.PrecisionPolicy(tolerance=float("nan")), ValueError,
     r"PrecisionPolicy: tolerance must be a number, not NaN, got nan"),
    (lambda: aa.PrecisionPolicy(sample_rows=0), ValueError, r"PrecisionPolicy: sample_rows must be >= 1, got 0"),
    (lambda: aa.PrecisionPolicy("fast"), ValueError, r"PrecisionPolicy: preset must be one of \[.*\], got 'fast'"),
    (lambda: aa.RankPolicy(then="balanced"), TypeError, r"RankPolicy: then must be a Policy or None, got 'balanced'"),
    (lambda: aa.RankPolicy(seed=-1), ValueError, r"RankPolicy: seed must be >= 0, got -1"),
    (lambda: aa.PrecisionPolicy(tolerance=-1), ValueError, r"PrecisionPolicy: tolerance must be > 0, got -1"),
    (lambda: aa.PrecisionPolicy(sample_rows="4"), TypeError, r"PrecisionPolicy: sample_rows must be an int, got '4'"),
    (lambda: aa.PrecisionPolicy(overrides=[0]), TypeError,
     r"PrecisionPolicy: overrides must be a dict \{query head: precision\}, got \[0\]"),
])
def test_policy_options_are_checked(make, error, message):
    """Policy options of the wrong type or out of range fail at construction, naming the option."""
    with pytest.raises(error, match=message):
        make()


def test_policy_options_keep_their_meaningful_values(qkv):
    """inf is a meaningful tolerance (the "fp8" preset's: fp8 without estimating) and NumPy integers are integers:
    both must pass the option checks and the plan check."""
    import math

    q, k, v = qkv
    report = aa.Report()
    aa.attention(q, k, v, policy=aa.PrecisionPolicy("speed", tolerance=math.inf, emulate=True), report=report)
    assert set(report.decisions()) == {"dense/float8_e4m3"}, report.decisions()  # inf: fp8 on every head
    assert aa.RankPolicy(retry_margin=math.inf, seed=np.int64(3)).retry_margin == math.inf
    plan = Plan(heads=(HeadPlan(precision="float32"),) * 3 + (HeadPlan("lowrank", "float32", np.int64(2)),))
    assert aa.attention(q, k, v, policy=_FixedPlan(plan)).shape == q.shape


def test_grid_limits_name_the_count_and_the_limit(rng):
    """One launch takes at most 2**31 - 1 blocks; a persistent kernel's int32 tile counter reaches tiles + grid - 1,
    so its tiles are limited by that less the SMs. Within the limits the grid is returned (min(tiles, SMs) for a
    persistent kernel); past them a ValueError names the count and the limit."""
    from adaattn_core.launch_config import MAX_GRID, check_grid, persistent_grid

    sms = int(rng.integers(1, 200))
    assert check_grid(MAX_GRID) == MAX_GRID
    with pytest.raises(ValueError, match=f"{MAX_GRID + 1} thread blocks, expected at most {MAX_GRID}"):
        check_grid(MAX_GRID + 1)
    assert persistent_grid(1, sms) == 1
    assert persistent_grid(10 * sms, sms) == sms
    assert persistent_grid(MAX_GRID - sms, sms) == sms
    with pytest.raises(ValueError, match=f"{MAX_GRID - sms + 1} query tiles, expected at most {MAX_GRID - sms}"):
        persistent_grid(MAX_GRID - sms + 1, sms)


def test_causal_section_heads(rng, monkeypatch):
    """The causal scheduler's sections hold the heads whose K and V (4 · Sk · D bytes, shared by a GQA group) fit
    the L2 budget: at least one, at most all."""
    from adaattn_core import launch_config
    from adaattn_core.launch_config import causal_section_heads

    monkeypatch.setattr(launch_config, "CAUSAL_SECTION_BYTES", 16 << 20)
    assert causal_section_heads(4096, 64, 1, 128) == 16  # 1 MiB a head
    assert causal_section_heads(4096, 64, 4, 128) == 64  # shared by 4 query heads
    assert causal_section_heads(16384, 128, 1, 16) == 2  # 8 MiB a head
    assert causal_section_heads(16384, 256, 1, 8) == 1  # 16 MiB a head
    assert causal_section_heads(32768, 256, 1, 8) == 1  # 32 MiB: over the budget, still one
    assert causal_section_heads(1024, 64, 1, 5) == 5  # 64 fit, 5 pairs
    assert causal_section_heads(0, 64, 1, 7) == 7  # no keys: every tile is empty, one section
    monkeypatch.setattr(launch_config, "CAUSAL_SECTION_BYTES", 0)  # 0: the old order, one pair per section
    assert causal_section_heads(int(rng.integers(1, 1 << 16)), 128, 1, 64) == 1


def test_entry_points_keep_their_signatures(qkv):
    """The entry points run on q's device through a wrapper that keeps their documented signature (help() and IDEs
    read it) and their calling conventions: every input by position or by name."""
    import inspect

    for function, first in ((aa.attention, "q"), (aa.attention_backward, "dout"), (aa.attention_reference, "q"),
                            (aa.attention_backward_reference, "dout")):
        parameters = inspect.signature(function).parameters
        assert next(iter(parameters)) == first and "causal" in parameters
        assert parameters["causal"].kind is inspect.Parameter.KEYWORD_ONLY
    q, k, v = qkv
    out, lse = aa.attention(q, k, v, causal=True, return_lse=True)
    assert np.array_equal(aa.attention(q=q, k=k, v=v, causal=True), out)
    assert np.array_equal(aa.attention(q, v=v, k=k, causal=True), out)
    assert np.array_equal(aa.attention_reference(q=q, k=k, v=v, causal=True)[0], aa.attention_reference(q, k, v,
                                                                                                       causal=True)[0])
    dout = np.ones_like(out)
    grads = aa.attention_backward(dout, q, k, v, out, lse, causal=True)
    by_name = aa.attention_backward(dout=dout, q=q, k=k, v=v, out=out, lse=lse, causal=True)
    assert all(np.array_equal(a, b) for a, b in zip(grads, by_name))
