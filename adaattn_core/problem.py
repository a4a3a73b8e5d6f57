"""Validation of attention inputs, in one place, and the immutable problem description it produces.

Every public entry point calls `describe` (forward) or `describe_backward` once; backends and policies
receive an `AttentionProblem` and views of the inputs in [B, H, S, D] order and never re-check them.
"""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Any

import numpy as np

from ._arrays import SUPPORTED_DTYPES, dtype_name, library_name, lse_dtype, namespace

LAYOUTS = ("bhsd", "bshd")


@dataclass(frozen=True)
class AttentionProblem:
    """Shapes, dtype and options of one attention call, validated.

    `causal_offset = seqlen_k - seqlen_q`: with `causal`, query row i sees keys j <= i + causal_offset
    (bottom-right alignment, the flash-attn >= 2.1 convention); `keys_seen` and `visible` apply that rule.
    """

    batch: int
    heads_q: int
    heads_kv: int
    seqlen_q: int
    seqlen_k: int
    head_dim: int
    dtype: str
    library: str
    layout: str
    causal: bool
    scale: float

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1: multi-head, Hq: multi-query)."""
        return self.heads_q // self.heads_kv

    @property
    def causal_offset(self) -> int:
        return self.seqlen_k - self.seqlen_q

    @property
    def is_empty(self) -> bool:
        """True when the output has no elements (B, Hq or Sq is zero)."""
        return self.batch == 0 or self.heads_q == 0 or self.seqlen_q == 0

    @property
    def flops(self) -> float:
        """Forward FLOPs, 4·B·Hq·Sq·Sk·D, counting only the unmasked part when causal."""
        pairs = self.seqlen_q * self.seqlen_k
        if self.causal:
            pairs = int(self.keys_seen(np.arange(self.seqlen_q)).sum())
        return 4.0 * self.batch * self.heads_q * pairs * self.head_dim

    def keys_seen(self, rows: Any) -> Any:
        """The number of keys each query row of `rows` sees (see `keys_seen`)."""
        return keys_seen(rows, self.seqlen_q, self.seqlen_k, self.causal)

    def visible(self, rows: Any, keys: Any) -> Any:
        """The causal mask of `rows` × `keys` (see `visible`); None without causal."""
        return visible(rows, keys, self.seqlen_q, self.seqlen_k, self.causal)

    def output_shape(self) -> tuple[int, int, int, int]:
        """Shape of `out` in the caller's layout."""
        if self.layout == "bhsd":
            return (self.batch, self.heads_q, self.seqlen_q, self.head_dim)
        return (self.batch, self.seqlen_q, self.heads_q, self.head_dim)

    def lse_shape(self) -> tuple[int, int, int]:
        return (self.batch, self.heads_q, self.seqlen_q)


def keys_seen(rows: Any, seqlen_q: int, seqlen_k: int, causal: bool) -> Any:
    """Keys seen by each query row of `rows` (a NumPy or CuPy integer array; the result is on its library):
    row i sees keys j < n_i, n_i = clip(i + seqlen_k − seqlen_q + 1, 0, seqlen_k) with `causal` (bottom-right
    alignment: j <= i + seqlen_k − seqlen_q), else seqlen_k (int64)."""
    if not causal:
        return namespace(library_name(rows)).full(rows.shape, seqlen_k, dtype=np.int64)
    return (rows + (seqlen_k - seqlen_q + 1)).clip(0, seqlen_k)


def visible(rows: Any, keys: Any, seqlen_q: int, seqlen_k: int, causal: bool) -> Any:
    """[len(rows), len(keys)] bool, the causal mask: key j (of `keys`, indices in [0, seqlen_k)) visible to query
    row i (of `rows`) iff j <= i + seqlen_k − seqlen_q, i.e. j < `keys_seen`(i) (the clip there does not matter
    for keys in range). NumPy or CuPy index arrays, one library. None without `causal` (every key is visible:
    no mask to apply)."""
    return keys[None, :] <= rows[:, None] + (seqlen_k - seqlen_q) if causal else None


def to_bhsd(x: Any, layout: str) -> Any:
    """A [B, H, S, D] view of `x` (no copy)."""
    return x if layout == "bhsd" else x.transpose(0, 2, 1, 3)


def _dtype_name(x: Any) -> str:
    return dtype_name(x.dtype)


def _check_array(name: str, x: Any, library: str | None) -> str:
    lib = library_name(x)
    if lib not in ("numpy", "cupy"):
        raise TypeError(
            f"{name} must be a numpy.ndarray or cupy.ndarray (use adaattn_adapters for torch/jax), got {lib}"
        )
    if library is not None and lib != library:
        raise TypeError(f"{name} is a {lib} array but q is a {library} array; all inputs must use one library")
    if x.ndim != 4:
        raise ValueError(f"{name} must be 4-D, got {x.ndim}-D with shape {tuple(x.shape)}")
    return lib


def _check_same_device(arrays: dict[str, Any]) -> None:
    devices = {name: a.device.id for name, a in arrays.items()}
    first_name, first = next(iter(devices.items()))
    for name, dev in devices.items():
        if dev != first:
            raise ValueError(f"{name} is on GPU {dev} but {first_name} is on GPU {first}; use one device")


#: Problems already validated, by call signature (see `_signature`): a repeated call skips validation.
_DESCRIBED: dict[tuple[Any, ...], AttentionProblem] = {}
_DESCRIBED_LIMIT = 1024


def _signature(q: Any, k: Any, v: Any, causal: Any, scale: Any, layout: Any) -> tuple[Any, ...]:
    """Everything `describe` reads: array types, shapes, dtypes and GPUs, and the options with their types
    (so that scale=True never hits the entry of scale=1). Raises AttributeError/TypeError for inputs
    that are not arrays, which then take the validating path and its clear error."""
    devices = tuple(x.device.id if library_name(x) == "cupy" else None for x in (q, k, v))
    key = (type(q), type(k), type(v), q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, devices,
           causal, type(causal), scale, type(scale), layout)
    hash(key)
    return key


def describe(
    q: Any, k: Any, v: Any, *, causal: bool, scale: float | None, layout: str
) -> AttentionProblem:
    """Validate forward inputs and return the problem description.

    Raises TypeError for wrong array types, dtypes or option types and ValueError for wrong shapes or
    option values; each message names the argument, what was expected and what was given. Valid
    signatures are remembered (bounded), so repeated calls cost a dictionary lookup.
    """
    try:
        key = _signature(q, k, v, causal, scale, layout)
    except (AttributeError, TypeError):
        return _validate(q, k, v, causal=causal, scale=scale, layout=layout)
    problem = _DESCRIBED.get(key)
    if problem is None:
        problem = _validate(q, k, v, causal=causal, scale=scale, layout=layout)
        if len(_DESCRIBED) >= _DESCRIBED_LIMIT:
            _DESCRIBED.clear()
        _DESCRIBED[key] = problem
    return problem


_FLOAT32_MAX = float(np.finfo(np.float32).max)
#: log2(e): the kernels take scores in the log2 domain (scale · log2 e), in float32.
LOG2E = 1.4426950408889634


def _validate(
    q: Any, k: Any, v: Any, *, causal: bool, scale: float | None, layout: str
) -> AttentionProblem:
    """The checks behind `describe`, run once per signature."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    check_flag("causal", causal)
    library = _check_array("q", q, None)
    _check_array("k", k, library)
    _check_array("v", v, library)
    if library == "cupy":
        _check_same_device({"q": q, "k": k, "v": v})

    dtype = _dtype_name(q)
    if dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"q.dtype must be one of {SUPPORTED_DTYPES}, got {dtype}")
    for name, x in (("k", k), ("v", v)):
        if _dtype_name(x) != dtype:
            raise TypeError(f"{name}.dtype must equal q.dtype ({dtype}), got {_dtype_name(x)}")

    layout_axes = "[B, H, S, D]" if layout == "bhsd" else "[B, S, H, D]"
    qb, kb, vb = (to_bhsd(x, layout) for x in (q, k, v))
    batch, heads_q, seqlen_q, head_dim = qb.shape
    _, heads_kv, seqlen_k, _ = kb.shape
    if kb.shape[0] != batch or vb.shape[0] != batch:
        raise ValueError(
            f"batch sizes differ: q has {batch}, k has {kb.shape[0]}, v has {vb.shape[0]} (layout {layout_axes})"
        )
    if head_dim == 0:
        raise ValueError(f"head dimension D must be >= 1, got q.shape {tuple(q.shape)} (layout {layout_axes})")
    if kb.shape[3] != head_dim:
        raise ValueError(f"k head dimension must equal q's ({head_dim}), got {kb.shape[3]} (layout {layout_axes})")
    if vb.shape[3] != head_dim:
        raise ValueError(f"v head dimension must equal q's ({head_dim}), got {vb.shape[3]} (layout {layout_axes})")
    if vb.shape[1] != heads_kv or vb.shape[2] != seqlen_k:
        raise ValueError(
            f"v must have k's heads and sequence length (H={heads_kv}, S={seqlen_k}), "
            f"got H={vb.shape[1]}, S={vb.shape[2]} (layout {layout_axes})"
        )
    if heads_kv == 0 and heads_q != 0:
        raise ValueError(f"k must have at least one head when q has {heads_q}, got 0")
    if heads_kv and heads_q % heads_kv:
        raise ValueError(
            f"q heads ({heads_q}) must be a multiple of k/v heads ({heads_kv}) for grouped-query attention"
        )

    if scale is None:
        scale = 1.0 / math.sqrt(head_dim)
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a float or None, got {type(scale).__name__}")
    if not math.isfinite(scale):
        raise ValueError(f"scale must be finite, got {scale}")
    if dtype != "float64" and abs(scale) > _FLOAT32_MAX / LOG2E:  # kernels take scale · log2(e) in float32
        raise ValueError(f"scale must stay finite in float32 (the compute precision of {dtype} inputs) after "
                         f"the kernels' scaling by log2(e): |scale| <= {_FLOAT32_MAX / LOG2E:.3e}, got {scale}")

    return AttentionProblem(
        batch=batch,
        heads_q=heads_q,
        heads_kv=max(heads_kv, 1),
        seqlen_q=seqlen_q,
        seqlen_k=seqlen_k,
        head_dim=head_dim,
        dtype=dtype,
        library=library,
        layout=layout,
        causal=bool(causal),
        scale=float(scale),
    )


def check_flag(name: str, value: Any) -> None:
    """A boolean option: Python's bool or NumPy's (np.True_ from a comparison); TypeError naming it otherwise."""
    if not isinstance(value, (bool, np.bool_)):
        kind = type(value)
        raise TypeError(f"{name} must be True or False, got {value!r} ({kind.__module__}.{kind.__qualname__})")


def _overlaps(xp: Any, a: Any, b: Any) -> bool:
    """Whether two arrays of the library `xp` may share memory: its bounds test (C code in NumPy and CuPy), then for
    NumPy its exact test where that is cheap. CuPy's test only compares arrays of one CuPy allocation: views of
    one allocation whose bounds overlap count as overlapping, arrays imported separately (DLPack) never do."""
    if a.size == 0 or b.size == 0:
        return False
    if not xp.may_share_memory(a, b):
        return False
    if xp is np:
        try:
            return bool(np.shares_memory(a, b, max_work=10**5))
        except np.exceptions.TooHardError:
            return True
    return True


def check_output(
    name: str, x: Any, problem: AttentionProblem, shape: tuple[int, ...], dtype: str, *, contiguous: bool = False,
    inputs: dict[str, Any] | None = None,
) -> None:
    """Check a caller-provided output buffer (`out=`, `lse_out=`) or a tensor that must match a forward output.
    With `inputs` ({name: array} the call reads, and outputs checked before it), `x` is an output the call writes:
    it must be writable and must not overlap any of them (the blocked algorithm would read what it already
    wrote)."""
    lib = library_name(x)
    if lib != problem.library:
        raise TypeError(f"{name} must be a {problem.library} array like q, got {lib}")
    if tuple(x.shape) != tuple(shape):
        raise ValueError(f"{name} must have shape {tuple(shape)}, got {tuple(x.shape)}")
    if _dtype_name(x) != dtype:
        raise TypeError(f"{name}.dtype must be {dtype}, got {_dtype_name(x)}")
    if contiguous and not x.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous, got strides {tuple(x.strides)} (bytes)")
    if lib == "cupy":
        import cupy

        if x.device.id != cupy.cuda.Device().id:
            raise ValueError(f"{name} is on GPU {x.device.id} but the inputs are on GPU {cupy.cuda.Device().id}")
    if inputs:
        if lib == "numpy" and not x.flags.writeable:
            raise ValueError(f"{name} must be writable, got a read-only array")
        xp = namespace(lib)
        for other_name, other in inputs.items():
            if _overlaps(xp, x, other):
                raise ValueError(f"{name} must not share memory with {other_name}: the call writes {name} while "
                                 f"it reads {other_name}")


def check_outputs(problem: AttentionProblem, q: Any, k: Any, v: Any, out: Any | None, lse_out: Any | None) -> None:
    """The forward's caller-provided outputs (`check_output`): `out` like the result, `lse_out` a C-contiguous
    [B, Hq, Sq] of the lse dtype; both writable and sharing no memory with q, k, v or each other. None: not given."""
    inputs = {"q": q, "k": k, "v": v}
    if out is not None:
        check_output("out", out, problem, problem.output_shape(), problem.dtype, inputs=inputs)
        inputs["out"] = out
    if lse_out is not None:
        check_output("lse_out", lse_out, problem, problem.lse_shape(), dtype_name(lse_dtype(problem.dtype)),
                     contiguous=True, inputs=inputs)


def describe_backward(
    dout: Any, q: Any, k: Any, v: Any, out: Any, lse: Any, *, causal: bool, scale: float | None, layout: str,
    deterministic: bool = False,
) -> AttentionProblem:
    """Validate backward inputs: the forward's checks plus dout/out/lse against the problem and the
    `deterministic` option's type."""
    check_flag("deterministic", deterministic)
    problem = describe(q, k, v, causal=causal, scale=scale, layout=layout)
    check_output("dout", dout, problem, problem.output_shape(), problem.dtype)
    check_output("out", out, problem, problem.output_shape(), problem.dtype)
    check_output("lse", lse, problem, problem.lse_shape(), dtype_name(lse_dtype(problem.dtype)))
    return problem
