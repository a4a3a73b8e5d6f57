"""PyTorch adapter: AdaAttn on torch tensors (CUDA or CPU), with autograd and `torch.compile` support.

    from adaattn_adapters.torch import attention
    out = attention(q, k, v, causal=True)          # q: [B, Hq, S, D], k/v: [B, Hkv, S, D] → out like q

Semantics, dtypes and errors are `adaattn_core.attention`'s (bottom-right causal alignment, GQA, layouts
"bhsd"/"bshd", TypeError/ValueError naming the argument); only `scaled_dot_product_attention` and
`transformers_attention` translate their callers' conventions.

Data path (no copies, no device synchronisation):
- CUDA tensors are viewed by CuPy through DLPack and computed on the caller's current torch stream
  (`cupy.cuda.Stream.from_external(torch.cuda.current_stream())`), on the inputs' device. `out` is allocated by
  torch; lse (and the backward's dq, dk, dv) are allocated by the core in CuPy's memory pool and handed to
  torch through DLPack.
- CPU tensors are NumPy views (`Tensor.numpy()`). NumPy has no bfloat16: bfloat16 tensors are reinterpreted
  bit for bit as int16 and viewed as `ml_dtypes.bfloat16` (still zero-copy; needs ml_dtypes installed).

Autograd and compile: the forward and backward are the custom operators `adaattn::attention` and
`adaattn::attention_backward` (`torch.library.custom_op`, fake implementations registered), so
`torch.compile(fullgraph=True)` traces through them; eager calls skip the operator dispatch (see `attention`).
The backward recomputes the softmax from the saved lse (`adaattn_core.attention_backward`); double backward
is not supported. `policy` is passed by name; when a gradient will be taken its `for_gradients()` variant
runs (adaptive policies then keep every head exact, since the backward is the exact one).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
import torch.utils.dlpack

import adaattn_core
from adaattn_core._arrays import lse_dtype
from adaattn_core.policy import Policy, resolve_policy

__all__ = [
    "AdaAttention",
    "attention",
    "register_transformers",
    "scaled_dot_product_attention",
    "transformers_attention",
]

Tensor = torch.Tensor


# --- tensors ↔ core arrays -------------------------------------------------------------------------------

class _Capsule:
    """A CUDA tensor's DLPack capsule behind the protocol's two methods, for `cupy.from_dlpack`.

    `Tensor.__dlpack__` negotiates streams in Python (about 25 µs per tensor); every core call here already
    runs on torch's current stream (`_on_callers_stream`), so no handshake is needed and
    `torch.utils.dlpack.to_dlpack`, one C call, hands over the same zero-copy view.
    """

    __slots__ = ("capsule", "device")

    def __init__(self, t: Tensor) -> None:
        self.capsule = torch.utils.dlpack.to_dlpack(t)
        self.device = (2, t.get_device())  # (kDLCUDA, device index)

    def __dlpack__(self, **_: Any) -> Any:
        return self.capsule

    def __dlpack_device__(self) -> tuple[int, int]:
        return self.device


def _to_core(t: Tensor) -> Any:
    """Zero-copy CuPy (CUDA) or NumPy (CPU) view of `t`."""
    t = t.detach()
    if t.is_cuda:
        import cupy

        return cupy.from_dlpack(_Capsule(t))
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.view(torch.int16).numpy().view(ml_dtypes.bfloat16)
    return t.numpy()


def _from_core(x: Any) -> Tensor:
    """Zero-copy tensor of a core result (NumPy or CuPy); bfloat16 crosses as int16 bits."""
    bits = x.dtype.name == "bfloat16"
    if bits:
        x = x.view(np.int16)
    t = torch.from_numpy(x) if isinstance(x, np.ndarray) else torch.from_dlpack(x)
    return t.view(torch.bfloat16) if bits else t


_STREAMS: dict[tuple[int, int], Any] = {}


@contextlib.contextmanager
def _on_callers_stream(t: Tensor) -> Iterator[None]:
    """For CUDA tensors: CuPy's current device = t's device and CuPy's current stream = torch's current stream."""
    if not t.is_cuda:
        yield
        return
    import cupy

    index = t.get_device()
    torch_stream = torch.cuda.current_stream(index)
    key = (index, torch_stream.cuda_stream)
    stream = _STREAMS.get(key)
    if stream is None:  # wrapping a handle owns nothing, so one wrapper per (device, handle) can be reused
        stream = _STREAMS[key] = cupy.cuda.Stream.from_external(torch_stream)
    with cupy.cuda.Device(index), stream:
        yield


@functools.cache
def _lse_dtype(dtype: torch.dtype) -> torch.dtype:
    """The core's lse dtype for inputs of `dtype`, as a torch dtype (looked up once per dtype)."""
    return getattr(torch, lse_dtype(str(dtype).removeprefix("torch.")).name)


@functools.lru_cache(maxsize=64)
def _policy(name: str, grad: bool) -> Policy:
    """The policy named `name`, or its `for_gradients()` variant when gradients will be taken (the backward is
    the exact one, and an approximate forward would not match it); resolved once per (name, grad)."""
    chosen = resolve_policy(name)
    return chosen.for_gradients() if grad else chosen


# --- the two calls into the core ----------------------------------------------------------------------------

def _lse_shape(q: Tensor, layout: str) -> tuple[int, int, int]:
    return (q.shape[0], q.shape[2], q.shape[1]) if layout == "bshd" else tuple(q.shape[:3])


def _forward(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None, layout: str, policy: str, grad: bool
) -> tuple[Tensor, Tensor]:
    """(out, lse) of `adaattn_core.attention`, both allocated by torch and written by the core in place.

    `grad`: gradients will be taken, so the policy's `for_gradients()` variant decides (see `_policy`)."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(_lse_shape(q, layout), dtype=_lse_dtype(q.dtype), device=q.device)
    with _on_callers_stream(q):
        adaattn_core.attention(
            _to_core(q), _to_core(k), _to_core(v), causal=causal, scale=scale, layout=layout,
            policy=_policy(policy, grad),
            out=_to_core(out), lse_out=_to_core(lse),
        )
    return out, lse


def _backward_grads(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    causal: bool, scale: float | None, layout: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of `adaattn_core.attention_backward`."""
    with _on_callers_stream(q):
        grads = adaattn_core.attention_backward(
            *(_to_core(t) for t in (dout, q, k, v, out, lse)), causal=causal, scale=scale, layout=layout
        )
        return tuple(_from_core(g) for g in grads)


# --- custom operators (what torch.compile traces) ------------------------------------------------------------

@torch.library.custom_op("adaattn::attention", mutates_args=())
def _attention_op(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None, layout: str, policy: str, grad: bool
) -> tuple[Tensor, Tensor]:
    """(out, lse) of `adaattn_core.attention` (return_lse=True)."""
    return _forward(q, k, v, causal, scale, layout, policy, grad)


@_attention_op.register_fake
def _attention_fake(
    q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None, layout: str, policy: str, grad: bool
) -> tuple[Tensor, Tensor]:
    # Shapes only (they may be symbolic here); the core validates when the real operator runs.
    return torch.empty_like(q, memory_format=torch.contiguous_format), q.new_empty(
        _lse_shape(q, layout), dtype=_lse_dtype(q.dtype)
    )


@torch.library.custom_op("adaattn::attention_backward", mutates_args=())
def _attention_backward_op(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    causal: bool, scale: float | None, layout: str,
) -> tuple[Tensor, Tensor, Tensor]:
    """(dq, dk, dv) of `adaattn_core.attention_backward`."""
    return _backward_grads(dout, q, k, v, out, lse, causal, scale, layout)


@_attention_backward_op.register_fake
def _attention_backward_fake(
    dout: Tensor, q: Tensor, k: Tensor, v: Tensor, out: Tensor, lse: Tensor,
    causal: bool, scale: float | None, layout: str,
) -> tuple[Tensor, Tensor, Tensor]:
    return tuple(torch.empty_like(x, memory_format=torch.contiguous_format) for x in (q, k, v))


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, Tensor]) -> None:
    q, k, v, causal, scale, layout, _policy, _grad = inputs
    ctx.save_for_backward(q, k, v, *output)
    ctx.options = (causal, scale, layout)


def _backward(ctx: Any, dout: Tensor, _dlse: Tensor) -> tuple[Tensor | None, ...]:
    # lse is never returned to users, so its gradient is always zero and ignored.
    dq, dk, dv = _attention_backward_op(dout, *ctx.saved_tensors, *ctx.options)
    return dq, dk, dv, None, None, None, None, None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


class _EagerAttention(torch.autograd.Function):
    """The same forward, setup and backward as the custom operator's autograd, without the operator's
    dispatch (tens of µs per call in eager mode); used outside torch.compile. forward takes ctx (the classic
    style): with a separate setup_context, Function.apply binds default arguments through inspect on every
    call."""

    @staticmethod
    def forward(
        ctx: Any, q: Tensor, k: Tensor, v: Tensor, causal: bool, scale: float | None, layout: str, policy: str,
        grad: bool,
    ) -> tuple[Tensor, Tensor]:
        output = _forward(q, k, v, causal, scale, layout, policy, grad)
        _setup_context(ctx, (q, k, v, causal, scale, layout, policy, grad), output)
        return output

    backward = staticmethod(_backward)


# --- public API ----------------------------------------------------------------------------------------

def attention(
    q: Tensor, k: Tensor, v: Tensor, *,
    causal: bool = False, scale: float | None = None, layout: str = "bhsd", policy: str = "exact",
) -> Tensor:
    """`adaattn_core.attention` on torch tensors, differentiable in q, k and v.

    q: [B, Hq, Sq, D] ("bhsd") or [B, Sq, Hq, D] ("bshd"); k, v: [B, Hkv, Sk, D] or [B, Sk, Hkv, D], Hq % Hkv == 0;
    all on one CUDA device or all on the CPU; float16, bfloat16, float32 or float64. Returns out with q's
    shape and dtype (contiguous). causal=True is aligned bottom-right when Sq != Sk (flash-attn >= 2.1);
    scale defaults to 1/sqrt(D). Raises the core's TypeError/ValueError.

    Under torch.compile this is the custom operator `adaattn::attention`; in eager mode the same code runs
    without the operator dispatch: through an autograd.Function when a gradient is needed, else directly.
    """
    grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
    if torch.compiler.is_compiling():
        return _attention_op(q, k, v, causal, scale, layout, policy, grad)[0]
    if grad:
        return _EagerAttention.apply(q, k, v, causal, scale, layout, policy, grad)[0]
    return _forward(q, k, v, causal, scale, layout, policy, grad)[0]


def scaled_dot_product_attention(
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    is_causal: bool = False,
    scale: float | None = None,
    enable_gqa: bool = False,
) -> Tensor:
    """Drop-in for `torch.nn.functional.scaled_dot_product_attention` on 4-D [B, H, S, D] tensors.

    Follows SDPA's conventions: `is_causal` is aligned top-left when Sq != Sk (row i sees keys j <= i;
    computed here by slicing the keys when Sq < Sk, and as a causal plus a full part when Sq > Sk), and
    fewer key/value heads than query heads need `enable_gqa=True`. Query heads h use key/value head
    h // (Hq / Hkv), as SDPA does.

    Raises:
        ValueError: `attn_mask` is not None, `dropout_p` is not 0, or the head counts differ without
            `enable_gqa` (SDPA raises there too); otherwise the core's TypeError/ValueError.
    """
    if attn_mask is not None:
        raise ValueError("attn_mask must be None: adaattn supports no attention masks (use is_causal for causal)")
    if dropout_p != 0.0:
        raise ValueError(f"dropout_p must be 0.0 (adaattn has no attention dropout), got {dropout_p}")
    if not enable_gqa and query.dim() == key.dim() == 4 and query.shape[1] != key.shape[1]:
        raise ValueError(
            f"query has {query.shape[1]} heads but key has {key.shape[1]}: pass enable_gqa=True for "
            "grouped-query attention, as with torch SDPA"
        )
    seq_q, seq_k = query.shape[-2], key.shape[-2]
    if not is_causal or seq_q == seq_k:
        return attention(query, key, value, causal=is_causal, scale=scale)
    if seq_q < seq_k:  # top-left: keys >= Sq are seen by no row
        return attention(query, key[..., :seq_q, :], value[..., :seq_q, :], causal=True, scale=scale)
    head = attention(query[..., :seq_k, :], key, value, causal=True, scale=scale)
    tail = attention(query[..., seq_k:, :], key, value, causal=False, scale=scale)  # rows >= Sk see every key
    return torch.cat([head, tail], dim=-2)


class AdaAttention(torch.nn.Module):
    """`attention` as a module: forward(q, k, v) -> out, with the options fixed at construction."""

    def __init__(
        self, causal: bool = False, scale: float | None = None, layout: str = "bhsd", policy: str = "exact"
    ) -> None:
        super().__init__()
        self.causal, self.scale, self.layout, self.policy = causal, scale, layout, policy

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return attention(q, k, v, causal=self.causal, scale=self.scale, layout=self.layout, policy=self.policy)

    def extra_repr(self) -> str:
        return f"causal={self.causal}, scale={self.scale}, layout={self.layout!r}, policy={self.policy!r}"


# --- Hugging Face transformers -----------------------------------------------------------------------------

#: keyword arguments some transformers models pass that change the attention; refused rather than ignored.
_UNSUPPORTED_TRANSFORMERS_KWARGS = ("sliding_window", "softcap", "s_aux", "position_bias", "head_mask")


def _causal_from_mask(mask: Tensor, seq_q: int, seq_k: int) -> bool:
    """Read a materialised transformers mask: all-visible → False, bottom-right causal → True, else ValueError.

    Boolean masks mark visible pairs True; float (additive) masks mark them 0. Reading the mask synchronises
    with the device (and breaks a torch.compile graph): only masks the mask function could not drop get here.
    """
    visible = mask if mask.dtype == torch.bool else mask == 0
    if bool(visible.all()):
        return False
    causal = torch.ones(seq_q, seq_k, dtype=torch.bool, device=mask.device).tril(seq_k - seq_q)
    if bool((visible == causal).all()):
        return True
    raise ValueError(
        "attention_mask: adaattn supports no mask other than plain causal; this one masks padding, a sliding "
        "window or another pattern (pass no padded batch, or use attn_implementation='sdpa' for it)"
    )


def transformers_attention(
    module: torch.nn.Module,
    query: Tensor,
    key: Tensor,
    value: Tensor,
    attention_mask: Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs: Any,
) -> tuple[Tensor, None]:
    """A transformers attention implementation (the contract of `sdpa_attention_forward`).

    query: [B, Hq, Sq, D], key/value: [B, Hkv, Sk, D] (GQA natively, no repeat_kv). Returns
    (attn_output [B, Sq, Hq, D] contiguous, None): no attention weights.

    Masking: with `attention_mask=None`, causal = `is_causal` if given else `module.is_causal` (default True),
    aligned bottom-right, which is right for prefill (Sq == Sk) and for decoding with a dynamic cache
    (the queries are the last Sq positions). The registered mask function (`register_transformers`) returns
    None exactly in those plain causal cases; any mask that still arrives is read: all-visible means
    non-causal, plain causal means causal, anything else (padding, sliding window, static cache) raises
    ValueError.

    Raises:
        ValueError: dropout != 0, an unsupported mask, or one of `_UNSUPPORTED_TRANSFORMERS_KWARGS` not None.
    """
    if dropout != 0.0:
        raise ValueError(f"dropout must be 0.0 (adaattn has no attention dropout), got {dropout}")
    for name in _UNSUPPORTED_TRANSFORMERS_KWARGS:
        if kwargs.get(name) is not None:
            raise ValueError(f"{name} is not supported by adaattn's transformers attention, got {kwargs[name]!r}")
    if attention_mask is not None:
        causal = _causal_from_mask(attention_mask, query.shape[2], key.shape[2])
    else:
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    # [B, H, S, D] tensors seen as [B, S, H, D] views: the output comes out as [B, S, H, D], as transformers wants.
    out = attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
        causal=bool(causal), scale=scaling, layout="bshd",
    )
    return out, None


def _transformers_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: Any = 0,
    kv_offset: Any = 0,
    mask_function: Any = None,
    attention_mask: Tensor | None = None,
    allow_is_causal_skip: bool = True,
    **kwargs: Any,
) -> Tensor | None:
    """transformers mask function: None for plain bottom-right causal attention, else SDPA's boolean mask.

    None needs the plain causal mask function, no local window, integer offsets with the queries at the end
    of the keys (q_offset − kv_offset == kv_length − q_length) and no padding (an all-True padding mask is
    read only outside tracing, as transformers' own SDPA mask does).
    """
    from transformers.masking_utils import causal_mask_function, prepare_padding_mask, sdpa_mask
    from transformers.utils.import_utils import is_tracing

    mask_function = mask_function or causal_mask_function
    plain_causal = (
        allow_is_causal_skip
        and mask_function is causal_mask_function
        and kwargs.get("local_size") is None
        and isinstance(q_offset, int)
        and isinstance(kv_offset, int)
        and q_offset - kv_offset == kv_length - q_length
    )
    if plain_causal:
        padding = prepare_padding_mask(attention_mask, kv_length, kv_offset)
        if padding is None:
            return None
        padding = padding[:, kv_offset : kv_offset + kv_length]
        if not is_tracing(padding) and bool(padding.all()):
            return None
    kwargs.update(allow_is_causal_skip=False, allow_is_bidirectional_skip=False)
    return sdpa_mask(
        batch_size=batch_size, q_length=q_length, kv_length=kv_length, q_offset=q_offset, kv_offset=kv_offset,
        mask_function=mask_function, attention_mask=attention_mask, **kwargs,
    )


def register_transformers(name: str = "adaattn") -> str:
    """Register `transformers_attention` (and its mask function) as transformers attention `name`.

    Then `AutoModel.from_pretrained(..., attn_implementation=name)` or `model.set_attn_implementation(name)`.
    Returns `name`.
    """
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(name, transformers_attention)
    AttentionMaskInterface.register(name, _transformers_mask)
    return name
