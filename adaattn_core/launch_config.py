"""Launch configuration of the CUDA kernels, in one place.

The tile table is read by the launcher (`cuda_forward.py`) and by the CI compile check
(`scripts/compile_kernels.py`), so the instantiations CI compiles are the ones users run.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Oldest GPU the fused kernels run on (mma.sync with bf16, cp.async, ldmatrix).
MIN_COMPUTE_CAPABILITY = (8, 0)

#: CUDA type name per dtype name, for template instantiation.
CUDA_TYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16"}


@dataclass(frozen=True)
class ForwardTile:
    """Tile shape of attention_fwd.cu for one head dim."""

    block_m: int
    block_n: int
    num_warps: int

    @property
    def threads(self) -> int:
        return self.num_warps * 32

    def smem_bytes(self, head_dim: int) -> int:
        """Dynamic shared memory: Q tile + double-buffered K and V tiles, 2-byte elements
        (the formula in attention_fwd.cu's header)."""
        return (self.block_m + 4 * self.block_n) * head_dim * 2


#: Forward tiles per (head dim, causal), chosen by measurement on an H200 against torch's flash backend
#: (benchmarks/results/, notes/). Head dims not listed run on the cupy-blocked path.
FORWARD_TILES: dict[tuple[int, bool], ForwardTile] = {
    (32, False): ForwardTile(128, 64, 4),
    (32, True): ForwardTile(128, 64, 4),
    (64, False): ForwardTile(128, 64, 4),
    (64, True): ForwardTile(128, 64, 4),
    (96, False): ForwardTile(128, 32, 4),
    (96, True): ForwardTile(128, 32, 4),
    # 128×64 with 4 warps (FlashAttention-2's choice) spills 16 bytes here.
    (128, False): ForwardTile(128, 32, 4),
    (128, True): ForwardTile(64, 64, 4),
    (192, False): ForwardTile(128, 64, 8),
    (192, True): ForwardTile(128, 64, 8),
    (256, False): ForwardTile(128, 64, 8),
    (256, True): ForwardTile(128, 64, 8),
}
FORWARD_HEAD_DIMS = tuple(sorted({head_dim for head_dim, _ in FORWARD_TILES}))


def forward_name_expression(dtype: str, head_dim: int, causal: bool) -> str:
    """The C++ name of the forward instantiation for a problem."""
    tile = FORWARD_TILES[(head_dim, causal)]
    return (
        f"attention_fwd<{CUDA_TYPES[dtype]}, {head_dim}, {tile.block_m}, {tile.block_n}, {tile.num_warps}, "
        f"{'true' if causal else 'false'}>"
    )


def all_forward_instantiations() -> list[tuple[str, int, bool, str]]:
    """(dtype, head_dim, causal, name expression) for every forward kernel the launcher can ask for."""
    return [
        (dtype, head_dim, causal, forward_name_expression(dtype, head_dim, causal))
        for dtype in CUDA_TYPES
        for head_dim, causal in FORWARD_TILES
    ]
