"""Shared test helpers: fresh random inputs per run, layouts/strides, and the same-dtype naive baseline."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import zlib
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from adaattn_core._arrays import to_host64  # noqa: F401 - the tests import it from here

SEED = int(os.environ.get("ADAATTN_TEST_SEED", np.random.SeedSequence().entropy % (1 << 32)))


def pytest_report_header(config: pytest.Config) -> str:
    return f"adaattn random seed: {SEED} (reproduce with ADAATTN_TEST_SEED={SEED})"


def gpu_available() -> bool:
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if gpu_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU with CuPy")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def rng(request: pytest.FixtureRequest) -> np.random.Generator:
    """A generator seeded from the run's seed and the test's id: new inputs every run, reproducible (crc32, not
    hash(): Python salts string hashes per process)."""
    return np.random.default_rng([SEED, zlib.crc32(request.node.nodeid.encode())])


def np_dtype(name: str) -> Any:
    if name == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(name)


def make_qkv(
    rng: np.random.Generator,
    *,
    batch: int = 2,
    heads_q: int = 4,
    heads_kv: int | None = None,
    seq_q: int = 33,
    seq_k: int | None = None,
    dim: int = 32,
    dtype: str = "float32",
    layout: str = "bhsd",
    contiguous: bool = True,
    offset: int = 3,
    xp: Any = np,
) -> tuple[Any, Any, Any]:
    """Random q, k, v in `layout`; with `contiguous=False`, strided views of larger buffers."""
    heads_kv = heads_q if heads_kv is None else heads_kv
    seq_k = seq_q if seq_k is None else seq_k

    def one(heads: int, seq: int) -> Any:
        shape = (batch, heads, seq, dim) if layout == "bhsd" else (batch, seq, heads, dim)
        if contiguous:
            return xp.asarray(rng.standard_normal(shape)).astype(dtype_of(dtype))
        # Every other batch entry of a buffer with a padded last axis: no axis keeps its contiguous
        # stride. `offset` shifts the start inside the padding (8 keeps 16-byte alignment for 2-byte types).
        padded = xp.asarray(rng.standard_normal((2 * batch, *shape[1:3], dim + 16))).astype(dtype_of(dtype))
        return padded[::2, ..., offset : offset + dim]

    dtype_of = np_dtype if xp is np else (lambda name: name)
    return one(heads_q, seq_q), one(heads_kv, seq_k), one(heads_kv, seq_k)


def naive_same_dtype(q: Any, k: Any, v: Any, *, causal: bool, layout: str) -> Any:
    """Naive attention with every intermediate rounded to the input dtype (the FlashAttention test baseline).

    Works on NumPy and CuPy arrays; scores and probabilities are rounded to q.dtype, as a naive
    implementation in that dtype stores them, and the output is returned in q.dtype.
    """
    from adaattn_core._arrays import library_name, namespace
    from adaattn_core.problem import to_bhsd

    xp = namespace(library_name(q))
    dtype = q.dtype
    qb, kb, vb = (to_bhsd(x, layout).astype(xp.float32) for x in (q, k, v))
    group = qb.shape[1] // kb.shape[1]
    kb, vb = xp.repeat(kb, group, axis=1), xp.repeat(vb, group, axis=1)
    scores = (qb @ kb.swapaxes(-1, -2) / np.float32(np.sqrt(qb.shape[-1]))).astype(dtype).astype(xp.float32)
    if causal:
        sq, sk = scores.shape[-2:]
        visible = xp.arange(sk)[None, :] <= xp.arange(sq)[:, None] + (sk - sq)
        scores = xp.where(visible, scores, -xp.inf)
    row_max = scores.max(axis=-1, keepdims=True)
    row_max = xp.where(xp.isneginf(row_max), 0, row_max)
    weights = xp.exp(scores - row_max)
    total = weights.sum(axis=-1, keepdims=True)
    probs = (weights / xp.where(total > 0, total, 1)).astype(dtype).astype(xp.float32)
    out = (probs @ vb).astype(dtype)
    return to_bhsd(out, layout)


def max_abs(a: Any, b: Any) -> float:
    a64, b64 = to_host64(a), to_host64(b)
    assert a64.shape == b64.shape, f"compared arrays differ in shape: {a64.shape} vs {b64.shape}"  # no broadcast
    return float(np.abs(a64 - b64).max()) if a64.size else 0.0


def close(a: Any, b: Any, tol: float = 1e-5) -> bool:
    """max |a − b| ≤ tol · max(max |b|, 1): relative, but exact zeros (e.g. dq with one key) may carry rounding
    noise. NumPy, CuPy, torch or JAX arrays of one shape."""
    b64 = to_host64(b)
    return max_abs(a, b64) <= tol * max(float(np.abs(b64).max(initial=0)), 1.0)


def run_cli(*args: str, cwd: Any = None) -> subprocess.CompletedProcess:
    """`adaattn ARGS` in a subprocess (python -m adaattn_core.cli), output captured as text."""
    return subprocess.run([sys.executable, "-m", "adaattn_core.cli", *args], capture_output=True, text=True,
                          timeout=120, cwd=cwd)


OUTPUT_FACTOR = 2
GRADIENT_FACTOR = 3


def assert_close_to_naive(
    got: Any, ref: Any, naive: Any, *, what: str = "output", factor: float = OUTPUT_FACTOR, eps: float = 1e-5
) -> None:
    """Flash-attention's accuracy rule: max |got − ref| ≤ factor × max |naive − ref| + eps.

    `ref` is the float64 reference and `naive` a naive implementation in the same dtype as `got` (every
    intermediate rounded to that dtype, e.g. `naive_same_dtype`): the error against the reference is at most
    `factor` times the naive implementation's error, plus eps. FlashAttention-2's own tests
    (tests/test_flash_attn.py) use 2× for the output (OUTPUT_FACTOR) and 3× for dq, dk, dv (GRADIENT_FACTOR):
    gradients pass through more rounded intermediates (P and dS rounded to 16 bits before their matmuls), and
    the max over a large tensor of a ratio of rounding errors fluctuates from draw to draw (two full GPU runs each
    had one dq at 2.25× and 2.14× the naive error, draws that passed on rerun).
    `what` names the checked tensor in the failure message.
    """
    err, naive_err = max_abs(got, ref), max_abs(naive, ref)
    bound = factor * naive_err + eps
    ratio = err / naive_err if naive_err else float("inf") if err else 0.0
    assert err <= bound, (
        f"{what}: max error {err:.3e} is {ratio:.2f}× the naive error {naive_err:.3e}, "
        f"over the bound {factor:g} × naive + {eps:g} = {bound:.3e}"
    )


def rel_l2(a: Any, b: Any) -> float:
    a64, b64 = to_host64(a), to_host64(b)
    norm = np.linalg.norm(b64)
    return float(np.linalg.norm(a64 - b64) / norm) if norm else float(np.linalg.norm(a64))


@contextlib.contextmanager
def forced_kernel(variable: str, choice: str, plan_cache: Any) -> Iterator[None]:
    """$variable = choice for the duration (ADAATTN_FORWARD_KERNEL / ADAATTN_BACKWARD_KERNEL); the launcher reads
    it when it builds a launch plan, so its plan cache (an lru_cache'd function) is cleared on entry and exit."""
    previous = os.environ.get(variable)
    os.environ[variable] = choice
    plan_cache.cache_clear()
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(variable, None)
        else:
            os.environ[variable] = previous
        plan_cache.cache_clear()
