"""AdaAttn's fused forward on the GPU: milliseconds (regressions), TFLOP/s (graphs), error against float64."""

from __future__ import annotations

from typing import Any

from adaattn_core import bench

from ._common import _GpuForward, require_gpu


class Forward(_GpuForward):
    """The fused kernel (backend "cuda"), policy "exact", bf16, [B, H, S, D]."""

    def build(self, sets: list[tuple[Any, Any, Any]], causal: bool) -> bench.Impl:
        require_gpu(fused=True)
        fn, backend = bench.adaattn_impl(sets, causal)
        if backend != "cuda":  # keep the history to one kernel: another backend is a different benchmark
            raise NotImplementedError(f"backend {backend!r} ran instead of the fused kernel")
        return fn

    def track_ms(self, seq: int, dim: int, causal: bool) -> float:
        """Median milliseconds of one call (CUDA events): lower is better, asv's default reading."""
        return self._median_ms()

    track_ms.unit = "ms"  # type: ignore[attr-defined]


class ForwardError:
    """Relative L2 error of the fused forward against float64 (B=1, H=4, S=1024): lower is better."""

    params = [[64, 128], [False, True]]
    param_names = ["dim", "causal"]
    timeout = 180.0

    def setup(self, dim: int, causal: bool) -> None:
        require_gpu(fused=True)
        self.case = bench.Case(seq=1024, dim=dim, causal=causal, batch=1, heads=4, dtype="bfloat16")
        (self.qkv,) = bench.make_input_sets(self.case, "gpu", sets=1, seed=dim * 2 + causal)

    def track_rel_l2_vs_float64(self, dim: int, causal: bool) -> float:
        from adaattn_core import attention, attention_reference

        q, k, v = (bench.to_host64(x) for x in self.qkv)
        out = bench.to_host64(attention(*self.qkv, causal=causal))
        ref, _ = attention_reference(q, k, v, causal=causal)
        return bench.rel_l2(out, ref)

    track_rel_l2_vs_float64.unit = "relative L2 error"  # type: ignore[attr-defined]
