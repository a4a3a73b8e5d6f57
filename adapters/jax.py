"""JAX adapter: AdaAttn on JAX arrays, usable under `jax.jit`, differentiable through `jax.custom_vjp`.

    from adaattn_adapters.jax import attention
    out = attention(q, k, v, causal=True)          # q: [B, T, Nq, H], k/v: [B, S, Nkv, H] (jax.nn's order)

Semantics, dtypes and errors are `adaattn_core.attention`'s; the default layout is "bshd", the (B, T, N, H)
order of `jax.nn.dot_product_attention`, and causal=True is aligned bottom-right when T != S (jax.nn aligns
top-left). The core validates at trace time, on zero-byte NumPy stand-ins with the inputs' shapes and
dtypes, so bad input raises its TypeError/ValueError from the call, not from inside XLA.

Execution, picked per platform at lowering (`jax.lax.platform_dependent`):
- GPU: `jax.experimental.buffer_callback` runs the core's CuPy path on XLA's stream (no synchronisation),
  reading XLA's input buffers and writing out and lse into XLA's output buffers through DLPack views. The
  backward's dq, dk, dv are allocated by the core in CuPy's memory pool and copied once into XLA's buffers.
  Set `XLA_PYTHON_CLIENT_PREALLOCATE=false` so that XLA leaves GPU memory for CuPy.
- CPU: `jax.pure_callback` into the NumPy CPU backend.

The backward (`adaattn_core.attention_backward`) recomputes the softmax from the saved lse; `jax.grad` works
under `jax.jit`. `vmap` runs the callback once per mapped element. `scale`, `layout` and `policy` (by name)
must be static (hashable Python values).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import numpy as np
from jax.experimental.buffer_callback import buffer_callback

import adaattn_core
from adaattn_core._arrays import lse_dtype
from adaattn_core.policy import resolve_policy
from adaattn_core.problem import describe

__all__ = ["attention"]

Array = jax.Array


def attention(
    q: Array, k: Array, v: Array, *,
    causal: bool = False, scale: float | None = None, layout: str = "bshd", policy: str = "exact",
) -> Array:
    """`adaattn_core.attention` on JAX arrays.

    q: [B, Tq, Nq, H] ("bshd", default) or [B, Nq, Tq, H] ("bhsd"); k, v: [B, Tk, Nkv, H] or [B, Nkv, Tk, H],
    Nq % Nkv == 0; float16, bfloat16, float32 (float64 with jax_enable_x64). Returns out with q's shape and
    dtype. scale defaults to 1/sqrt(H). Raises the core's TypeError/ValueError at trace time.
    """
    return _attention(q, k, v, causal, scale, layout, policy)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5, 6))
def _attention(q: Array, k: Array, v: Array, causal: bool, scale: float | None, layout: str, policy: str) -> Array:
    return _forward(q, k, v, causal, scale, layout, policy, grad=False)[0]


def _attention_fwd(q, k, v, causal, scale, layout, policy):
    # Differentiated: the backward is the exact one, so the policy's for_gradients() variant runs the forward.
    out, lse = _forward(q, k, v, causal, scale, layout, policy, grad=True)
    return out, (q, k, v, out, lse)


def _attention_bwd(causal, scale, layout, policy, residuals, dout):
    options = {"causal": causal, "scale": scale, "layout": layout}
    q, k, v = residuals[:3]
    result = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in (q, k, v))
    return _call(_backward_on_host, _backward_on_device, result, options, dout, *residuals)


_attention.defvjp(_attention_fwd, _attention_bwd)


def _forward(q: Array, k: Array, v: Array, causal: bool, scale: float | None, layout: str, policy: str, grad: bool):
    """(out, lse) through the platform's callback, after the core validated the shapes, dtypes and policy (so
    errors raise at trace time, not inside XLA); `grad`: the policy's for_gradients() variant runs."""
    stand_ins = (np.broadcast_to(np.empty((), dtype=x.dtype), x.shape) for x in (q, k, v))
    problem = describe(*stand_ins, causal=causal, scale=scale, layout=layout)
    policy = resolve_policy(policy)
    if grad:
        policy = policy.for_gradients()
    result = (
        jax.ShapeDtypeStruct(problem.output_shape(), q.dtype),
        jax.ShapeDtypeStruct(problem.lse_shape(), lse_dtype(problem.dtype)),
    )
    options = {"causal": causal, "scale": scale, "layout": layout, "policy": policy}
    return _call(_forward_on_host, _forward_on_device, result, options, q, k, v)


def _call(host: Callable, device: Callable, result: tuple, options: dict[str, Any], *args: Array):
    """Run `host` (NumPy arrays in, NumPy arrays out) on CPU, or `device` (a buffer callback) on GPU."""
    on_cpu = functools.partial(jax.pure_callback, functools.partial(host, **options), result, vmap_method="sequential")
    on_gpu = buffer_callback(
        functools.partial(device, **options), result, vmap_method="sequential", command_buffer_compatible=False
    )
    return jax.lax.platform_dependent(*args, cpu=on_cpu, cuda=on_gpu)


# --- CPU: NumPy arrays in and out (pure_callback) ---------------------------------------------------------

# The callbacks receive CPU jax.Arrays; np.asarray views them without a copy.

def _forward_on_host(q, k, v, **options) -> tuple[np.ndarray, np.ndarray]:
    return adaattn_core.attention(*map(np.asarray, (q, k, v)), return_lse=True, **options)


def _backward_on_host(*inputs, **options) -> tuple[np.ndarray, ...]:
    return adaattn_core.attention_backward(*map(np.asarray, inputs), **options)


# --- GPU: XLA buffers viewed by CuPy on XLA's stream (buffer_callback) ---------------------------------

class _StreamHandle:
    """XLA's raw stream pointer behind the CUDA stream protocol, for `cupy.cuda.Stream.from_external`."""

    def __init__(self, pointer: int) -> None:
        self.pointer = pointer

    def __cuda_stream__(self) -> tuple[int, int]:
        return (0, self.pointer)


_STREAMS: dict[tuple[int, int], Any] = {}


@contextlib.contextmanager
def _on_xla_stream(ctx: Any, buffer: Any) -> Iterator[None]:
    """CuPy's current device = the buffer's GPU, CuPy's current stream = XLA's stream for this call."""
    import cupy

    device_id = buffer.__dlpack_device__()[1]
    key = (device_id, ctx.stream)
    stream = _STREAMS.get(key)
    if stream is None:  # wrapping a handle owns nothing, so one wrapper per (device, handle) can be reused
        with cupy.cuda.Device(device_id):
            stream = _STREAMS[key] = cupy.cuda.Stream.from_external(_StreamHandle(ctx.stream))
    with cupy.cuda.Device(device_id), stream:
        yield


def _views(buffers: Sequence[Any]) -> list[Any]:
    """Zero-copy CuPy views of XLA buffers (DLPack keeps bfloat16 a bfloat16)."""
    import cupy

    return [cupy.from_dlpack(b) for b in buffers]


def _forward_on_device(ctx: Any, outs: Sequence[Any], q: Any, k: Any, v: Any, **options) -> None:
    with _on_xla_stream(ctx, q):
        out, lse = _views(outs)
        adaattn_core.attention(*_views((q, k, v)), out=out, lse_out=lse, **options)


def _backward_on_device(ctx: Any, outs: Sequence[Any], *inputs: Any, **options) -> None:
    with _on_xla_stream(ctx, inputs[0]):
        grads = adaattn_core.attention_backward(*_views(inputs), **options)
        for target, grad in zip(_views(outs), grads):
            target[...] = grad
