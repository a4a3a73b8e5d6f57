"""Peers on the same problems as `forward_gpu.Forward`, one class each, so their history sits beside ours.

Each is skipped (NotImplementedError in setup) without a GPU, without torch, or for shapes the backend
does not take.
"""

from __future__ import annotations

from typing import Any

from adaattn_core import bench

from ._common import _GpuForward


class _Peer(_GpuForward):
    peer = ""

    def build(self, sets: list[tuple[Any, Any, Any]], causal: bool) -> bench.Impl:
        peer = bench.PEERS[self.peer]
        reason = peer.unavailable("gpu", self.case.dtype)
        if reason is not None:
            raise NotImplementedError(f"{peer.name}: {reason}")
        return peer.build(sets, causal)


class TorchFlashForward(_Peer):
    """torch SDPA, FLASH_ATTENTION backend (FlashAttention-2)."""

    peer = "torch-flash"


class TorchCudnnForward(_Peer):
    """torch SDPA, CUDNN_ATTENTION backend."""

    peer = "torch-cudnn"


class SageAttentionForward(_Peer):
    """SageAttention (INT8 Q·K, fp16 P·V), when the `sageattention` package is installed."""

    peer = "sageattention"
