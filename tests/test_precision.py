"""Adaptive precision on the CPU: e4m3 rounding, the NumPy emulation of the fp8 forward against float64, the
kernel's P·V key permutation, the capabilities table, and the policy's decisions, overrides and error guard
(with `PrecisionPolicy(..., emulate=True)`, the CPU stand-in for the sm_90 kernel)."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest
from conftest import make_qkv

from adaattn_core import Report, attention, attention_reference
from adaattn_core.bench import outlier_normal
from adaattn_core.cuda_fp8 import key_positions
from adaattn_core.policy import POLICIES, resolve_policy
from adaattn_core.precision import (
    E4M3_MAX,
    FP8,
    P_SHIFT,
    RESCALE_LOG2,
    PrecisionPolicy,
    attend_fp8,
    e4m3_values,
    emulate_forward,
    hadamard,
    precision_capabilities,
    quantise,
    round_e4m3,
    round_to_dtype,
)
from adaattn_core.problem import describe
from adaattn_core.reference import head_errors

ml_dtypes = pytest.importorskip("ml_dtypes")


def _rmse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.sqrt(np.mean((np.asarray(a, np.float64) - b) ** 2)))


def _fp8(q: np.ndarray, k: np.ndarray, v: np.ndarray, causal: bool, rotate: bool = True) -> np.ndarray:
    problem = describe(q, k, v, causal=causal, scale=None, layout="bhsd")
    out, _ = attend_fp8(problem, quantise(problem, q, k, v, rotate=rotate), list(range(problem.heads_q)),
                        online=True)
    return out


def test_round_e4m3_matches_ml_dtypes(rng):
    x = (rng.standard_normal(200_000) * rng.choice([1e-3, 1.0, 50.0, 1e3], 200_000)).astype(np.float32)
    edges = np.float32([0, -0.0, 448, -448, 449, 463.99, 464, 465, 1e9, 2**-9, 1.5 * 2**-9, 2.5 * 2**-9, 2**-11])
    x = np.concatenate([x, edges])
    expected = np.clip(x, -448, 448).astype(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(round_e4m3(x), expected)


def test_round_to_dtype_matches_numpy_casts(rng):
    """The estimator rounds its emulated rows as the kernel's output is rounded (pack2: nearest even)."""
    x = (rng.standard_normal(10_000) * np.exp(rng.uniform(-20, 8, 10_000))).astype(np.float32)  # |x| < 65504
    expected = x.astype(ml_dtypes.bfloat16).astype(np.float32)
    np.testing.assert_array_equal(round_to_dtype(x, "bfloat16"), expected)
    np.testing.assert_array_equal(round_to_dtype(x, "float16"), x.astype(np.float16).astype(np.float32))


def test_v_mean_smoothing_keeps_a_channel_offset_exact(rng):
    """v = 50 + N(0, 1): the V mean is subtracted before rounding and added back exactly, so the error is that
    of the centred part: RMSE 3.8e-3 (without the smoothing 3.1e-1: V's e4m3 rounding and the rounded P's
    normalisation error both scale with the offset)."""
    shape = (1, 2, 512, 64)
    q, k = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    v = (50.0 + rng.standard_normal(shape)).astype(np.float32)
    problem = describe(q, k, v, causal=False, scale=None, layout="bhsd")
    quant = quantise(problem, q, k, v)
    np.testing.assert_allclose(quant.v_mean, v.mean(axis=2), rtol=1e-5)
    ref, _ = attention_reference(*(x.astype(np.float64) for x in (q, k, v)), causal=False)
    assert _rmse(_fp8(q, k, v, causal=False), ref) <= 1e-2


def test_e4m3_values_decode_every_byte():
    expected = np.arange(256, dtype=np.uint8).view(ml_dtypes.float8_e4m3fn).astype(np.float32)
    np.testing.assert_array_equal(e4m3_values(), expected)


def test_key_positions_turn_s_accumulators_into_pv_fragments(rng):
    """The kernel packs, for k32 step 0, lane t's scores of n8 blocks 0..3 (keys {2t, 2t+1} + 8 j) as the
    e4m3 A fragment k indices 4t..4t+3 (blocks 0, 1) and 16+4t.. (blocks 2, 3); V^T column pos(j) must hold
    key j for P·V to pair them right."""
    pos = key_positions(64)
    assert sorted(pos) == list(range(64))
    p = rng.standard_normal(32)
    v = rng.standard_normal(32)
    vt = np.empty(32)
    vt[pos[:32]] = v  # V^T as the quantiser writes it
    a = np.empty(32)
    for t in range(4):
        keys = [2 * t + 8 * j + e for j in range(4) for e in range(2)]  # blocks 0..3, columns 2t, 2t+1
        a[4 * t : 4 * t + 4] = p[keys[:4]]
        a[16 + 4 * t : 16 + 4 * t + 4] = p[keys[4:]]
    assert np.isclose(a @ vt, p @ v)


@pytest.mark.parametrize("causal", [False, True])
def test_emulation_normal_inputs(rng, causal):
    q, k, v = make_qkv(rng, batch=1, heads_q=4, heads_kv=2, seq_q=300, seq_k=520, dim=128)
    ref, _ = attention_reference(q, k, v, causal=causal)
    assert _rmse(_fp8(q, k, v, causal), ref) < 8e-3


def test_emulation_fa3_outlier_test(rng):
    shape = (2, 2, 512, 128)
    q, k, v = (outlier_normal(rng, shape) for _ in range(3))
    ref, _ = attention_reference(q, k, v)
    rotated, plain = _rmse(_fp8(q, k, v, False), ref), _rmse(_fp8(q, k, v, False, rotate=False), ref)
    # Typically 7.5-9.3e-3 (12 seeds; FlashAttention-3 fp8: 9.1e-3), but the RMSE is heavy-tailed at this size:
    # one draw in CI gave 1.3e-2, when an N(0, 100) entry of V widened its channel's scale. The 9e-3 bar is
    # checked on the kernel at a larger size (tests/test_gpu_fp8.py); here: well under per-tensor fp8's 2.4e-2.
    assert rotated < 1.6e-2
    assert rotated < plain  # the Hadamard rotation is what brings it there


@pytest.mark.parametrize("dim", [24, 96])
def test_emulation_runs_head_dims_without_a_rotation(rng, dim):
    """Head dims that are not a power of two have no Hadamard matrix: the emulation (CPU "fp8" policy) skips the
    rotation there instead of failing, and stays within fp8's error."""
    q, k, v = make_qkv(rng, batch=1, heads_q=2, heads_kv=1, seq_q=65, seq_k=130, dim=dim)
    ref, _ = attention_reference(q, k, v, causal=True)
    out = attention(q, k, v, causal=True, policy="fp8")
    assert _rmse(out, ref) < 2e-2
    with pytest.raises(ValueError, match="dim must be a power of two, got 96"):
        hadamard(96)


def test_emulate_forward_writes_only_its_heads_and_masks_rows(rng):
    q, k, v = make_qkv(rng, batch=2, heads_q=4, heads_kv=2, seq_q=40, seq_k=17, dim=64)
    problem = describe(q, k, v, causal=True, scale=None, layout="bhsd")
    out = np.full((2, 4, 40, 64), np.nan, np.float32)
    lse = np.full((2, 4, 40), np.nan, np.float32)
    emulate_forward(problem, q, k, v, out, lse, [1, 3])
    assert np.isnan(out[:, [0, 2]]).all() and np.isnan(lse[:, [0, 2]]).all()
    hidden = 40 - 17  # rows 0..22 see no key (bottom-right alignment)
    assert (out[:, [1, 3], :hidden] == 0).all() and np.isneginf(lse[:, [1, 3], :hidden]).all()
    ref, ref_lse = attention_reference(q, k, v, causal=True)
    assert _rmse(out[:, [1, 3]], ref[:, [1, 3]]) < 2e-2
    np.testing.assert_allclose(lse[:, [1, 3], hidden:], ref_lse[:, [1, 3], hidden:], atol=0.3)


def test_precision_capabilities():
    assert FP8 in precision_capabilities(None) and "emulat" in precision_capabilities(None)[FP8]
    assert precision_capabilities("90")[FP8].startswith("available")
    assert "sm_90a" in precision_capabilities("89")[FP8] and not precision_capabilities("89")[FP8].startswith("a")
    assert "no fp8" in precision_capabilities("80")[FP8]
    assert precision_capabilities("8.0")["bfloat16"].startswith("available")
    assert not precision_capabilities("75")["bfloat16"].startswith("available")


def test_presets_registered():
    for name in ("quality", "balanced", "speed", "fp8"):
        assert isinstance(resolve_policy(name), PrecisionPolicy) and POLICIES[name].name == name
    with pytest.raises(ValueError, match="preset"):
        PrecisionPolicy("fastest")


def _mixed_heads(rng: np.random.Generator, seq: int = 384) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Heads 0, 1 benign (diffuse scores over values sharing a channel mean: fp8 error ~2e-3); heads 2, 3
    outlier-heavy N(0, 1) (fp8 error ~5e-2); one KV head per query head, bfloat16."""
    shape = (1, 2, seq, 64)
    q = np.concatenate([0.05 * rng.standard_normal(shape), outlier_normal(rng, shape)], axis=1)
    k = np.concatenate([rng.standard_normal(shape), outlier_normal(rng, shape)], axis=1)
    v = np.concatenate([2.0 + rng.standard_normal(shape), outlier_normal(rng, shape)], axis=1)
    return tuple(x.astype(ml_dtypes.bfloat16) for x in (q, k, v))


def _plan(policy: PrecisionPolicy, q, k, v, causal: bool = False) -> tuple[list[str], Report]:
    report = Report()
    problem = describe(q, k, v, causal=causal, scale=None, layout="bhsd")
    plan = policy.plan(problem, q, k, v, report)
    return [head.precision for head in plan.heads], report


@pytest.mark.parametrize("causal", [False, True])
def test_balanced_takes_fp8_for_benign_heads_only(rng, causal):
    q, k, v = _mixed_heads(rng)
    precisions, report = _plan(PrecisionPolicy("balanced", emulate=True), q, k, v, causal)
    assert precisions == [FP8, FP8, "bfloat16", "bfloat16"]
    heads = report.estimates["precision"]["heads"]
    assert all(heads[h]["estimated_error"] <= 1e-2 for h in (0, 1))
    assert all(heads[h]["estimated_error"] > 1e-2 for h in (2, 3))
    assert heads[2]["q_crest"] > heads[0]["q_crest"] / 10 and heads[2]["outlier_fraction"] > 0


def test_quality_never_fp8_and_cpu_without_emulation_keeps_16_bits(rng):
    q, k, v = _mixed_heads(rng)
    assert _plan(PrecisionPolicy("quality", emulate=True), q, k, v)[0] == ["bfloat16"] * 4
    precisions, report = _plan(PrecisionPolicy("speed"), q, k, v)
    assert precisions == ["bfloat16"] * 4 and report.estimates["precision"]["fp8"].startswith("unavailable")
    assert _plan(PrecisionPolicy("fp8"), q, k, v)[0] == [FP8] * 4  # forced: the CPU emulates


def test_overrides(rng):
    q, k, v = _mixed_heads(rng)
    policy = PrecisionPolicy("balanced", emulate=True, overrides={0: "bfloat16", 3: FP8})
    precisions, report = _plan(policy, q, k, v)
    assert precisions == ["bfloat16", FP8, "bfloat16", FP8]
    assert report.estimates["precision"]["heads"][3]["overridden"]
    with pytest.raises(ValueError, match="override"):
        _plan(PrecisionPolicy("balanced", overrides={1: "float16"}), q, k, v)
    with pytest.raises(ValueError, match=r"overrides key must be a query head in \[0, 4\), got 4"):
        _plan(PrecisionPolicy("balanced", overrides={4: FP8}), q, k, v)
    with pytest.raises(ValueError, match=r"requested by overrides for heads \[1\] but unavailable"):
        _plan(PrecisionPolicy("balanced", overrides={1: FP8}), q, k, v)  # CPU without emulate
    with pytest.raises(TypeError, match="overrides key must be an int, got '0'"):
        PrecisionPolicy("balanced", overrides={"0": FP8})
    with pytest.raises(TypeError, match=r"overrides\[0\] must be a precision name, got 8"):
        PrecisionPolicy("balanced", overrides={0: 8})


@pytest.mark.parametrize("policy", [PrecisionPolicy("fp8"), PrecisionPolicy("speed", emulate=True),
                                    PrecisionPolicy("balanced", emulate=True, overrides={1: FP8})])
def test_no_keys_keep_the_input_precision_without_error(rng, policy):
    """Sk = 0: out = 0 and lse = -inf at any precision, so every head keeps the input precision (nothing to
    quantise), also where fp8 is forced; the GPU's fp8 kernel does not take Sk = 0, and this must not fail."""
    q, k, v = make_qkv(rng, batch=1, heads_q=2, heads_kv=1, seq_q=5, seq_k=0, dim=64, dtype="bfloat16")
    precisions, report = _plan(policy, q, k, v)
    assert precisions == ["bfloat16", "bfloat16"]
    assert report.estimates["precision"]["fp8"].startswith("unavailable: Sk = 0")
    out, lse = attention(q, k, v, policy=policy, return_lse=True)
    assert (np.asarray(out, np.float32) == 0).all() and np.isneginf(lse).all()


@pytest.mark.parametrize("causal", [False, True])
def test_estimate_tracks_measured_error(rng, causal):
    """The guard's sampled-row estimate is within 2x of the error measured on every row against float64."""
    q, k, v = _mixed_heads(rng, seq=512)
    problem = describe(q, k, v, causal=causal, scale=None, layout="bhsd")
    report = Report()
    plan = PrecisionPolicy("fp8", emulate=True).plan(problem, q, k, v, report)
    out = np.empty(q.shape, q.dtype)
    lse = np.empty(q.shape[:3], np.float32)
    emulate_forward(problem, q, k, v, out, lse, list(range(4)), plan.artifacts)
    measured = head_errors(q, k, v, out, causal=problem.causal, scale=problem.scale)
    for h in range(4):
        estimated = report.estimates["precision"]["heads"][h]["estimated_error"]
        ratio = estimated / measured[h]
        assert 0.5 <= ratio <= 2.0, (h, estimated, measured[h])
        assert plan.heads[h].precision == FP8


def test_balanced_guard_holds_on_held_out_inputs(rng):
    """Whatever heads "balanced" sends to fp8, their measured error stays under its tolerance."""
    for _ in range(3):
        q, k, v = _mixed_heads(rng, seq=int(rng.integers(64, 400)))
        problem = describe(q, k, v, causal=bool(rng.integers(2)), scale=None, layout="bhsd")
        plan = PrecisionPolicy("balanced", emulate=True).plan(problem, q, k, v, None)
        fp8_heads = [h for h, head in enumerate(plan.heads) if head.precision == FP8]
        assert fp8_heads, "no head went fp8: the guard below would hold vacuously"
        out = np.zeros(q.shape, q.dtype)
        lse = np.zeros(q.shape[:3], np.float32)
        emulate_forward(problem, q, k, v, out, lse, fp8_heads, plan.artifacts)
        measured = head_errors(q, k, v, out, causal=problem.causal, scale=problem.scale)
        assert all(measured[h] <= 1e-2 for h in fp8_heads)
        assert math.isfinite(sum(measured))


def test_emulation_constants_are_the_kernels():
    """The emulation's lazy-rescale threshold and P shift are the fp8 kernel's constexprs (two homes by
    necessity: the kernel is compiled from its source; this test keeps them equal)."""
    source = (Path(__file__).resolve().parents[1] / "cuda_src" / "attention_fwd_fp8_sm90.cu").read_text()
    threshold = re.search(r"constexpr float RESCALE_LOG2 = ([0-9.]+)f;", source)
    log2_max = re.search(r"constexpr float P_SHIFT = ([0-9.]+)f - RESCALE_LOG2;", source)
    assert threshold and log2_max, "RESCALE_LOG2 / P_SHIFT not found in attention_fwd_fp8_sm90.cu"
    assert float(threshold[1]) == RESCALE_LOG2
    assert np.float32(float(log2_max[1]) - float(threshold[1])) == np.float32(P_SHIFT)
    assert float(log2_max[1]) == pytest.approx(math.log2(E4M3_MAX), abs=1e-12)


def test_fp8_key_tiles_are_shapes_the_kernel_has():
    """Every key tile of the table is one the kernel's static_assert admits (a WgmmaE4m3 shape) and a whole
    number of V^T chunks, so a retuned table can only name tiles that compile."""
    from adaattn_core.launch_config import FP8_KEY_TILE_CHOICES, FP8_KEY_TILES, FP8_V_CHUNK

    source = (Path(__file__).resolve().parents[1] / "cuda_src" / "attention_fwd_fp8_sm90.cu").read_text()
    admitted = re.search(r"static_assert\((BLOCK_N == \d+(?: \|\| BLOCK_N == \d+)*),", source)
    assert admitted, "the BLOCK_N static_assert not found in attention_fwd_fp8_sm90.cu"
    assert tuple(int(n) for n in re.findall(r"\d+", admitted[1])) == FP8_KEY_TILE_CHOICES
    assert all(tile in FP8_KEY_TILE_CHOICES and tile % FP8_V_CHUNK == 0 for tile in FP8_KEY_TILES.values())


#: Keys per K scale by (head dim, key tile): the largest part of at most 128 keys in whole n8 column blocks.
K_BLOCKS = {(64, 64): 64, (64, 128): 128, (64, 192): 96, (64, 224): 112,
            (128, 64): 64, (128, 128): 128, (128, 192): 96, (128, 224): 112}


@pytest.mark.parametrize(("head_dim", "tile"), sorted(K_BLOCKS))
def test_fp8_k_blocks_fit_the_quantiser_and_the_kernel(monkeypatch, head_dim, tile):
    """For every admitted tile and kernel head dim, the K scale block is what both kernels' static_asserts need
    (a divisor of the tile in whole n8 column blocks) and at most FP8_K_BLOCK_MAX keys (the quantiser's one row
    step of registers)."""
    from adaattn_core import launch_config as lc

    monkeypatch.setattr(lc, "FP8_KEY_TILES", {(head_dim, False): tile})
    block = lc.fp8_k_block(head_dim, False)
    assert tile % block == 0 and block % 8 == 0 and block <= lc.FP8_K_BLOCK_MAX
    assert block == K_BLOCKS[(head_dim, tile)]


def test_fp8_quantiser_launch_geometry():
    """The statistics pass splits every head's keys into whole FP8_STATS_ROWS steps, none empty, covering every key,
    with about FP8_STATS_BLOCKS_PER_SM blocks per SM in all; the quantiser's grid at the profiled call (D = 128, 4k,
    B·H = 64) is the 5568 blocks ncu reported (benchmarks/results/logs/2026-12-03-H200-ncu-fp8-5bd1b52.txt), and
    the H200's 132 SMs take four 1024-key splits per head there (256 blocks)."""
    from adaattn_core import launch_config as lc

    assert lc.fp8_quantize_blocks(128, False, 4096, 4096, 64, 64) == 5568
    assert lc.fp8_stats_splits(4096, 64, 132) == (4, 1024)
    for sms in (78, 114, 132):  # a smaller part, the H100 PCIe, the H100 SXM and H200
        for heads in (1, 3, 16, 64, 300):
            for seqlen in (0, 1, 255, 256, 257, 1000, 4096, 16384, 65537):
                splits, rows = lc.fp8_stats_splits(seqlen, heads, sms)
                assert rows % lc.FP8_STATS_ROWS == 0 and splits * rows >= seqlen, (seqlen, heads, sms)
                assert seqlen == 0 or (splits - 1) * rows < seqlen, (seqlen, heads, sms)  # no empty split
                assert splits <= max(1, -(-lc.FP8_STATS_BLOCKS_PER_SM * sms // heads)), (seqlen, heads, sms)


@pytest.mark.parametrize("head_dim", [4, 8, 24, 256])
def test_fp8_k_block_of_emulation_only_head_dims(head_dim):
    """Head dims without a kernel (the NumPy emulation runs any D) get a K block of the default tile instead
    of an error."""
    from adaattn_core.launch_config import FP8_DEFAULT_KEY_TILE, fp8_k_block

    block = fp8_k_block(head_dim, False)
    assert FP8_DEFAULT_KEY_TILE % block == 0 and 0 < block <= FP8_DEFAULT_KEY_TILE
