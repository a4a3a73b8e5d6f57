"""The adaptive paths on the GPU: every preset end to end (estimation and quantisation included), its error
against float64, and the rank estimators alone.

Inputs are standard normal, so the guards mostly keep heads exact ("balanced", "lowrank"); the forced "fp8"
preset times the fp8 kernel with its quantisation. A preset's milliseconds include everything it does per
call, which is what a user pays.
"""

from __future__ import annotations

from typing import Any

from adaattn_core import bench

from ._common import DTYPE, GPU_PARAM_NAMES, WARMUP, _GpuForward, require_gpu

PRESETS = ["quality", "balanced", "speed", "fp8", "lowrank", "adaptive"]
#: One long-ish length keeps the grid (2 dims x 2 causal x 6 presets, a process each) within minutes.
SEQS = [4096]


class PolicyForward(_GpuForward):
    """`attention(..., policy=preset)` in bf16, [B, H, S, D], B·S = 16k tokens, H·D = 2048."""

    params = [SEQS, [64, 128], [False, True], PRESETS]
    param_names = [*GPU_PARAM_NAMES, "policy"]

    def setup(self, seq: int, dim: int, causal: bool, policy: str) -> None:  # type: ignore[override]
        self.policy = policy
        super().setup(seq, dim, causal)

    def build(self, sets: list[tuple[Any, Any, Any]], causal: bool) -> bench.Impl:
        require_gpu(fused=True)
        fn, _ = bench.adaattn_impl(sets, causal, policy=self.policy)
        return fn

    def track_ms(self, seq: int, dim: int, causal: bool, policy: str) -> float:
        """Median milliseconds of one call (CUDA events): lower is better."""
        return self._median_ms()

    track_ms.unit = "ms"  # type: ignore[attr-defined]

    def track_tflops(self, seq: int, dim: int, causal: bool, policy: str) -> float:  # type: ignore[override]
        """Dense-equivalent TFLOP/s of the median call (graphs only)."""
        return float(bench.tflops(self.case.flops, self._median_ms()) or 0.0)

    track_tflops.unit = "TFLOP/s"  # type: ignore[attr-defined]


class PolicyError:
    """Relative L2 error of each preset against float64 (B=1, H=8, S=2048, D=128, bf16): lower is better."""

    params = [[False, True], PRESETS]
    param_names = ["causal", "policy"]
    timeout = 180.0

    def setup(self, causal: bool, policy: str) -> None:
        require_gpu(fused=True)
        case = bench.Case(seq=2048, dim=128, causal=causal, batch=1, heads=8, dtype="bfloat16")
        (self.qkv,) = bench.make_input_sets(case, "gpu", sets=1, seed=7 + causal)

    def track_rel_l2_vs_float64(self, causal: bool, policy: str) -> float:
        from adaattn_core import attention, attention_reference

        q, k, v = (bench.to_host64(x) for x in self.qkv)
        out = bench.to_host64(attention(*self.qkv, causal=causal, policy=policy))
        ref, _ = attention_reference(q, k, v, causal=causal)
        return bench.rel_l2(out, ref)

    track_rel_l2_vs_float64.unit = "relative L2 error"  # type: ignore[attr-defined]


class RankEstimators:
    """The rank policy's estimators alone at S = 8k (B=2, H=16, D=128, bf16): the Numba probe kernels on
    16 rows per head, and the pooled block map with its spectral estimates."""

    params = [[False, True]]
    param_names = ["causal"]
    timeout = 180.0

    def setup(self, causal: bool) -> None:
        require_gpu(fused=True)
        from adaattn_core import estimators
        from adaattn_core.problem import describe

        self.case = bench.paper_case(8192, 128, causal, DTYPE)
        (self.qkv,) = bench.make_input_sets(self.case, "gpu", sets=1, seed=11 + causal)
        self.problem = describe(*self.qkv, causal=causal, scale=None, layout="bhsd")
        self.rows = estimators.probe_rows(self.problem, 16)
        for _ in range(WARMUP):  # compiles the Numba kernels outside the timing
            self._probe()
            self._spectrum()

    def _probe(self) -> Any:
        from adaattn_core import estimators

        return estimators.probe(self.problem, *self.qkv, self.rows)

    def _spectrum(self) -> Any:
        from adaattn_core import estimators

        return estimators.spectrum(estimators.pooled_map(self.problem, *self.qkv[:2], block=256))

    def track_probe_ms(self, causal: bool) -> float:
        """Median milliseconds of the probe (CUDA events): lower is better."""
        return bench.median_ms(lambda i: self._probe(), warmup=0, repeat=10, device="gpu")

    track_probe_ms.unit = "ms"  # type: ignore[attr-defined]

    def track_pooled_spectrum_ms(self, causal: bool) -> float:
        """Median milliseconds of the pooled map and its spectrum (host-synchronised): lower is better."""
        return bench.median_ms(lambda i: self._spectrum(), warmup=0, repeat=10, device="gpu")

    track_pooled_spectrum_ms.unit = "ms"  # type: ignore[attr-defined]
