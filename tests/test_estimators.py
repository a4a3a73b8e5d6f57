"""Rank estimators against exact NumPy: the probe (NumPy path here, Numba kernels under the CUDA simulator in a
subprocess), the pooled map, power iteration, Hutch++ and randomized SVD."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from conftest import make_qkv

from adaattn_core import attention_reference, estimators
from adaattn_core.problem import describe

ROOT = Path(__file__).resolve().parents[1]


def _exact_rows(q, k, v, rows, *, causal):
    """float64 softmax rows of the probe from the full score matrix: (probabilities [B, Hq, m, Sk], their
    unnormalised row sums [B, Hq, m], 0 for rows that see no key)."""
    q64, k64, v64 = (np.asarray(x, dtype=np.float64) for x in (q, k, v))
    group = q64.shape[1] // k64.shape[1]
    k64, v64 = np.repeat(k64, group, axis=1), np.repeat(v64, group, axis=1)
    scores = q64[:, :, rows] @ k64.swapaxes(-1, -2) / np.sqrt(q64.shape[-1])
    sq, sk = q64.shape[2], k64.shape[2]
    if causal:
        scores = np.where(np.arange(sk)[None, :] <= rows[:, None] + sk - sq, scores, -np.inf)
    row_max = scores.max(axis=-1, keepdims=True)
    weights = np.exp(scores - np.where(np.isneginf(row_max), 0, row_max))
    total = weights.sum(axis=-1, keepdims=True)
    return weights / np.where(total > 0, total, 1), total[..., 0]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("seq_q,seq_k,heads_kv", [(97, 97, 4), (33, 130, 2), (130, 33, 1), (1, 1, 4)])
def test_probe_numpy_matches_exact(rng, causal, seq_q, seq_k, heads_kv):
    q, k, v = make_qkv(rng, batch=2, heads_q=4, heads_kv=heads_kv, seq_q=seq_q, seq_k=seq_k, dim=24)
    problem = describe(q, k, v, causal=causal, scale=None, layout="bhsd")
    rows = estimators.probe_rows(problem, 9, seed=3)
    result = estimators.probe(problem, q, k, v, rows, topk=3)
    probs, total = _exact_rows(q, k, v, rows, causal=causal)
    ref_out, ref_lse = attention_reference(q, k, v, causal=causal)
    seen = total > 0
    with np.errstate(divide="ignore", invalid="ignore"):
        entropy = np.where(seen, -(np.where(probs > 0, probs * np.log(probs), 0)).sum(axis=-1), 0)
    np.testing.assert_allclose(result.entropy, entropy, atol=1e-4)
    np.testing.assert_allclose(result.out, ref_out[:, :, rows], atol=1e-5)
    np.testing.assert_array_equal(np.isfinite(result.lse), np.isfinite(ref_lse[:, :, rows]))
    np.testing.assert_allclose(result.lse[seen], ref_lse[:, :, rows][seen], atol=1e-5)
    np.testing.assert_allclose(result.topk_mass, np.sort(probs, axis=-1)[..., ::-1][..., :3].sum(axis=-1),
                               atol=1e-5)
    np.testing.assert_allclose(result.col_mass, probs.sum(axis=2), atol=1e-5)


def test_probe_rows_include_the_last_rows_when_causal():
    q = np.zeros((1, 1, 1000, 8), dtype=np.float32)
    causal = describe(q, q, q, causal=True, scale=None, layout="bhsd")
    rows = estimators.probe_rows(causal, 16, seed=1)
    assert len(rows) == 16 and len(set(rows)) == 16 and {996, 997, 998, 999} <= set(rows)
    assert np.array_equal(rows, estimators.probe_rows(causal, 16, seed=1))
    plain = describe(q, q, q, causal=False, scale=None, layout="bhsd")
    assert len(estimators.probe_rows(plain, 16)) == 16
    assert len(estimators.probe_rows(describe(q[:, :, :5], q, q, causal=True, scale=None, layout="bhsd"), 16)) == 5
    with pytest.raises(ValueError, match="count must be >= 1, got 0"):
        estimators.probe_rows(plain, 0)


@pytest.mark.parametrize("seq_q,seq_k", [(1000, 100), (1000, 999), (64, 1000)])
def test_causal_probe_rows_see_two_keys_and_uniform_heads_look_uniform(rng, seq_q, seq_k):
    """Causal with Sq > Sk, most rows see no key: probe rows come from those that see two keys or more, so that a
    uniform head's normalised entropy is ~1 (it averaged in 0 for every hidden row, and such heads went dense as
    'peaked') and the sink threshold is not inflated by rows that see one key."""
    q, k, v = make_qkv(rng, batch=1, heads_q=2, heads_kv=1, seq_q=seq_q, seq_k=seq_k, dim=16)
    q, k = 1e-3 * q, 1e-3 * k  # scores ~0: every row uniform over the keys it sees
    problem = describe(q, k, v, causal=True, scale=None, layout="bhsd")
    rows = estimators.probe_rows(problem, 16, seed=4)
    limits = problem.keys_seen(rows)
    assert len(rows) == 16 and (limits >= 2).all(), (rows, limits)
    probe = estimators.probe(problem, q, k, v, rows)
    stats, _ = estimators.head_statistics(probe, limits, 0.5, 0.2, 1)
    assert (np.asarray(stats)[:, 0] > 0.99).all(), stats[:, 0]


def test_probe_rejects_bad_arguments(rng, monkeypatch):
    q, k, v = make_qkv(rng, seq_q=10, dim=8)
    problem = describe(q, k, v, causal=False, scale=None, layout="bhsd")
    with pytest.raises(ValueError, match="topk"):
        estimators.probe(problem, q, k, v, np.arange(3), topk=estimators.MAX_TOPK + 1)
    with pytest.raises(ValueError, match="rows"):
        estimators.probe(problem, q, k, v, np.array([10]))
    with pytest.raises(ValueError, match="probe kernels"):
        estimators.probe(problem, q, k, v, np.arange(10).repeat(4)[: estimators.MAX_ROWS + 1], kernel=True)
    # More (batch, head) pairs than the kernels' grid.y takes: an error when the kernels are forced (the default
    # takes array operations then).
    monkeypatch.setattr(estimators.launch_config, "MAX_GRID_YZ", problem.batch * problem.heads_q - 1)
    with pytest.raises(ValueError, match=rf"B \* Hq = {problem.batch * problem.heads_q}"):
        estimators.probe(problem, q, k, v, np.arange(3), kernel=True)


def test_head_statistics_rejects_bad_arguments(rng):
    q, k, v = make_qkv(rng, seq_q=40, dim=8)
    problem = describe(q, k, v, causal=True, scale=None, layout="bhsd")
    rows = estimators.probe_rows(problem, 3)
    probe = estimators.probe(problem, q, k, v, rows)
    limits = problem.keys_seen(rows)
    with pytest.raises(ValueError, match=r"limits must have one entry per probe row \(3\), got 2"):
        estimators.head_statistics(probe, limits[:2], 0.1, 0.2, 2)
    with pytest.raises(ValueError, match=r"count must be in \[0, 40\] \(the keys\), got 41"):
        estimators.head_statistics(probe, limits, 0.1, 0.2, 41)
    slots = estimators.MAX_SINK_SLOTS
    with pytest.raises(ValueError, match=f"at most {slots} sinks, got count = {slots + 1}"):
        estimators.head_statistics(probe, limits, 0.1, 0.2, slots + 1, kernel=True)


# --------------------------------------------------------------------------------------------------------------
# The Numba CUDA kernels under the simulator (a subprocess: the simulator is chosen when numba.cuda first imports,
# and a GPU run of the suite must keep the real target in the main process).

SIMULATOR_SCRIPT = textwrap.dedent("""
    import sys, threading, traceback
    import numpy as np, ml_dtypes
    from numba.cuda.simulator import kernelapi
    from adaattn_core import estimators
    from adaattn_core.problem import describe
    # The simulator runs each CUDA thread as a Python thread and creates a block's shared arrays on first use,
    # keyed by the calling line, without a lock (numba-cuda's FakeCUDAShared.array: look up, then store): a thread
    # preempted in between gets an array of its own and the kernel reads garbage. The same, under a lock.
    _lock, _array = threading.Lock(), kernelapi.FakeCUDAShared.array
    def _shared_array(self, shape, dtype, alignment=None):
        if shape == 0 or alignment is not None:  # dynamic shared memory / unsupported: as the simulator does
            return _array(self, shape, dtype, alignment)
        caller = tuple(traceback.extract_stack(sys._getframe(1), limit=1)[-1])[0:2]
        with _lock:
            if caller not in self._allocations:
                self._allocations[caller] = np.empty(shape, kernelapi.numpy_support.as_dtype(dtype)
                                                     if isinstance(dtype, kernelapi.types.Type) else dtype)
            return self._allocations[caller]
    kernelapi.FakeCUDAShared.array = _shared_array
    rng = np.random.default_rng({seed})
    # (dtype, causal, B, Sq, Sk, Hkv, D, probe rows): 300 keys span three scores-kernel blocks and two
    # output-kernel chunks, D = 40 three key tiles of the scores kernel (the last one partial); causal Sq > Sk
    # hides every key from the first rows (lse -inf): rows 0 and 1, added to the probe rows, in (40, 21).
    cases = [("float32", False, 1, 29, 29, 2, 12, 3), ("bfloat16", True, 1, 19, 45, 1, 12, 3),
             ("float16", True, 1, 40, 21, 2, 12, 8), ("float64", False, 1, 7, 150, 1, 12, 3),
             ("bfloat16", True, 2, 60, 300, 2, 40, 8)]
    for dtype, causal, batch, sq, sk, hkv, dim, m in cases:
        cast = ml_dtypes.bfloat16 if dtype == "bfloat16" else np.dtype(dtype)
        q = rng.standard_normal((batch, 2, sq, dim)).astype(cast)
        k = (rng.standard_normal((batch, hkv, sk, dim)) * 2).astype(cast)
        v = rng.standard_normal((batch, hkv, sk, dim)).astype(cast)
        problem = describe(q, k, v, causal=causal, scale=None, layout="bhsd")
        rows = np.unique(np.r_[0, 1, estimators.probe_rows(problem, m - 2, seed=1)])
        ref = estimators.probe(problem, q, k, v, rows, topk=4, kernel=False)
        got = estimators.probe(problem, q, k, v, rows, topk=4, kernel=True)
        for name in ("out", "lse", "entropy", "topk_mass", "col_mass"):
            a, b = np.asarray(getattr(got, name), np.float64), np.asarray(getattr(ref, name), np.float64)
            assert np.array_equal(np.isfinite(a), np.isfinite(b)), (dtype, name)
            err = np.abs(np.where(np.isfinite(a), a - b, 0)).max()
            assert err < 1e-4, (dtype, causal, name, err)
        # The per-head reduction: the kernel against the array path on the same probe, the sink threshold at
        # half the largest share, so that some head has a sink (the sink table is not all -1).
        limits = problem.keys_seen(rows)
        rows_seen = max(1, int((limits > 0).sum()))
        threshold = 0.5 * float((np.asarray(got.col_mass).max(axis=0) / rows_seen).max())
        reduce = (limits, threshold, 0.2, min(4, sk))
        want = estimators.head_statistics(got, *reduce, kernel=False)
        have = estimators.head_statistics(got, *reduce, kernel=True)
        assert np.allclose(have[0], want[0], rtol=1e-5, atol=1e-6), (dtype, causal, have[0], want[0])
        assert np.array_equal(have[1], want[1]) and (want[1] >= 0).any(), (dtype, causal, have[1], want[1])
    print("simulator ok")
""")


def test_same_stream_hands_over_the_interface_without_its_stream(rng):
    # What the Numba launches get instead of a CuPy array: the producer's interface minus "stream" (no sync),
    # the producer's own dictionary untouched, and the array kept alive beside it.
    class Producer:
        def __init__(self) -> None:
            self.interface = {"shape": tuple(int(n) for n in rng.integers(1, 50, size=3)), "typestr": "<f4",
                              "data": (int(rng.integers(1, 1 << 40)), False), "strides": None, "version": 3,
                              "stream": int(rng.integers(3, 1 << 40))}

        @property
        def __cuda_array_interface__(self) -> dict:
            return self.interface

    producer = Producer()
    handed = estimators._SameStream(producer)
    assert handed.__cuda_array_interface__ == {k: v for k, v in producer.interface.items() if k != "stream"}
    assert "stream" in producer.interface
    assert handed.array is producer


@pytest.mark.skipif(importlib.util.find_spec("numba_cuda") is None, reason="numba-cuda is not installed")
def test_probe_kernels_under_cuda_simulator(rng):
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "1", "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}
    # Seeded from the run's seed (ADAATTN_TEST_SEED reproduces a failure), like every other test's inputs.
    result = subprocess.run([sys.executable, "-c", SIMULATOR_SCRIPT.format(seed=int(rng.integers(1 << 31)))],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "simulator ok" in result.stdout


# --------------------------------------------------------------------------------------------------------------
# Pooled map and spectrum


def _maps(rng, *, causal, temperature):
    q, k, v = make_qkv(rng, batch=2, heads_q=4, heads_kv=2, seq_q=1000, seq_k=1000, dim=16)
    # A smooth low-dimensional component along the sequence gives the pooled map real structure.
    trend = np.sin(np.linspace(0, 6, 1000))[None, None, :, None] * rng.standard_normal((1, 1, 1, 16))
    q, k = ((temperature * (x + 3 * trend)).astype(np.float32) for x in (q, k))
    problem = describe(q, k, v, causal=causal, scale=None, layout="bhsd")
    return estimators.pooled_map(problem, q, k, 32)


def test_pooled_map_matches_definition(rng):
    q, k, v = make_qkv(rng, batch=1, heads_q=2, heads_kv=1, seq_q=70, seq_k=45, dim=8)
    for causal in (False, True):
        problem = describe(q, k, v, causal=causal, scale=None, layout="bhsd")
        a = estimators.pooled_map(problem, q, k, 16)
        assert a.shape == (2, 5, 3)
        q_bar = np.stack([q[0, :, i: i + 16].mean(axis=1) for i in range(0, 70, 16)], axis=1)
        k_bar = np.stack([k[0, 0, i: i + 16].mean(axis=0) for i in range(0, 45, 16)])
        scores = q_bar @ k_bar.T / np.sqrt(8)
        if causal:  # key block c visible from query block i when its first key j = 16c <= last row + (45 - 70)
            last = np.minimum(16 * np.arange(1, 6), 70) - 1 - 25
            scores = np.where(16 * np.arange(3)[None, :] <= last[:, None], scores, -np.inf)
        with np.errstate(invalid="ignore"):
            ref = np.exp(scores - scores.max(axis=-1, keepdims=True))
            ref = np.nan_to_num(ref / ref.sum(axis=-1, keepdims=True))
        np.testing.assert_allclose(a, ref, atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("temperature", [0.3, 1.0, 3.0])
def test_spectral_norm_and_stable_rank_within_5_percent(rng, causal, temperature):
    a = _maps(rng, causal=causal, temperature=temperature)
    spec = estimators.spectrum(a, seed=int(rng.integers(1 << 31)))
    values = np.linalg.svd(a, compute_uv=False)
    np.testing.assert_allclose(spec.spectral_norm, values[:, 0], rtol=0.05)
    exact_stable = (values**2).sum(axis=-1) / values[:, 0] ** 2
    np.testing.assert_allclose(spec.stable_rank, exact_stable, rtol=0.05)
    energy = (np.cumsum(values**2, axis=-1) < 0.95 * (values**2).sum(axis=-1, keepdims=True)).sum(axis=-1) + 1
    assert np.all(np.abs(spec.energy_rank - energy) <= 1)


def test_randomized_svd_matches_numpy(rng):
    a = _maps(rng, causal=False, temperature=1.0)
    values = estimators.randomized_singular_values(a, 8, np.random.default_rng(int(rng.integers(1 << 31))))
    np.testing.assert_allclose(values, np.linalg.svd(a, compute_uv=False)[:, :8], rtol=0.05)


def test_hutchpp_within_its_standard_error():
    """Over 200 seeded draws the error is below 3 standard errors in >= 90% of them, and the mean is unbiased."""
    a = _maps(np.random.default_rng(7), causal=True, temperature=3.0)[:1]
    exact = float((a**2).sum())
    estimates, errors = [], []
    for seed in range(200):
        estimate, se = estimators.hutchpp_frobenius(a, 24, np.random.default_rng(seed))
        estimates.append(estimate[0])
        errors.append(abs(estimate[0] - exact) / max(se[0], 1e-12))
    assert np.mean(np.array(errors) <= 3) >= 0.9
    assert abs(np.mean(estimates) - exact) <= 4 * np.std(estimates) / np.sqrt(200)
    with pytest.raises(ValueError, match="samples"):
        estimators.hutchpp_frobenius(a, 5, np.random.default_rng(0))


def test_power_iteration_never_overestimates_and_converges(rng):
    a = rng.random((5, 20, 30))
    sigma = estimators.power_iteration(a, 3, np.random.default_rng(0))
    top = np.linalg.svd(a, compute_uv=False)[:, 0]
    assert np.all(sigma <= top * (1 + 1e-12))  # ‖A x‖ with ‖x‖ = 1: a lower bound by construction
    # ...that 3 iterations bring close for a dominant σ₁ (positive entries; worst of 200 draws: 0.974)
    assert np.all(sigma >= 0.9 * top)
    with pytest.raises(ValueError, match="energy"):
        estimators.spectrum(a, energy=1.5)
    with pytest.raises(ValueError, match="max_rank must be >= 1, got 0"):
        estimators.spectrum(a, max_rank=0)
