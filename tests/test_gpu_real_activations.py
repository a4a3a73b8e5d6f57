"""Adaptive policies on a trained model's q, k, v (issue #9): every head a policy approximates stays within
that policy's tolerance, measured against float64 on all rows.

The activations come from `python3 -m benchmarks.quality.run` (bf16, post-RoPE, causal); the tests skip when
the file is missing. Policies without a finite tolerance ("speed" caps its guard, "fp8" has none) are held
to the guard they state, or only to finite, bounded output.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from conftest import to_host64

import adaattn_core as aa
from adaattn_core.policy import POLICIES

pytestmark = pytest.mark.gpu

ADAPTIVE = sorted(name for name in POLICIES if name != "exact")


@pytest.fixture(scope="module")
def activations():
    from benchmarks.quality.activations import default_activations_path, load_activations

    path = default_activations_path()
    if not path.is_file():
        pytest.skip(f"no activation file at {path} (python3 -m benchmarks.quality.run writes it)")
    cupy = pytest.importorskip("cupy")
    tensors = load_activations(path)["tensors"]
    return {name: tuple(cupy.asarray(qkv[x].astype(np.float32)).astype("bfloat16") for x in "qkv")
            for name, qkv in tensors.items()}


def _per_head_rel_l2(out, ref) -> np.ndarray:
    out64, ref64 = to_host64(out)[0], to_host64(ref)[0]   # [H, S, D], batch entry 0
    diff = np.linalg.norm((out64 - ref64).reshape(out64.shape[0], -1), axis=1)
    return diff / np.maximum(np.linalg.norm(ref64.reshape(ref64.shape[0], -1), axis=1), 1e-30)


@pytest.mark.parametrize("name", ADAPTIVE)
def test_policy_within_tolerance_on_real_activations(activations, name):
    policy = POLICIES[name]
    tolerance = getattr(policy, "tolerance", None)
    for entry, (q, k, v) in activations.items():
        report = aa.Report()
        out = aa.attention(q, k, v, causal=True, policy=policy, report=report)
        ref, _ = aa.attention_reference(q, k, v, causal=True)
        errors = _per_head_rel_l2(out, ref)
        assert np.isfinite(errors).all(), f"{name} {entry}: non-finite output"
        exact_error = _per_head_rel_l2(aa.attention(q, k, v, causal=True), ref)
        for head, plan in enumerate(report.plan.heads):
            approximated = plan.path != "dense" or plan.precision != "bfloat16"
            if not approximated:
                assert errors[head] <= 2 * exact_error[head] + 1e-5, (
                    f"{name} {entry} head {head} (dense bf16): measured {errors[head]:.3e} vs at most "
                    f"2 × exact's {exact_error[head]:.3e} + 1e-5")
            elif tolerance is not None and math.isfinite(tolerance):
                assert errors[head] <= tolerance, (
                    f"{name} {entry} head {head} ({plan}): measured {errors[head]:.3e} vs tolerance {tolerance:.1e}"
                )
            else:
                assert errors[head] <= 0.1, (
                    f"{name} {entry} head {head} ({plan}): measured {errors[head]:.3e} vs bound 0.1")
