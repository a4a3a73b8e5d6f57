"""NumPy adapter: host arrays in, host arrays out, computed on the GPU when one is usable.

    from adaattn_adapters.numpy import attention
    out = attention(q, k, v, causal=True)          # NumPy in, NumPy out; GPU if CuPy sees one, else CPU

`attention` and `attention_backward` have the signatures, semantics and errors of `adaattn_core`'s. With a
usable GPU (`adaattn_core.capabilities().gpu`), the core first validates the host arrays (so errors come
before any transfer), each input is copied to the device once, the GPU backend runs on CuPy's current
stream, and each result is copied back once (lse only when asked for; into `out=` when given). Without one,
the call is the core's CPU backend, unchanged. bfloat16 arrays are `ml_dtypes.bfloat16`.
"""

from __future__ import annotations

from typing import Any

import numpy as np

import adaattn_core
from adaattn_core.policy import Policy, resolve_policy
from adaattn_core.problem import check_flag, check_outputs, describe, describe_backward
from adaattn_core.report import Report

__all__ = ["attention", "attention_backward", "gpu_usable"]


def gpu_usable() -> bool:
    """True when CuPy is installed and sees a CUDA device (probed once per process by the core)."""
    return adaattn_core.capabilities().gpu is not None


def _upload(x: np.ndarray) -> Any:
    import cupy

    return cupy.asarray(x)


def _download(x: Any, into: np.ndarray | None = None) -> np.ndarray:
    if into is None:
        return x.get()
    if into.flags.c_contiguous:
        return x.get(out=into)
    into[...] = x.get()
    return into


def attention(
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    *,
    causal: bool = False,
    scale: float | None = None,
    layout: str = "bhsd",
    policy: str | Policy = "exact",
    return_lse: bool = False,
    out: np.ndarray | None = None,
    lse_out: np.ndarray | None = None,
    report: Report | None = None,
) -> Any:
    """`adaattn_core.attention` on host arrays, on the GPU when one is usable (see the module docstring): the same
    arguments, results and errors."""
    options = {"causal": causal, "scale": scale, "layout": layout}
    if not gpu_usable():
        return adaattn_core.attention(
            q, k, v, policy=policy, return_lse=return_lse, out=out, lse_out=lse_out, report=report, **options
        )
    problem = describe(q, k, v, **options)
    policy = resolve_policy(policy)
    check_flag("return_lse", return_lse)
    check_outputs(problem, q, k, v, out, lse_out)
    dev_out, dev_lse = adaattn_core.attention(
        *map(_upload, (q, k, v)), policy=policy, return_lse=True, report=report, **options
    )
    host_out = _download(dev_out, out)
    host_lse = _download(dev_lse, lse_out) if return_lse or lse_out is not None else None  # lse_out: always written
    return (host_out, host_lse) if return_lse else host_out


def attention_backward(
    dout: np.ndarray,
    q: np.ndarray,
    k: np.ndarray,
    v: np.ndarray,
    out: np.ndarray,
    lse: np.ndarray,
    *,
    causal: bool = False,
    scale: float | None = None,
    layout: str = "bhsd",
    deterministic: bool = False,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`adaattn_core.attention_backward` on host arrays, on the GPU when one is usable."""
    options = {"causal": causal, "scale": scale, "layout": layout}
    if not gpu_usable():
        return adaattn_core.attention_backward(dout, q, k, v, out, lse, deterministic=deterministic, **options)
    describe_backward(dout, q, k, v, out, lse, deterministic=deterministic, **options)
    grads = adaattn_core.attention_backward(
        *map(_upload, (dout, q, k, v, out, lse)), deterministic=deterministic, **options
    )
    return tuple(map(_download, grads))
