"""Shared pieces of the asv suite. Names start with "_" or are not benchmark-shaped, so asv finds no
benchmarks here; benchmark classes subclass `_GpuForward`."""

from __future__ import annotations

from typing import Any

from adaattn_core import bench

#: The GPU grid: the FlashAttention-paper shape (`bench.paper_case`: B = 16k // S, H = 2048 // D), kept small so
#: that a whole `asv run` stays within a few minutes (each parameter set is a fresh process).
GPU_PARAMS: list[list[Any]] = [[1024, 4096], [64, 128], [False, True]]
GPU_PARAM_NAMES = ["seq", "dim", "causal"]
DTYPE = "bfloat16"
WARMUP = 5
REPEAT = 20


def require_gpu(*, fused: bool = False) -> None:
    """Raise NotImplementedError (asv: skipped) without a CUDA GPU, or, with `fused`, without the fused kernel."""
    from adaattn_core.device import capabilities

    caps = capabilities()
    if caps.gpu is None:
        raise NotImplementedError(f"no GPU: {caps.backends['cupy-blocked']}")
    if fused and not caps.backends["cuda"].startswith("available"):
        raise NotImplementedError(caps.backends["cuda"])


class _GpuForward:
    """Times one implementation's forward on the GPU grid; subclasses set `build`.

    setup: fresh inputs (rotated sets larger than L2), the implementation's first call (compiles or loads
    its kernels), `WARMUP` more calls. track_tflops: `REPEAT` CUDA-event-timed calls, median, as TFLOP/s.
    """

    params = GPU_PARAMS
    param_names = GPU_PARAM_NAMES
    timeout = 180.0

    fn: bench.Impl
    case: bench.Case
    #: Arrays per input set: q, k, v (the backward classes add dout).
    ARRAYS = 3

    def build(self, sets: list[tuple[Any, Any, Any]], causal: bool) -> bench.Impl:
        raise NotImplementedError

    def setup(self, seq: int, dim: int, causal: bool) -> None:
        require_gpu()
        self.case = bench.paper_case(seq, dim, causal, DTYPE)
        sets = bench.make_input_sets(self.case, "gpu", seed=bench.case_seed(self.case), arrays=self.ARRAYS)
        try:
            self.fn = self.build(sets, causal)
            for i in range(WARMUP + 1):
                self.fn(i)
            bench.synchronize("gpu")
        except NotImplementedError:
            raise
        except Exception as error:  # a peer that does not take this shape: skipped, not failed
            raise NotImplementedError(f"{type(self).__name__} cannot run {self.case}: {error}") from error

    def _median_ms(self) -> float:
        return bench.median_ms(self.fn, warmup=0, repeat=REPEAT, device="gpu")

    def track_tflops(self, seq: int, dim: int, causal: bool) -> float:
        """TFLOP/s (4·B·H·S²·D, halved causal) of the median call. Graphs only: asv reads bigger as worse."""
        return float(bench.tflops(self.case.flops, self._median_ms()) or 0.0)

    track_tflops.unit = "TFLOP/s"  # type: ignore[attr-defined]
