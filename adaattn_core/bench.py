"""Benchmark mechanics, in one place: `adaattn bench`, `benchmarks/*.py` and the asv suite all use these.

- `environment(device)`: what a number was measured on (device, driver, versions, date). Importing this
  module imports neither CuPy nor torch; functions import what they need when called.
- `time_interleaved` / `time_calls` / `median_ms`: warm-up calls, then one timing per call: CUDA events recorded
  on CuPy's current stream on the GPU, `time.perf_counter` on the CPU; the median is what gets reported.
  `run_case` times its implementations in turns, call by call, so that the GPU's clock drift falls on all alike.
- `make_input_sets`: fresh random q, k, v (and more arrays, e.g. dout, on request), rotated among enough sets
  that the sets together are larger than the last-level cache, so no timed call finds its inputs there from
  the call before. `paper_case` / `case_seed`: the FlashAttention papers' problem shapes and the seed the GPU
  scripts draw them with.
- `run_case` / `sweep`: one forward problem (or a sweep over S, D, causal, dtype and policy) timed for
  AdaAttn and for every available peer (torch SDPA flash / cuDNN / efficient when torch imports,
  SageAttention when installed), with TFLOP/s = 4·B·H·Sq·Sk·D / t (half of that when causal) and the
  relative L2 error of each output against float64.
- `format_table`, `format_number`, `write_json`, `plot_results`: what a person reads;
  ``python -m adaattn_core.bench FILE.json`` prints a results file's table and writes its PNG next to it.

What only the GPU scripts `benchmarks/bench_*.py` need (their command line, the torch-version environment record,
the sweep loop and its failed rows) is in `benchmarks/_common.py`, which builds on this module.

Result files (JSON) keep the layout of `benchmarks/results/*-fwd.json`: ``{"env", "setup", "rows": [{"seq",
"dim", "causal", "batch", "heads", "tflops": {impl: ...}, "ms": {impl: ...}, "ratio": {peer: ...}, ...}]}``;
rows written by this module add ``dtype``, ``backend``, ``rel_l2_vs_float64`` and, where some implementation
could not run, ``unsupported``. Implementation names: ``adaattn`` (policy "exact"), ``adaattn[<policy>]``
for other policies, then the peers' names (`PEERS`). Later kernels (backward, fp8) add rows of their own
kind through the same functions: `run_case` takes the implementations to time.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ._arrays import to_host64

#: An implementation under test: called with the call's index (to pick the input set), returns the output.
Impl = Callable[[int], Any]

SHORT_DTYPE = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32", "float64": "fp64"}
FALLBACK_CACHE_BYTES = 64 << 20  # when the cache size cannot be read: larger than any GPU's L2 so far
MAX_INPUT_SETS = 64
#: The FlashAttention papers' problem sizes: B·S = 16k tokens, H·D = 2048 (B = tokens // S, H = hidden // D).
PAPER_TOKENS, PAPER_HIDDEN = 16384, 2048
#: --causal of `adaattn bench` and the benchmark scripts: which causal settings a sweep runs.
CAUSAL_CHOICES = {"both": (False, True), "no": (False,), "yes": (True,)}


def count_type(minimum: int) -> Callable[[str], int]:
    """An argparse type for sizes and counts: an int >= minimum (argparse names the option and the value in its
    error)."""

    def parse(text: str) -> int:
        value = int(text)
        if value < minimum:
            raise argparse.ArgumentTypeError(f"expected an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


# --------------------------------------------------------------------------------------------------------------
# FLOPs and problems


def forward_flops(batch: int, heads: int, seq_q: int, seq_k: int, dim: int, causal: bool) -> float:
    """FLOPs of one attention forward: 4·B·H·Sq·Sk·D (two matmuls), halved when causal (the FA papers' count)."""
    return 4.0 * batch * heads * seq_q * seq_k * dim / (2 if causal else 1)


#: FLOPs of forward + backward over the forward's: the backward counts 2.5 × the forward (the FA papers' count).
FWD_BWD_FLOP_FACTOR = 3.5


def tflops(flops: float, ms: float | None) -> float | None:
    """TFLOP/s of `flops` done in `ms` milliseconds (None when there is no time)."""
    return None if not ms else flops / (ms * 1e-3) / 1e12


@dataclass(frozen=True)
class Case:
    """One forward problem, [B, H, S, D] for q, k and v."""

    seq: int
    dim: int
    causal: bool
    batch: int
    heads: int
    dtype: str

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (self.batch, self.heads, self.seq, self.dim)

    @property
    def flops(self) -> float:
        return forward_flops(self.batch, self.heads, self.seq, self.seq, self.dim, self.causal)


def sized_case(seq: int, dim: int, causal: bool, dtype: str, tokens: int, hidden: int) -> Case:
    """The problem of `tokens` = B·S tokens and `hidden` = H·D channels at sequence length `seq`, head dim `dim`."""
    return Case(seq=seq, dim=dim, causal=causal, batch=max(1, tokens // seq), heads=max(1, hidden // dim), dtype=dtype)


def paper_case(seq: int, dim: int, causal: bool, dtype: str = "bfloat16") -> Case:
    """The FlashAttention papers' problem of sequence length `seq` and head dim `dim`: B = 16k // S, H = 2048 // D."""
    return sized_case(seq, dim, causal, dtype, PAPER_TOKENS, PAPER_HIDDEN)


def case_seed(case: Case) -> int:
    """The seed the GPU benchmarks draw `case`'s inputs with: the same inputs for the same (S, D, causal)."""
    return case.seq * 1000 + case.dim * 2 + case.causal


def impl_name(policy: str) -> str:
    """Result key of AdaAttn run under `policy`: "adaattn" for "exact", "adaattn[<policy>]" otherwise."""
    return "adaattn" if policy == "exact" else f"adaattn[{policy}]"


@dataclass
class SweepConfig:
    """What `sweep` measures. Problem shapes follow the FlashAttention papers: B = tokens // S, H = hidden // D."""

    device: str = "cpu"
    seqs: tuple[int, ...] = (128, 256, 512)
    dims: tuple[int, ...] = (64,)
    causal: tuple[bool, ...] = (False, True)
    dtypes: tuple[str, ...] = ("float32",)
    policies: tuple[str, ...] = ("exact",)
    tokens: int = 1024
    hidden: int = 256
    warmup: int = 1
    repeat: int = 5
    peers: bool | tuple[str, ...] = True
    seed: int | None = None
    error_rows: int = 256

    @classmethod
    def defaults(cls, device: str, *, quick: bool = False) -> SweepConfig:
        """The sweep `adaattn bench` runs when no sizes are given.

        GPU: the FlashAttention-paper setup (B·S = 16k tokens, H·D = 2048, bf16, S 512…16k, D 64/128/256);
        quick: S 1k and 4k, D 64 and 128. CPU: small problems that take seconds (quick: well under one).
        """
        if device == "gpu":
            if quick:
                return cls(device="gpu", seqs=(1024, 4096), dims=(64, 128), dtypes=("bfloat16",),
                           tokens=PAPER_TOKENS, hidden=PAPER_HIDDEN, warmup=3, repeat=10)
            return cls(device="gpu", seqs=(512, 1024, 2048, 4096, 8192, 16384), dims=(64, 128, 256),
                       dtypes=("bfloat16",), tokens=PAPER_TOKENS, hidden=PAPER_HIDDEN, warmup=5, repeat=30)
        if quick:
            return cls(device="cpu", seqs=(32, 64), dims=(32, 64), tokens=128, hidden=128, warmup=1, repeat=3)
        return cls(device="cpu", seqs=(128, 256, 512, 1024), dims=(64,), tokens=2048, hidden=256, warmup=1,
                   repeat=5)

    def case(self, seq: int, dim: int, causal: bool, dtype: str) -> Case:
        return sized_case(seq, dim, causal, dtype, self.tokens, self.hidden)

    def cases(self) -> list[Case]:
        """In table order: head dim, then causal, then sequence length, then dtype."""
        return [self.case(s, d, c, t) for d in self.dims for c in self.causal for s in self.seqs for t in self.dtypes]

    def setup_text(self) -> str:
        """The table header's problem line; says so when some row's B·S or H·D differs from the requested ones
        (B = max(1, tokens // S) and H = max(1, hidden // D) round down and never reach 0)."""
        dtypes = "+".join(SHORT_DTYPE.get(d, d) for d in self.dtypes)
        exact = all(c.batch * c.seq == self.tokens and c.heads * c.dim == self.hidden for c in self.cases())
        rounding = "" if exact else " (B = max(1, B*S // S), H = max(1, H*D // D): some rows differ)"
        return f"B*S={self.tokens}, H*D={self.hidden}{rounding}, {dtypes}, [B,H,S,D]"

    def as_dict(self) -> dict[str, Any]:
        return {key: list(value) if isinstance(value, tuple) else value for key, value in asdict(self).items()}


# --------------------------------------------------------------------------------------------------------------
# Environment


def _run(cmd: Sequence[str]) -> str | None:
    if shutil.which(cmd[0]) is None:
        return None
    try:
        result = subprocess.run(list(cmd), capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.SubprocessError):
        return None
    return result.stdout.strip() if result.returncode == 0 else None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _package_version(name: str) -> str | None:
    """Version of an installed distribution without importing it (torch is slow to import)."""
    module = sys.modules.get(name)
    if module is not None and hasattr(module, "__version__"):
        return str(module.__version__)
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _cuda_version(encoded: int) -> str:
    return f"{encoded // 1000}.{encoded % 1000 // 10}"


#: How `run_case` times its implementations: "turns", call by call (`time_interleaved`); recorded as ``timing`` in
#: the environment of the results files that time this way. Files without the key timed each implementation's
#: calls back to back.
TIMING = "turns"


def environment(device: str = "auto", timing: str | None = None) -> dict[str, Any]:
    """What results are measured on: date, device, driver and library versions (JSON-ready); `timing`, how the
    results were timed (`TIMING` for `run_case`'s turns), recorded as ``timing`` when given.

    The GPU keys (``gpu``, ``sm_count``, ``compute_capability``, ``driver``, ``cuda_runtime``, ``nvrtc``,
    ``cupy``, ``torch``) keep the names of the committed results files; ``gpu`` is None on a CPU run.
    """
    from . import __version__

    if device == "auto":
        device = "gpu" if _gpu_present() else "cpu"
    env: dict[str, Any] = {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "device": device,
        "gpu": None,
        "cpu": _cpu_name(),
        "cpu_count": os.cpu_count(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "adaattn": __version__,
    }
    if timing is not None:
        env["timing"] = timing
    if device == "gpu":
        import cupy

        dev = cupy.cuda.Device()
        props = cupy.cuda.runtime.getDeviceProperties(dev.id)
        name = props["name"]
        driver = _run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader", f"--id={dev.id}"])
        try:
            nvrtc: str | None = ".".join(map(str, cupy.cuda.nvrtc.getVersion()))
        except Exception:  # NVRTC library missing
            nvrtc = None
        env.update({
            "gpu": name.decode() if isinstance(name, bytes) else str(name),
            "sm_count": int(props["multiProcessorCount"]),
            "compute_capability": f"{props['major']}.{props['minor']}",
            "l2_bytes": int(props["l2CacheSize"]),
            "memory_bytes": int(props["totalGlobalMem"]),
            "driver": driver or f"unknown (no nvidia-smi); CUDA driver API "
                                f"{_cuda_version(cupy.cuda.runtime.driverGetVersion())}",
            "cuda_runtime": _cuda_version(cupy.cuda.runtime.runtimeGetVersion()),
            "nvrtc": nvrtc,
            "cupy": cupy.__version__,
        })
    for package in ("torch", "sageattention", "ml_dtypes"):
        version = _package_version(package)
        if version is not None:
            env[package] = version
    return env


def _gpu_present() -> bool:
    from .device import capabilities

    return capabilities().gpu is not None


# --------------------------------------------------------------------------------------------------------------
# Timing


def time_interleaved(fns: dict[str, Impl], *, warmup: int, repeat: int, device: str) -> dict[str, list[float]]:
    """Milliseconds of each of `repeat` calls of every ``fn(i)`` in `fns`, the implementations taking turns call by
    call (A, B, C, A, B, C, ...) after `warmup` untimed calls of each.

    Turns, because the GPU's clock moves with its power and temperature by several percent over a second of
    back-to-back calls: timing A's calls and then B's hands each a different share of that drift, turns give both
    the same. GPU: a CUDA event before and after each call, recorded on CuPy's current stream (run torch work on
    the same stream, see `torch_stream`), one synchronisation at the end: the calls queue back to back as in a
    training step, and the times are the GPU's. CPU: `time.perf_counter` around each call. ``fn`` gets a call
    index to rotate input sets: warm-up calls 0…warmup-1, then the timed calls count on over all implementations
    (warmup + i·len(fns) + k for implementation k in turn i), so no call finds its inputs in cache from the
    call before, whoever made it.
    """
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    for fn in fns.values():
        for i in range(warmup):
            fn(i)
    # Call index of implementation k in turn i: consecutive calls, whoever makes them, take consecutive input sets.
    turns = [(i, k, name, fn) for i in range(repeat) for k, (name, fn) in enumerate(fns.items())]
    if device == "gpu":
        import cupy

        events = {name: [(cupy.cuda.Event(), cupy.cuda.Event()) for _ in range(repeat)] for name in fns}
        for i, k, name, fn in turns:
            start, stop = events[name][i]
            start.record()
            fn(warmup + i * len(fns) + k)
            stop.record()
        cupy.cuda.get_current_stream().synchronize()
        return {name: [float(cupy.cuda.get_elapsed_time(a, b)) for a, b in pairs] for name, pairs in events.items()}
    times: dict[str, list[float]] = {name: [] for name in fns}
    for i, k, name, fn in turns:
        began = time.perf_counter()
        fn(warmup + i * len(fns) + k)
        times[name].append((time.perf_counter() - began) * 1e3)
    return times


def time_calls(fn: Impl, *, warmup: int, repeat: int, device: str) -> list[float]:
    """Milliseconds of each of `repeat` calls of ``fn(i)``, after `warmup` untimed calls (`time_interleaved` with
    one implementation)."""
    return time_interleaved({"fn": fn}, warmup=warmup, repeat=repeat, device=device)["fn"]


def median_ms(fn: Impl, *, warmup: int, repeat: int, device: str) -> float:
    """Median of `time_calls`."""
    return float(statistics.median(time_calls(fn, warmup=warmup, repeat=repeat, device=device)))


def unsupported(row: dict[str, Any], name: str, error: BaseException | str) -> None:
    """Record in a result row that implementation `name` has no timing, and why."""
    row["ms"][name] = row["tflops"][name] = None
    row.setdefault("unsupported", {})[name] = error if isinstance(error, str) else short_error(error)


def time_row(row: dict[str, Any], fns: dict[str, Impl], *, flops: float, warmup: int, repeat: int,
             device: str) -> dict[str, Impl]:
    """Time `fns` in turns (`time_interleaved`) into `row`: median ``ms`` and ``tflops`` (of `flops`) per
    implementation. If the turns fail past the first calls (e.g. out of memory under load), each implementation is
    warmed up and timed again alone, a failing one is recorded `unsupported`, and the row says ``"timing":
    "blocks"``. Returns the implementations that got a time."""
    try:
        times = time_interleaved(fns, warmup=warmup, repeat=repeat, device=device)
    except Exception:
        times = {}
        for name, fn in fns.items():
            try:
                times[name] = time_calls(fn, warmup=warmup, repeat=repeat, device=device)
            except Exception as error:
                unsupported(row, name, error)
        row["timing"] = "blocks"  # not in turns: see time_interleaved
    for name, calls in times.items():
        row["ms"][name] = ms = float(statistics.median(calls))
        row["tflops"][name] = tflops(flops, ms)
    return {name: fns[name] for name in times}


def synchronize(device: str) -> None:
    if device == "gpu":
        import cupy

        cupy.cuda.get_current_stream().synchronize()


def torch_stream() -> Any:
    """A context that makes torch queue work on CuPy's current stream (a no-op on the legacy default stream,
    which both libraries use unless told otherwise)."""
    import cupy
    import torch

    ptr = cupy.cuda.get_current_stream().ptr
    if ptr == 0 and torch.cuda.current_stream().cuda_stream == 0:
        return nullcontext()
    return torch.cuda.stream(torch.cuda.ExternalStream(ptr))


def cupy_on_torch_stream() -> Any:
    """The converse of `torch_stream`: a context that makes CuPy (and `time_calls`' events) use torch's current
    stream, for scripts that run torch work outside `torch_stream`; a no-op when torch is not installed."""
    if not _have("torch"):
        return nullcontext()
    import cupy
    import torch

    return cupy.cuda.Stream.from_external(torch.cuda.current_stream())


# --------------------------------------------------------------------------------------------------------------
# Inputs


def cache_bytes(device: str) -> int:
    """Bytes of cache that timed calls must not find their inputs in: the GPU's L2, the CPU's last level."""
    if device == "gpu":
        import cupy

        return int(cupy.cuda.Device().attributes.get("L2CacheSize", FALLBACK_CACHE_BYTES))
    for name in ("SC_LEVEL3_CACHE_SIZE", "SC_LEVEL2_CACHE_SIZE"):
        try:
            size = os.sysconf(name)
        except (ValueError, OSError, AttributeError):
            continue
        if size and size > 0:
            return int(size)
    return FALLBACK_CACHE_BYTES


def input_set_count(set_bytes: int, cache: int) -> int:
    """How many input sets to rotate so that the ones touched between two uses of a set exceed the cache."""
    if set_bytes <= 0:
        return 2
    return int(min(MAX_INPUT_SETS, max(2, math.ceil(cache / set_bytes) + 1)))


def _numpy_dtype(dtype: str) -> Any:
    if dtype == "bfloat16":
        import ml_dtypes

        return ml_dtypes.bfloat16
    return np.dtype(dtype)


def random_generator(device: str, seed: int | None = None) -> Any:
    """A generator for `random_arrays`: CuPy's on "gpu" (arrays drawn on the device), NumPy's on "cpu"; `seed` None
    draws fresh entropy."""
    if device == "gpu":
        import cupy

        return cupy.random.default_rng(seed)
    return np.random.default_rng(seed)


def random_arrays(device: str, shapes: Sequence[tuple[int, ...]], dtype: str, rng: Any) -> list[Any]:
    """One standard-normal array of `dtype` per shape, from `rng` (`random_generator` of the same device), drawn
    in float32 and rounded: CuPy arrays on "gpu", NumPy on "cpu" (bfloat16 through ml_dtypes)."""
    if device == "gpu":
        import cupy

        return [rng.standard_normal(shape, dtype=cupy.float32).astype(dtype) for shape in shapes]
    target = _numpy_dtype(dtype)
    return [rng.standard_normal(shape, dtype=np.float32).astype(target) for shape in shapes]


def outlier_normal(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """FlashAttention-3's fp8 outlier test inputs: N(0, 1) with 0.1% of the entries drawn from N(0, 100),
    float32."""
    x = rng.standard_normal(shape)
    mask = rng.random(shape) < 1e-3
    x[mask] = rng.normal(0.0, 10.0, int(mask.sum()))
    return x.astype(np.float32)


def make_input_sets(
    case: Case, device: str, *, sets: int | None = None, seed: int | None = None, arrays: int = 3
) -> list[tuple[Any, ...]]:
    """Standard-normal (q, k, v) sets of `case` on `device` (NumPy on "cpu", CuPy on "gpu").

    `sets` defaults to `input_set_count` for this device's cache. `seed` None draws fresh entropy.
    `arrays`: how many arrays of `case.shape` a set holds (4: q, k, v and the backward's dout).
    """
    itemsize = 2 if case.dtype in ("bfloat16", "float16") else np.dtype(case.dtype).itemsize
    set_bytes = arrays * math.prod(case.shape) * itemsize
    count = sets if sets is not None else input_set_count(set_bytes, cache_bytes(device))
    rng = random_generator(device, seed)
    return [tuple(random_arrays(device, [case.shape] * arrays, case.dtype, rng)) for _ in range(count)]


# --------------------------------------------------------------------------------------------------------------
# Implementations: AdaAttn and peers


def adaattn_impl(sets: list[tuple[Any, Any, Any]], causal: bool, policy: str = "exact") -> tuple[Impl, str]:
    """AdaAttn's forward over the rotated `sets`, writing into preallocated outputs; and its backend's name.

    The first call (here, untimed) compiles or loads the kernel, so timing never includes compilation.
    """
    from ._arrays import library_name, namespace
    from .api import attention
    from .report import Report

    xp = namespace(library_name(sets[0][0]))
    outs = [xp.empty_like(q) for q, _, _ in sets]
    report = Report()
    attention(*sets[0], causal=causal, policy=policy, out=outs[0], report=report)

    def call(i: int) -> Any:
        j = i % len(sets)
        return attention(*sets[j], causal=causal, policy=policy, out=outs[j])

    return call, report.backend


def to_torch(x: Any) -> Any:
    """A torch view of a NumPy or CuPy array (DLPack, no copy; bfloat16 NumPy arrays through float32)."""
    import torch

    if isinstance(x, np.ndarray):
        if x.dtype.name == "bfloat16":  # ml_dtypes: torch.from_numpy does not know it
            return torch.from_numpy(x.astype(np.float32)).to(torch.bfloat16)
        return torch.from_numpy(x)
    try:
        return torch.from_dlpack(x)
    except Exception:  # a DLPack exporter or importer without this dtype: one float32 copy, outside timing
        return torch.from_dlpack(x.astype("float32")).to(getattr(torch, str(x.dtype)))


@dataclass(frozen=True)
class Peer:
    """Another attention implementation timed beside ours on the same inputs.

    unavailable(device, dtype) says why it cannot run here (None when it can); build(sets, causal) returns
    the `Impl`. Builders import their framework when called, never at import time.
    """

    name: str
    label: str
    unavailable: Callable[[str, str], str | None]
    build: Callable[[list[tuple[Any, Any, Any]], bool], Impl]


def _have(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


def _torch_gpu_unavailable(device: str, dtype: str) -> str | None:
    if device != "gpu":
        return "GPU only"
    if not _have("torch"):
        return "torch is not installed"
    if dtype not in ("bfloat16", "float16"):
        return f"timed in bfloat16/float16 only, not {dtype}"
    return None


def _sdpa(backend: str) -> Callable[[list[tuple[Any, Any, Any]], bool], Impl]:
    def build(sets: list[tuple[Any, Any, Any]], causal: bool) -> Impl:
        import torch.nn.functional as F
        from torch.nn.attention import SDPBackend, sdpa_kernel

        chosen = getattr(SDPBackend, backend)
        tsets = [tuple(to_torch(x) for x in s) for s in sets]
        stream = torch_stream()

        def call(i: int) -> Any:
            with stream, sdpa_kernel(chosen):
                return F.scaled_dot_product_attention(*tsets[i % len(tsets)], is_causal=causal)

        return call

    return build


def _torch_cpu_unavailable(device: str, dtype: str) -> str | None:
    if device != "cpu":
        return "CPU only"
    if not _have("torch"):
        return "torch is not installed"
    return None


def _torch_cpu(sets: list[tuple[Any, Any, Any]], causal: bool) -> Impl:
    import torch.nn.functional as F

    tsets = [tuple(to_torch(x) for x in s) for s in sets]
    return lambda i: F.scaled_dot_product_attention(*tsets[i % len(tsets)], is_causal=causal)


def _sage_unavailable(device: str, dtype: str) -> str | None:
    if device != "gpu":
        return "GPU only"
    if not _have("sageattention"):
        return "sageattention is not installed"
    if dtype not in ("bfloat16", "float16"):
        return f"float16/bfloat16 only, not {dtype}"
    return None


def _sage(sets: list[tuple[Any, Any, Any]], causal: bool) -> Impl:
    from sageattention import sageattn

    # sageattn smooths a contiguous K in place (k -= k.mean(seq)): it gets copies of K, not the arrays the
    # others read.
    tsets = [(to_torch(q), to_torch(k).clone(), to_torch(v)) for q, k, v in sets]
    stream = torch_stream()

    def call(i: int) -> Any:
        with stream:
            return sageattn(*tsets[i % len(tsets)], tensor_layout="HND", is_causal=causal)

    return call


PEERS: dict[str, Peer] = {
    "torch-flash": Peer("torch-flash", "torch flash (FA2)", _torch_gpu_unavailable, _sdpa("FLASH_ATTENTION")),
    "torch-cudnn": Peer("torch-cudnn", "torch cuDNN", _torch_gpu_unavailable, _sdpa("CUDNN_ATTENTION")),
    "torch-efficient": Peer("torch-efficient", "torch efficient", _torch_gpu_unavailable,
                            _sdpa("EFFICIENT_ATTENTION")),
    "sageattention": Peer("sageattention", "SageAttention (INT8 QK)", _sage_unavailable, _sage),
    "torch-cpu": Peer("torch-cpu", "torch SDPA (CPU)", _torch_cpu_unavailable, _torch_cpu),
}

LABELS = {"adaattn": "AdaAttn", **{name: peer.label for name, peer in PEERS.items()}}


def resolve_peers(requested: bool | Iterable[str], device: str, dtypes: Iterable[str]) -> tuple[
        list[Peer], dict[str, str]]:
    """(peers to time, {peer: why it is skipped}). `requested`: True for all of `PEERS`, False for none."""
    if requested is False:
        return [], {}
    names = list(PEERS) if requested is True else list(requested)
    chosen, skipped = [], {}
    for name in names:
        if name not in PEERS:
            raise ValueError(f"unknown peer {name!r}; known: {', '.join(PEERS)}")
        reasons = {PEERS[name].unavailable(device, dtype) for dtype in dtypes}
        if None in reasons:
            chosen.append(PEERS[name])
        else:
            skipped[name] = "; ".join(sorted(r for r in reasons if r))
    return chosen, skipped


# --------------------------------------------------------------------------------------------------------------
# Errors


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    """||a − b|| / ||b|| (0 when both are 0)."""
    norm = float(np.linalg.norm(b))
    diff = float(np.linalg.norm(a - b))
    return diff / norm if norm else diff


def float64_error(out: Any, q: Any, k: Any, v: Any, causal: bool, rows: int) -> float:
    """Relative L2 error of `out` against the float64 reference on the last `rows` query rows of batch 0,
    head 0 (with the full keys: the last rows keep the bottom-right causal alignment). Computed on the host."""
    from .reference import attention_reference

    seq_q = q.shape[2]
    rows = min(rows, seq_q)
    q64 = to_host64(q[0:1, 0:1, seq_q - rows:])
    k64, v64 = to_host64(k[0:1, 0:1]), to_host64(v[0:1, 0:1])
    ref, _ = attention_reference(q64, k64, v64, causal=causal)
    return rel_l2(to_host64(out[0:1, 0:1, seq_q - rows:]), ref)


def device_rel_l2(a: Any, b: Any) -> float:
    """||a − b|| / ||b|| in float32 on the arrays' device (CuPy, NumPy or torch outputs)."""
    if hasattr(a, "detach") or hasattr(b, "detach"):
        a32 = (a if hasattr(a, "detach") else to_torch(a)).float()
        b32 = (b if hasattr(b, "detach") else to_torch(b)).float()
        return float((a32 - b32).norm() / b32.norm())
    xp = sys.modules["cupy"] if hasattr(a, "get") else np
    a32, b32 = a.astype(xp.float32), b.astype(xp.float32)
    return float(xp.linalg.norm(a32 - b32) / xp.linalg.norm(b32))


# --------------------------------------------------------------------------------------------------------------
# Measuring


def short_error(error: BaseException) -> str:
    """"Type: first line of the message", at most 200 characters: why an implementation has no timing."""
    text = str(error).splitlines()[0] if str(error) else type(error).__name__
    return f"{type(error).__name__}: {text}"[:200]


def run_case(
    case: Case,
    *,
    device: str,
    policies: Sequence[str] = ("exact",),
    peers: Sequence[Peer] = (),
    warmup: int = 5,
    repeat: int = 30,
    seed: int | None = None,
    error_rows: int = 256,
    sets: list[tuple[Any, Any, Any]] | None = None,
    extra: dict[str, Impl] | None = None,
) -> dict[str, Any]:
    """Time AdaAttn (once per policy) and each peer on the same fresh inputs; one result row.

    `extra`: more implementations, already called once, to time in the same turns (ms and TFLOP/s only: their
    errors are the caller's to record).

    Every implementation runs once untimed first (compilation, autotuning, the float64 error check; one that
    raises there is recorded under ``unsupported`` with its error, and the sweep goes on), then `warmup` more
    calls each and `repeat` timed ones, the implementations taking turns call by call (`time_interleaved`).
    """
    sets = make_input_sets(case, device, seed=seed) if sets is None else sets
    row: dict[str, Any] = {"seq": case.seq, "dim": case.dim, "causal": case.causal, "batch": case.batch,
                           "heads": case.heads, "dtype": case.dtype, "tflops": {}, "ms": {}, "backend": {},
                           "rel_l2_vs_float64": {}}
    impls: dict[str, Callable[[], Impl]] = {}
    backends: dict[str, str] = {}

    def ours(policy: str) -> Callable[[], Impl]:
        def build() -> Impl:
            fn, backends[impl_name(policy)] = adaattn_impl(sets, case.causal, policy)
            return fn

        return build

    for policy in policies:
        impls[impl_name(policy)] = ours(policy)
    for peer in peers:
        reason = peer.unavailable(device, case.dtype)
        if reason is None:
            impls[peer.name] = (lambda p=peer: p.build(sets, case.causal))
        else:
            row.setdefault("unsupported", {})[peer.name] = reason  # not installed here: no column at all

    firsts: dict[str, Any] = {}
    fns: dict[str, Impl] = {}
    for name, build in impls.items():
        try:
            fn = build()
            firsts[name] = fn(0)
            synchronize(device)
        except Exception as error:  # a backend that does not take this shape/dtype: record it, go on
            unsupported(row, name, error)
            firsts.pop(name, None)
            continue
        fns[name] = fn
    timed = time_row(row, {**fns, **(extra or {})}, flops=case.flops, warmup=warmup, repeat=repeat, device=device)
    for name in fns:
        if name not in timed:
            continue
        row["rel_l2_vs_float64"][name] = float64_error(firsts[name], *sets[0], case.causal, error_rows)
        if name in backends:
            row["backend"][name] = backends[name]
    if "adaattn" in firsts and "torch-flash" in firsts:
        row["rel_l2_vs_torch_flash"] = device_rel_l2(firsts["adaattn"], firsts["torch-flash"])
    ours_name = next((impl_name(p) for p in policies if row["tflops"].get(impl_name(p))), None)
    if ours_name is not None:
        ours_tflops = row["tflops"][ours_name]
        row["ratio"] = {name: (ours_tflops / t if t else None) for name, t in row["tflops"].items()
                        if not name.startswith("adaattn") and name not in (extra or {})}
    return row


def free_memory(device: str) -> None:
    """Give pooled GPU memory back between problems (CuPy's pool, and torch's when torch is loaded)."""
    if device != "gpu":
        return
    import cupy

    cupy.get_default_memory_pool().free_all_blocks()
    if "torch" in sys.modules:
        sys.modules["torch"].cuda.empty_cache()


def sweep(
    config: SweepConfig,
    *,
    progress: Callable[[int, int, Case], None] | None = None,
    env: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Run every case of `config`; the results document (see the module docstring).

    `progress(done, total, case)` is called before each case and once at the end (case of the last one).
    """
    peers, skipped = resolve_peers(config.peers, config.device, config.dtypes)
    results: dict[str, Any] = {
        "env": env if env is not None else environment(config.device, timing=TIMING),
        "setup": config.setup_text(),
        "config": config.as_dict(),
        "peers": [p.name for p in peers],
        "peers_skipped": skipped,
        "rows": [],
    }
    cases = config.cases()
    for index, case in enumerate(cases):
        if progress is not None:
            progress(index, len(cases), case)
        seed = None if config.seed is None else config.seed + index
        results["rows"].append(run_case(case, device=config.device, policies=config.policies, peers=peers,
                                        warmup=config.warmup, repeat=config.repeat, seed=seed,
                                        error_rows=config.error_rows))
        free_memory(config.device)
    if progress is not None and cases:
        progress(len(cases), len(cases), cases[-1])
    return results


# --------------------------------------------------------------------------------------------------------------
# Output: table, JSON, plot


def implementations(results: dict[str, Any]) -> list[str]:
    """Implementation names in the results, AdaAttn's first, then in order of appearance."""
    names: list[str] = []
    for row in results["rows"]:
        for name in row["tflops"]:
            if name not in names:
                names.append(name)
    return sorted(names, key=lambda n: (not n.startswith("adaattn"), names.index(n)))


def format_number(x: float | None, spec: str) -> str:
    """`x` formatted by `spec`, or "n/a" (a missing timing or ratio) right-aligned to the spec's width."""
    if x is None:
        width = re.match(r"\d*", spec).group()
        return "n/a".rjust(int(width or 0))
    return format(x, spec)


def format_table(results: dict[str, Any]) -> str:
    """A text table: TFLOP/s of every implementation, AdaAttn / peer ratios, AdaAttn's error vs float64
    (and vs torch flash where measured)."""
    names = implementations(results)
    ours = [n for n in names if n.startswith("adaattn")]
    peers = [n for n in names if n not in ours]
    reference = ours[0] if ours else None
    vs_flash = any("rel_l2_vs_torch_flash" in row for row in results["rows"])
    header = ["D", "S", "causal", "dtype", *names, *(f"/{p}" for p in peers if reference)]
    if reference:
        header.append("rel_l2")
    if vs_flash:
        header.append("vs_flash")
    lines = [header]
    for row in results["rows"]:
        t = row["tflops"]
        dtype = _row_dtype(results, row)
        cells = [str(row["dim"]), str(row["seq"]), "yes" if row["causal"] else "no", SHORT_DTYPE.get(dtype, dtype)]
        cells += [format_number(t.get(n), ".3g" if (t.get(n) or 0) < 10 else ".1f") for n in names]
        if reference:
            cells += [format_number(row.get("ratio", {}).get(p), ".2f") for p in peers]
            cells.append(format_number(row.get("rel_l2_vs_float64", {}).get(reference), ".1e"))
        if vs_flash:
            cells.append(format_number(row.get("rel_l2_vs_torch_flash"), ".1e"))
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.rjust(w) for cell, w in zip(line, widths)) for line in lines]
    env = results.get("env", {})
    device = env.get("gpu") or env.get("cpu") or "?"
    title = f"Forward TFLOP/s, {results.get('setup', '')}, on {device}"
    notes = []
    if reference:
        notes.append(f"/peer: {reference}'s TFLOP/s over the peer's; rel_l2: {reference} vs float64 "
                     f"(last {results.get('config', {}).get('error_rows', 256)} rows of batch 0, head 0)")
    if vs_flash:
        notes.append("vs_flash: relative L2 distance between adaattn's and torch flash's outputs")
    return "\n".join([title, *text, *notes]) + "\n"


def write_json(results: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(results, indent=1) + "\n")
    return path


def _row_dtype(results: dict[str, Any], row: dict[str, Any]) -> str:
    """A row's dtype; files written before rows carried one name it in ``setup`` ("..., bf16, ...")."""
    if row.get("dtype"):
        return str(row["dtype"])
    tokens = [t.strip() for t in str(results.get("setup", "")).split(",")]
    long = {short: full for full, short in SHORT_DTYPE.items()}
    return next((long[t] for t in tokens if t in long), "")


def _seq_label(seq: int) -> str:
    return f"{seq // 1024}k" if seq >= 1024 and seq % 1024 == 0 else str(seq)


def plot_results(results: dict[str, Any] | str | Path, out_png: str | Path, *, title: str | None = None) -> Path:
    """PNG of TFLOP/s against sequence length (log2 axis), one panel per head dim, one line per implementation
    and dtype/policy; causal dashed, non-causal solid. `results`: a results document or its JSON file."""
    if not isinstance(results, dict):
        results = json.loads(Path(results).read_text())
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt
    from matplotlib.lines import Line2D

    rows = results["rows"]
    dims = sorted({row["dim"] for row in rows})
    dtypes = sorted({_row_dtype(results, row) for row in rows})
    names = implementations(results)
    series = [(name, dtype) for name in names for dtype in dtypes]
    palette = plt.get_cmap("tab10").colors
    markers = ["o", "s", "^", "D", "v"]
    colors = {key: palette[i % len(palette)] for i, key in enumerate(series)}  # one color per line pair

    fig, axes = plt.subplots(1, len(dims), figsize=(4.6 * len(dims) + 0.6, 4.6), sharey=True, squeeze=False)
    top = 0.0
    for ax, dim in zip(axes[0], dims):
        seqs = sorted({row["seq"] for row in rows if row["dim"] == dim})
        for name, dtype in series:
            for causal in (False, True):
                points = sorted((row["seq"], row["tflops"].get(name)) for row in rows
                                if row["dim"] == dim and row["causal"] == causal
                                and _row_dtype(results, row) == dtype and row["tflops"].get(name) is not None)
                if not points:
                    continue
                xs, ys = zip(*points)
                top = max(top, *ys)
                ours = name.startswith("adaattn")
                ax.plot(xs, ys, color=colors[name, dtype], linestyle="--" if causal else "-",
                        linewidth=2.4 if ours else 1.6, marker=markers[dtypes.index(dtype) % len(markers)],
                        markersize=4, zorder=3 if ours else 2)
        ax.set_xscale("log", base=2)
        ax.set_xticks(seqs)
        ax.set_xticklabels([_seq_label(s) for s in seqs])
        ax.minorticks_off()
        ax.set_title(f"head dim {dim}")
        ax.set_xlabel("sequence length S")
        ax.grid(True, which="major", alpha=0.3)
    axes[0][0].set_ylabel("TFLOP/s (causal: half the FLOPs)")
    axes[0][0].set_ylim(0, top * 1.08 if top > 0 else 1)

    handles = []
    for name, dtype in series:
        label = LABELS.get(name, name.replace("adaattn[", "AdaAttn [")) + (
            f" {SHORT_DTYPE.get(dtype, dtype)}" if len(dtypes) > 1 else "")
        handles.append(Line2D([], [], color=colors[name, dtype], linewidth=2.4 if name.startswith("adaattn") else 1.6,
                              label=label,
                              marker=markers[dtypes.index(dtype) % len(markers)], markersize=4))
    handles += [Line2D([], [], color="0.3", linestyle="-", label="non-causal"),
                Line2D([], [], color="0.3", linestyle="--", label="causal")]
    width = fig.get_size_inches()[0]
    longest = max(len(h.get_label()) for h in handles)
    columns = max(1, min(len(handles), int(width / (0.75 + 0.085 * longest))))
    fig.legend(handles=handles, loc="lower center", ncol=columns, frameon=False, bbox_to_anchor=(0.5, 0.0))
    env = results.get("env", {})
    if title is None:
        device = env.get("gpu") or env.get("cpu") or "unknown device"
        versions = ", ".join(f"{k} {env[k]}" for k in ("driver", "torch", "cupy") if env.get(k))
        timer = "CUDA-event" if env.get("gpu") else "perf_counter"
        title = (f"Attention forward on {device}: {results.get('setup', '')}\n"
                 f"median of {timer} timings{', ' + versions if versions else ''}, {str(env.get('date', ''))[:10]}")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout(rect=(0, 0.03 + 0.055 * math.ceil(len(handles) / columns), 1, 1))
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out_png, dpi=130)
    plt.close(fig)
    return out_png


def output_stem(results: dict[str, Any], kind: str = "fwd") -> str:
    """File name stem like ``2026-11-22-NVIDIA-H200-fwd`` (``...-cpu-fwd`` on the CPU)."""
    env = results.get("env", {})
    device = env.get("gpu") or "cpu"
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in device.replace(" ", "-"))
    return f"{str(env.get('date', ''))[:10] or datetime.date.today().isoformat()}-{slug}-{kind}"



def main(argv: Sequence[str] | None = None) -> int:
    """``python -m adaattn_core.bench RESULTS.json [--png OUT.png]``: table and plot of a results file."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m adaattn_core.bench",
                                     description="Print the table of a forward results JSON and plot it as PNG.")
    parser.add_argument("results", type=Path, help="e.g. benchmarks/results/2026-11-22-H200-fwd.json")
    parser.add_argument("--png", type=Path, default=None, help="default: the JSON's path with .png")
    args = parser.parse_args(argv)
    results = json.loads(args.results.read_text())
    print(format_table(results), end="")
    print(f"wrote {plot_results(results, args.png or args.results.with_suffix('.png'))}")
    return 0

__all__ = [
    "LABELS",
    "PEERS",
    "Case",
    "FWD_BWD_FLOP_FACTOR",
    "Impl",
    "Peer",
    "SweepConfig",
    "PAPER_HIDDEN",
    "PAPER_TOKENS",
    "adaattn_impl",
    "case_seed",
    "cupy_on_torch_stream",
    "device_rel_l2",
    "environment",
    "float64_error",
    "format_number",
    "format_table",
    "forward_flops",
    "implementations",
    "input_set_count",
    "main",
    "make_input_sets",
    "median_ms",
    "output_stem",
    "paper_case",
    "plot_results",
    "random_arrays",
    "random_generator",
    "resolve_peers",
    "run_case",
    "short_error",
    "sweep",
    "tflops",
    "time_calls",
    "time_interleaved",
    "time_row",
    "to_host64",
    "to_torch",
    "torch_stream",
    "unsupported",
    "write_json",
]


if __name__ == "__main__":
    raise SystemExit(main())
