"""Forward + backward on the GPU (training step of attention), beside torch SDPA's flash and cuDNN backends.

FLOPs counted as 3.5 × the forward's (backward 2.5×; `bench.FWD_BWD_FLOP_FACTOR`), halved when causal. Same
grid and timing as `forward_gpu`; each input set holds (q, k, v, dout), drawn together in setup, so AdaAttn and
every peer get the same gradients.
"""

from __future__ import annotations

from typing import Any

from adaattn_core import bench

from ._common import _GpuForward, require_gpu


class _GpuForwardBackward(_GpuForward):
    ARRAYS = 4  # q, k, v, dout

    def track_ms(self, seq: int, dim: int, causal: bool) -> float:
        """Median milliseconds of forward + backward (CUDA events): lower is better."""
        return self._median_ms()

    track_ms.unit = "ms"  # type: ignore[attr-defined]

    def track_tflops(self, seq: int, dim: int, causal: bool) -> float:
        """TFLOP/s of forward + backward (3.5 × forward FLOPs). Graphs only: asv reads bigger as worse."""
        return float(bench.tflops(bench.FWD_BWD_FLOP_FACTOR * self.case.flops, self._median_ms()) or 0.0)

    track_tflops.unit = "TFLOP/s"  # type: ignore[attr-defined]

class ForwardBackward(_GpuForwardBackward):
    """AdaAttn's fused forward and fused backward (dq by atomics), policy "exact", bf16, [B, H, S, D]."""

    def build(self, sets: list[tuple[Any, Any, Any]], causal: bool) -> bench.Impl:
        require_gpu(fused=True)
        from adaattn_core import attention, attention_backward
        from adaattn_core.backends import backward_backend
        from adaattn_core.problem import describe

        backend = backward_backend(describe(*sets[0][:3], causal=causal, scale=None, layout="bhsd"))
        if backend != "cuda":  # keep the history to one kernel: another backend is a different benchmark
            raise NotImplementedError(f"backward backend {backend!r} instead of the fused kernels")

        def call(i: int) -> Any:
            q, k, v, dout = sets[i % len(sets)]
            out, lse = attention(q, k, v, causal=causal, return_lse=True)
            return attention_backward(dout, q, k, v, out, lse, causal=causal)

        return call


class _TorchForwardBackward(_GpuForwardBackward):
    backend = ""

    def build(self, sets: list[tuple[Any, Any, Any]], causal: bool) -> bench.Impl:
        require_gpu()
        try:
            import torch
            import torch.nn.functional as F
            from torch.nn.attention import SDPBackend, sdpa_kernel
        except ImportError as error:
            raise NotImplementedError(f"torch is not installed: {error}") from error
        backend = getattr(SDPBackend, self.backend)
        tensors = [[bench.to_torch(x).detach().requires_grad_() for x in qkvd[:3]] for qkvd in sets]
        douts = [bench.to_torch(qkvd[3]) for qkvd in sets]

        def call(i: int) -> Any:
            j = i % len(tensors)
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(*tensors[j], is_causal=causal)
            return torch.autograd.grad(out, tensors[j], douts[j])

        return call


class TorchFlashForwardBackward(_TorchForwardBackward):
    """torch SDPA, FLASH_ATTENTION backend (FlashAttention-2), forward + backward."""

    backend = "FLASH_ATTENTION"


class TorchCudnnForwardBackward(_TorchForwardBackward):
    """torch SDPA, CUDNN_ATTENTION backend, forward + backward."""

    backend = "CUDNN_ATTENTION"
