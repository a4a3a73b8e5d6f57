"""Launch configuration of the CUDA kernels, in one place.

The tile tables are read by the launchers (`cuda_forward.py`, `cuda_backward.py`, `cuda_fp8.py`,
`cuda_lowrank.py`; `precision.py` for the emulation) and by the CI compile check
(`scripts/compile_kernels.py`), so the instantiations CI compiles are the ones users run.
"""

from __future__ import annotations

from dataclasses import dataclass

#: Oldest GPU the fused kernels run on (mma.sync with bf16, cp.async, ldmatrix).
MIN_COMPUTE_CAPABILITY = (8, 0)

#: CUDA type name per dtype name, for template instantiation.
CUDA_TYPES = {"float16": "__half", "bfloat16": "__nv_bfloat16"}


@dataclass(frozen=True)
class _WarpTile:
    """A thread block of `num_warps` warps over `block_m` × `block_n` tiles."""

    block_m: int
    block_n: int
    num_warps: int

    @property
    def threads(self) -> int:
        return self.num_warps * 32


@dataclass(frozen=True)
class ForwardTile(_WarpTile):
    """Tile shape of attention_fwd.cu for one (head dim, causal)."""

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


@dataclass(frozen=True)
class Sm90Tile:
    """Tile shape of attention_fwd_sm90_ws.cu (warp-specialised Hopper forward): `block_m` query rows (one
    consumer warpgroup per 64; 128 or 192) plus one producer warpgroup, `block_n` keys per tile, `stages` K and V
    buffers each; `pingpong`: the consumers take turns on the tensor cores."""

    block_n: int
    stages: int = 2
    block_m: int = 128
    pingpong: bool = True

    @property
    def threads(self) -> int:
        return 128 * (1 + self.block_m // 64)

    def smem_bytes(self, head_dim: int) -> int:
        """Q tile, `stages` K and V tiles, 1024 bytes of swizzle alignment, 128 bytes of mbarriers (the formula
        in attention_fwd_sm90_ws.cu's header)."""
        return (self.block_m + 2 * self.stages * self.block_n) * head_dim * 2 + 1024 + 128


#: Hopper (sm_90a, wgmma) forward tiles per (head dim, causal); other head dims use the mma.sync kernel.
#: D=64 runs three consumer warpgroups (192 query rows, 3 stages): over 128 rows at S >= 2k, +15-18%
#: non-causal and +4-13% causal, -9% at causal S = 1k (H200,
#: benchmarks/results/tuning/2026-11-22-H200-fwd-tiles-{base,v2}.json). D=128 non-causal takes
#: FlashAttention-3's 176 keys in 2 stages since the forward became persistent: over 128 keys in 3 stages at
#: S = 4k, 8k, 16k, +1.1%, +7.6%, +4.4% as ratios of two interleaved runs' means, +1.1%, +3.4%, +3.4% in the
#: second run alone (…/2026-12-03-H200-fwd-keys176-*.json); without ping-pong -5.6% and -8.1% at 4k and 16k
#: (…-nopp176-*.json); causal it was not tried. D=128 causal takes 3 K/V stages (225 KB of shared memory) since the
#: loads moved to TMA: +1-6% over 2 (…/2026-12-03-H200-fwd-d128-*.json). 80 keys at D=256 measured within noise
#: of 64 (benchmarks/results/tuning/2026-11-22-H200-fwd-tiles-v1.json).
FORWARD_TILES_SM90: dict[tuple[int, bool], Sm90Tile] = {
    (64, False): Sm90Tile(128, stages=3, block_m=192),
    (64, True): Sm90Tile(128, stages=3, block_m=192),
    (128, False): Sm90Tile(176, stages=2),
    (128, True): Sm90Tile(128, stages=3),
    (256, False): Sm90Tile(64),
    (256, True): Sm90Tile(64),
}

#: Tiles that replace the table's when its last query block would pad more than `MAX_ROW_PADDING` of the rows
#: and the replacement pads fewer (short sequences; measured at Sq = Sk = 512-2048 only, elsewhere the rule
#: extrapolates). Causal D=64 with 128 rows instead of 192: +6.0% at S = 512 and +5.8% at 1k (192 rows pad
#: 12.5%), -6.7% at 768, -12% at 1536 and -11% at 2048 (no or 3% padding) (H200, interleaved runs,
#: benchmarks/results/tuning/2026-12-03-H200-fwd-d64c-short-*.json); without ping-pong a further +10.6% at 512
#: and +9.1% at 1k (…-d64c-nopp-*.json; 2 stages instead of 3: -1%, …-d64c-1k-*.json).
SHORT_TILES_SM90: dict[tuple[int, bool], Sm90Tile] = {
    (64, True): Sm90Tile(128, stages=3, block_m=128, pingpong=False),
}
MAX_ROW_PADDING = 0.1


def sm90_tile(head_dim: int, causal: bool, seqlen_q: int) -> Sm90Tile | None:
    """The wgmma kernel's tile for a problem (None: no tile for this head dim): the table's, or its short
    alternative where the table tile's last query block would leave more than MAX_ROW_PADDING of Sq idle and the
    alternative's would leave fewer rows idle."""
    tile = FORWARD_TILES_SM90.get((head_dim, causal))
    short = SHORT_TILES_SM90.get((head_dim, causal))
    if tile is None or short is None or seqlen_q == 0:
        return tile
    padding = -seqlen_q % tile.block_m
    return short if padding > MAX_ROW_PADDING * seqlen_q and -seqlen_q % short.block_m < padding else tile

#: The wgmma kernel runs one large CTA per SM; with few key tiles per CTA its prologue and epilogue
#: dominate. Since it became persistent (the next tile's loads overlap the epilogue) it wins from Sk = 384 on at
#: every head dim and causal setting (+11% to +79% at 384, and at 512), while at 256 the mma.sync kernel still
#: wins at D = 64 (H200, Sq = Sk, benchmarks/results/tuning/2026-12-03-H200-fwd-short-{sm80,sm90}.json and
#: …-minseq-{sm80,sm90}.json). Hopper uses the wgmma kernel from this key length on.
SM90_MIN_SEQLEN_K = 257

SM80_ARCHS = ("80", "90a")
SM90_ARCHS = ("90a",)


@dataclass(frozen=True)
class KernelLaunch:
    """One kernel instantiation and its launch shape (`block_m` query rows per work tile; the launcher sizes the
    grid: ceil(Sq / block_m) · Hq · B blocks for the non-persistent attention kernels). `tma_rows`: for a
    kernel that loads its three inputs through TMA tensor maps (adaattn_core/tma.py), the rows of each one's box;
    None for kernels that take pointers and strides. `persistent`: the kernel loops over its ceil(Sq / block_m) · Hq
    · B work tiles from a grid of at most one block per SM, handed out by a tile counter (`persistent_grid`)."""

    source: str
    name: str
    threads: int
    smem_bytes: int
    block_m: int
    archs: tuple[str, ...]
    tma_rows: tuple[int, int, int] | None = None
    persistent: bool = False


#: CUDA's limit on grid.x, and the int32 range of the kernels' block and tile indices.
MAX_GRID = 2**31 - 1
#: CUDA's limit on grid.y and grid.z.
MAX_GRID_YZ = 65535


def ceil_div(a: int, b: int) -> int:
    """⌈a / b⌉ for a >= 0, b >= 1: the launch arithmetic's tile and block counts."""
    return -(-a // b)


def query_tiles(seqlen_q: int, block_m: int, pairs: int) -> int:
    """Query tiles of `block_m` rows of one of `pairs` (batch, head) pairs each: the grid of a kernel that takes
    one per block (the mma.sync forward, the fp8 forward, the deterministic dQ), the work tiles of a persistent one,
    the Q blocks of the fp8 quantiser."""
    return ceil_div(seqlen_q, block_m) * pairs


def check_grid(blocks: int) -> int:
    """`blocks` if one launch can have that many (grid.x); else ValueError with the count and the limit."""
    if blocks > MAX_GRID:
        raise ValueError(f"problem too large for one launch: {blocks} thread blocks, expected at most {MAX_GRID}")
    return blocks


def persistent_grid(work_tiles: int, sm_count: int) -> int:
    """Blocks of a persistent kernel: one per SM (its tiles use most of an SM's shared memory and registers),
    fewer when there are fewer work tiles. Raises ValueError when its int32 tile counter, which runs up to
    work_tiles + grid − 1, would overflow."""
    if work_tiles + sm_count > MAX_GRID:
        raise ValueError(f"problem too large for one launch: {work_tiles} query tiles, expected at most "
                         f"{MAX_GRID - sm_count} ({MAX_GRID} less the {sm_count} SMs)")
    return min(work_tiles, sm_count)


#: Bytes of K/V the causal wgmma forward's scheduler keeps in flight: it hands out work tiles longest first across
#: a section of (batch, head) pairs whose K and V fit in this much of L2, rather than one pair at a time, where
#: the SMs that drew a pair's long tiles last ran on alone at the end of the launch (scripts/causal_schedule_model.py
#: puts that tail at 3.5-4.8% of the launch at D = 64, up to 7% at 128 and 15% at 256). Over one pair per section,
#: causal, S = 2k-8k: +3.3% to +3.7% at D = 64, +3.9% to +5.0% at D = 128, +7.5% to +8.8% at D = 256; at 16k
#: +2.6% at D = 64 and level at D = 128 and 256 (one or two pairs per section there); at 1k -0.0% / -1.3%
#: (D = 64 / 128). 32 MB did as well at D = 64 and 128 but 0.7-2.5 points worse at D = 256, 64 MB and one section
#: of every pair worse still (H200, 60 MiB of L2; benchmarks/results/tuning/2026-12-04-H200-fwd-causal-sections.txt).
#: 0: one pair per section. Read when a launch plan is built (cuda_forward._launch caches it per problem).
CAUSAL_SECTION_BYTES = 16 << 20


def causal_section_heads(seqlen_k: int, head_dim: int, group_size: int, pairs: int) -> int:
    """(batch, head) pairs per section of the causal wgmma forward's work order (see CAUSAL_SECTION_BYTES): as many
    query heads as have their K and V (16-bit, shared by `group_size` query heads) within the budget, at least
    one and at most `pairs`."""
    kv_bytes_per_head = 2 * seqlen_k * head_dim * 2 / group_size
    return max(1, min(pairs, int(CAUSAL_SECTION_BYTES // max(kv_bytes_per_head, 1))))


def forward_launch(dtype: str, head_dim: int, causal: bool, use_sm90: bool, pingpong: bool = True,
                   seqlen_q: int = 0) -> KernelLaunch:
    """The forward kernel for a problem: the warp-specialised wgmma kernel when `use_sm90` (Hopper) and tiled for
    this head dim (`pingpong`: its consumer warpgroups take turns on the tensor cores where the tile does;
    `seqlen_q` picks the tile, see `sm90_tile`), else the mma.sync kernel."""
    flag = "true" if causal else "false"
    cuda_type = CUDA_TYPES[dtype]
    sm90 = sm90_tile(head_dim, causal, seqlen_q)
    if use_sm90 and sm90 is not None:
        return KernelLaunch(
            source="attention_fwd_sm90_ws.cu",
            name=(f"attention_fwd_sm90_ws<{cuda_type}, {head_dim}, {sm90.block_m}, {sm90.block_n}, {sm90.stages}, "
                  f"{flag}, {'true' if pingpong and sm90.pingpong else 'false'}>"),
            threads=sm90.threads,
            smem_bytes=sm90.smem_bytes(head_dim),
            block_m=sm90.block_m,
            archs=SM90_ARCHS,
            tma_rows=(sm90.block_m, sm90.block_n, sm90.block_n),  # Q, K, V
            persistent=True,
        )
    tile = FORWARD_TILES[(head_dim, causal)]
    return KernelLaunch(
        source="attention_fwd.cu",
        name=f"attention_fwd<{cuda_type}, {head_dim}, {tile.block_m}, {tile.block_n}, {tile.num_warps}, {flag}>",
        threads=tile.threads,
        smem_bytes=tile.smem_bytes(head_dim),
        block_m=tile.block_m,
        archs=SM80_ARCHS,
    )


def all_forward_kernels() -> list[KernelLaunch]:
    """Every forward instantiation a launcher can ask for, on any architecture."""
    kernels = []
    for dtype in CUDA_TYPES:
        for head_dim, causal in FORWARD_TILES:
            kernels.append(forward_launch(dtype, head_dim, causal, use_sm90=False))
        for head_dim, causal in FORWARD_TILES_SM90:
            for pingpong in (True, False):
                kernels.append(forward_launch(dtype, head_dim, causal, use_sm90=True, pingpong=pingpong))
        for head_dim, causal in SHORT_TILES_SM90:  # Sq = 1 takes the short tile (it pads fewer rows)
            for pingpong in (True, False):
                kernels.append(forward_launch(dtype, head_dim, causal, use_sm90=True, pingpong=pingpong, seqlen_q=1))
    # A tile without ping-pong instantiates the same kernel whatever the ping-pong choice: list each once.
    return list({launch.name: launch for launch in kernels}.values())


@dataclass(frozen=True)
class BackwardTile(_WarpTile):
    """Tile shape of attention_bwd_dkdv.cu (block_m queries per step, block_n resident keys per block)
    for one head dim; `d_split` warps share each key slice (one head-dim slice each), `dq_warps_m` is the
    number of warps along queries in the atomic dQ product."""

    d_split: int
    dq_warps_m: int

    def smem_bytes(self, head_dim: int, atomic_dq: bool) -> int:
        """K, V, double-buffered Q and dO (2-byte elements), dS^T when atomic, double-buffered lse/delta
        (the formula in attention_bwd_dkdv.cu's header)."""
        ds = self.block_n * self.block_m * 2 if atomic_dq else 0
        return (2 * self.block_n + 4 * self.block_m) * head_dim * 2 + ds + 4 * self.block_m * 4


#: dK/dV kernel tiles per head dim: 16 keys per warp (MT = 1) keep dK, dV, S^T and dP^T in registers;
#: D = 128 takes 32 queries per step (64 spills a few bytes: dK/dV alone hold 128 registers), D >= 192
#: splits the head dim over two warps per key slice. Every entry fits the 163 KiB of shared memory an
#: A100 block may use.
BACKWARD_TILES: dict[int, BackwardTile] = {
    32: BackwardTile(64, 128, 8, 1, 4),
    64: BackwardTile(64, 128, 8, 1, 4),
    96: BackwardTile(64, 128, 8, 1, 4),
    128: BackwardTile(32, 128, 8, 1, 2),
    192: BackwardTile(64, 64, 8, 2, 2),
    256: BackwardTile(32, 64, 8, 2, 2),
}

@dataclass(frozen=True)
class BackwardDqTile(_WarpTile):
    """Tile shape of attention_bwd_dq.cu (deterministic dQ): block_m resident queries, block_n keys per step."""

    def smem_bytes(self, head_dim: int) -> int:
        """Q and dO tiles + double-buffered K and V tiles (the formula in attention_bwd_dq.cu's header)."""
        return (2 * self.block_m + 4 * self.block_n) * head_dim * 2


#: Deterministic dQ kernel tiles per head dim: 16 query rows per warp, like the dK/dV kernel's keys.
BACKWARD_DQ_TILES: dict[int, BackwardDqTile] = {
    32: BackwardDqTile(64, 64, 4),
    64: BackwardDqTile(64, 64, 4),
    96: BackwardDqTile(64, 64, 4),
    128: BackwardDqTile(64, 64, 4),
    192: BackwardDqTile(64, 32, 4),
    256: BackwardDqTile(64, 32, 4),
}

#: Statistics (lse_log2, delta) and the atomic dQ workspace pad each (b, h)'s rows to a multiple of
#: this, a multiple of every block_m above, so the kernels load and accumulate whole tiles unchecked.
BACKWARD_ROW_PAD = 128

#: Threads per block of the elementwise backward kernels (preprocess, dq convert).
BACKWARD_ELEMENTWISE_THREADS = 256


def backward_launches(dtype: str, head_dim: int, causal: bool) -> dict[str, KernelLaunch]:
    """The backward kernels for a problem, by role: "preprocess" (delta, lse·log2e, zeroed dq workspace),
    "dkdv_atomic" (dK/dV with dQ by fp32 atomics), "dkdv" (dK/dV only), "dq" (deterministic dQ pass) and
    "dq_convert" (dq workspace → dq). `block_m` is the query tile (1 for the elementwise kernels)."""
    t, flag = CUDA_TYPES[dtype], "true" if causal else "false"
    kv, dq = BACKWARD_TILES[head_dim], BACKWARD_DQ_TILES[head_dim]
    dkdv = (f"attention_bwd_dkdv<{t}, {head_dim}, {kv.block_m}, {kv.block_n}, {kv.num_warps}, {kv.d_split}, "
            f"{kv.dq_warps_m}, {flag}, ")
    elementwise = {"threads": BACKWARD_ELEMENTWISE_THREADS, "smem_bytes": 0, "block_m": 1, "archs": SM80_ARCHS}
    return {
        "preprocess": KernelLaunch("attention_bwd_preprocess.cu", f"attention_bwd_preprocess<{t}, {head_dim}>",
                                   **elementwise),
        "dkdv_atomic": KernelLaunch("attention_bwd_dkdv.cu", dkdv + "true>", kv.threads,
                                    kv.smem_bytes(head_dim, atomic_dq=True), kv.block_m, SM80_ARCHS),
        "dkdv": KernelLaunch("attention_bwd_dkdv.cu", dkdv + "false>", kv.threads,
                             kv.smem_bytes(head_dim, atomic_dq=False), kv.block_m, SM80_ARCHS),
        "dq": KernelLaunch("attention_bwd_dq.cu",
                           f"attention_bwd_dq<{t}, {head_dim}, {dq.block_m}, {dq.block_n}, {dq.num_warps}, {flag}>",
                           dq.threads, dq.smem_bytes(head_dim), dq.block_m, SM80_ARCHS),
        "dq_convert": KernelLaunch("attention_bwd_dq_convert.cu", f"attention_bwd_dq_convert<{t}, {head_dim}>",
                                   **elementwise),
    }


def all_backward_kernels() -> list[KernelLaunch]:
    """Every distinct backward instantiation a launcher can ask for (the elementwise kernels do not depend
    on causal and appear once)."""
    kernels: dict[str, KernelLaunch] = {}
    for dtype in CUDA_TYPES:
        for head_dim in BACKWARD_TILES:
            for causal in (False, True):
                for kernel in backward_launches(dtype, head_dim, causal).values():
                    kernels.setdefault(kernel.name, kernel)
        for head_dim in BACKWARD_TILES_SM90:
            for causal in (False, True):
                kernel = backward_sm90_launch(dtype, head_dim, causal)
                kernels.setdefault(kernel.name, kernel)
    return list(kernels.values())


# FP8 forward (Hopper): quantisation kernels (quantize_fp8.cu) and the warp-specialised e4m3 wgmma forward
# (attention_fwd_fp8_sm90.cu: a producer warpgroup and two ping-ponged consumers, as attention_fwd_sm90_ws.cu).
# Q is quantised with one scale per tile of query rows and K with one per block of keys (a part of the key tile),
# so the quantiser's blocks follow the attention kernel's tiles.

#: Head dims with an fp8 forward instantiation.
FP8_HEAD_DIMS = (64, 128)
#: Query rows per thread block of the fp8 forward (two consumer warpgroups), also the row block of the Q
#: scales and the padding of the quantised Q (quantize_fp8.cu: Q_TILE).
FP8_BLOCK_M = 128
#: Keys per tile of the fp8 forward per (head dim, causal): also the padding of the quantised K and V^T
#: (quantize_fp8.cu: KEY_TILE), split in K scale blocks by `fp8_k_block`. One of FP8_KEY_TILE_CHOICES. 224 keys
#: at D = 128: +0.7% to +4.8% over 128 for the whole call, 4k-16k (H200,
#: benchmarks/results/tuning/2026-12-03-H200-fp8-split.txt); D = 64 not measured wider.
FP8_KEY_TILES: dict[tuple[int, bool], int] = {
    (64, False): 128,
    (64, True): 128,
    (128, False): 224,
    (128, True): 224,
}
#: The key tiles the kernel admits: its WgmmaE4m3 shapes (S, O and P of 224 keys, 112 + 64 + 28 registers, fit the
#: consumers' 232).
FP8_KEY_TILE_CHOICES = (64, 128, 192, 224)
#: Key tile of head dims without an fp8 kernel (only the NumPy emulation runs them).
FP8_DEFAULT_KEY_TILE = 128
#: Most keys per K scale: the quantiser holds a scale block in registers, 128 rows per step (224 keys at D = 128
#: needed 180 of them in scripts/compile_kernels.py's report with the quantiser's earlier 16-lane rows, one
#: block per SM instead of two, and made the quantisation 25% slower; H200,
#: benchmarks/results/tuning/2026-12-03-H200-fp8-wide.txt), so wider key tiles carry several scales.
FP8_K_BLOCK_MAX = 128
#: Keys per line of the quantised V^T ([Sk' / 32][D][32] per head): one k32 step of the fp8 P V.
FP8_V_CHUNK = 32
#: K/V^T pipeline depth of the warp-specialised fp8 forward (a K + V^T stage is 2 * key tile * D bytes).
FP8_STAGES = 3
#: Producer warpgroup + two consumer warpgroups.
FP8_FORWARD_THREADS = 384
#: Target thread blocks per SM of the K/V statistics kernel: it splits each head's keys into pieces of whole steps
#: of FP8_STATS_ROWS keys (STATS_ROWS in quantize_fp8.cu, each step's loads issued at once), about this many per SM
#: in all whatever B * Hkv is. Two blocks (117 registers x 256 threads each) fit on an SM: one wave of blocks that
#: loop over several steps (264 on the H200's 132 SMs) made the quantisation 4.9-6.6% faster than 1024 one-step
#: blocks (benchmarks/results/tuning/2026-12-03-H200-fp8-stats-blocks.txt).
FP8_STATS_BLOCKS_PER_SM = 2
#: Keys per load step of the statistics kernel (STATS_ROWS in quantize_fp8.cu): a split is whole steps.
FP8_STATS_ROWS = 256
#: Threads of every quantisation kernel (QUANT_THREADS in quantize_fp8.cu).
FP8_QUANT_THREADS = 256
FP8_ARCHS = ("90a",)


def fp8_key_tile(head_dim: int, causal: bool) -> int:
    """Keys per tile of the fp8 forward (FP8_KEY_TILES; FP8_DEFAULT_KEY_TILE for head dims without a kernel)."""
    return FP8_KEY_TILES.get((head_dim, causal), FP8_DEFAULT_KEY_TILE)


def fp8_k_block(head_dim: int, causal: bool) -> int:
    """Keys per K scale: the largest part of the key tile of at most FP8_K_BLOCK_MAX keys (the quantiser holds
    a block in one row step of registers) in whole n8 column blocks (the kernel's softmax applies one factor per
    block to its S accumulators). 224 keys: 112. (Every tile is a multiple of 8 keys, so 8 always divides.)"""
    tile = fp8_key_tile(head_dim, causal)
    return max(b for b in range(8, min(tile, FP8_K_BLOCK_MAX) + 1, 8) if tile % b == 0)


def fp8_stats_splits(seqlen_k: int, kv_heads: int, sm_count: int) -> tuple[int, int]:
    """(splits, keys per split) of quantize_fp8_stats for `kv_heads` (B · Hkv) heads of `seqlen_k` keys on a GPU of
    `sm_count` SMs: whole FP8_STATS_ROWS steps per split, as many splits per head as give about
    FP8_STATS_BLOCKS_PER_SM blocks per SM in all (at least one, at most one per step), none of them empty unless
    seqlen_k = 0."""
    blocks = FP8_STATS_BLOCKS_PER_SM * sm_count
    splits = max(1, min(ceil_div(blocks, kv_heads), ceil_div(seqlen_k, FP8_STATS_ROWS)))
    rows = max(FP8_STATS_ROWS, ceil_div(ceil_div(seqlen_k, splits), FP8_STATS_ROWS) * FP8_STATS_ROWS)
    return max(1, ceil_div(seqlen_k, rows)), rows


def fp8_quantize_blocks(head_dim: int, causal: bool, seqlen_q: int, seqlen_k: int, q_heads: int,
                        kv_heads: int) -> int:
    """Blocks of quantize_fp8_qkv, the n = nq + nk + nv its kernel counts (quantize_fp8.cu): Q tiles of
    FP8_BLOCK_M rows for `q_heads` (B · listed heads), K blocks of `fp8_k_block` keys and V blocks of
    16 · FP8_QUANT_THREADS / (D / 8) keys for `kv_heads` (B · Hkv), keys padded to the key tile."""
    keys = ceil_div(seqlen_k, fp8_key_tile(head_dim, causal)) * fp8_key_tile(head_dim, causal)
    v_keys = 16 * FP8_QUANT_THREADS // (head_dim // 8)
    return (query_tiles(seqlen_q, FP8_BLOCK_M, q_heads) + keys // fp8_k_block(head_dim, causal) * kv_heads
            + ceil_div(keys, v_keys) * kv_heads)


def fp8_launches(dtype: str, head_dim: int, causal: bool, rotate: bool = True) -> dict[str, KernelLaunch]:
    """The fp8 forward's kernels by role: "stats" (K/V means and V scales, one pass), "quantize" (Q, K and V^T
    in one launch) and "forward" (block_m = rows per thread block; 1 for the stats kernel, whose grid is per
    key split, and FP8_BLOCK_M for the quantiser's Q tiles); `rotate`: Hadamard rotation of Q and K along
    the head dim in the quantiser. The quantiser pads K and V^T to the forward's key tile and scales K per
    `fp8_k_block`, so both kernels depend on causal through the tile table."""
    t, flag, rot = CUDA_TYPES[dtype], "true" if causal else "false", "true" if rotate else "false"
    block_n, k_block = fp8_key_tile(head_dim, causal), fp8_k_block(head_dim, causal)
    quant = {"threads": FP8_QUANT_THREADS, "smem_bytes": 0, "archs": FP8_ARCHS}
    return {
        "stats": KernelLaunch("quantize_fp8.cu", f"quantize_fp8_stats<{t}, {head_dim}>", block_m=1, **quant),
        "quantize": KernelLaunch("quantize_fp8.cu", f"quantize_fp8_qkv<{t}, {head_dim}, {block_n}, {k_block}, {rot}>",
                                 block_m=FP8_BLOCK_M, **quant),
        "forward": KernelLaunch(
            "attention_fwd_fp8_sm90.cu",
            f"attention_fwd_fp8_sm90<{t}, {head_dim}, {FP8_BLOCK_M}, {block_n}, {block_n // k_block}, {FP8_STAGES}, "
            f"{flag}, true>",
            threads=FP8_FORWARD_THREADS,
            # Q, STAGES K and V^T stages (1 byte per element), the 16-bit output staging tile, 1024 bytes of
            # base alignment and 128 of mbarriers (attention_fwd_fp8_sm90.cu's header).
            smem_bytes=(3 * FP8_BLOCK_M + 2 * FP8_STAGES * block_n) * head_dim + 1024 + 128,
            block_m=FP8_BLOCK_M,
            archs=FP8_ARCHS,
            tma_rows=(FP8_BLOCK_M, block_n, head_dim),  # Q, K, and V^T: 32-key chunks of head_dim rows
        ),
    }


def all_fp8_kernels() -> list[KernelLaunch]:
    """Every distinct fp8 instantiation (a quantiser shared by causal and not, with equal key tiles, appears once)."""
    kernels: dict[str, KernelLaunch] = {}
    for dtype in CUDA_TYPES:
        for head_dim in FP8_HEAD_DIMS:
            for causal in (False, True):
                for rotate in (False, True):
                    for kernel in fp8_launches(dtype, head_dim, causal, rotate).values():
                        kernels.setdefault(kernel.name, kernel)
    return list(kernels.values())


# Hopper backward: attention_bwd_dkdv_sm90.cu, the wgmma dK/dV kernel with dQ by fp32 atomics. It replaces the
# "dkdv_atomic" kernel on sm_90 (deterministic=False); the other backward kernels are shared.


@dataclass(frozen=True)
class BackwardSm90Tile:
    """Tile shape of attention_bwd_dkdv_sm90.cu: 128 resident keys (two 128-thread warpgroups of 64 keys) and
    `block_m` queries per step. dQ is split over the warpgroups by query rows when block_m = 128, else by
    64-column halves of the head dim (so block_m = 64 needs head dim 128)."""

    block_m: int
    block_n: int = 128
    threads: int = 256

    def smem_bytes(self, head_dim: int) -> int:
        """K, V, double-buffered Q and dO (2-byte elements), dS^T, double-buffered lse/delta, and 1024 bytes to
        align the base to the 128-byte swizzle (the formula in attention_bwd_dkdv_sm90.cu's header)."""
        return ((2 * self.block_n + 4 * self.block_m) * head_dim * 2 + self.block_n * self.block_m * 2
                + 4 * self.block_m * 4 + 1024)


#: Hopper dK/dV tiles per head dim. Register budget per thread (255): dK and dV hold head_dim fp32
#: accumulators, S^T and dP^T block_m each: D = 128 takes 64 queries per step, D = 64 takes 128.
BACKWARD_TILES_SM90: dict[int, BackwardSm90Tile] = {
    64: BackwardSm90Tile(128),
    128: BackwardSm90Tile(64),
}


def backward_sm90_launch(dtype: str, head_dim: int, causal: bool) -> KernelLaunch:
    """The Hopper dK/dV(+atomic dQ) kernel for a problem with a head dim in `BACKWARD_TILES_SM90`; same
    arguments and workspace as the "dkdv_atomic" kernel of `backward_launches`."""
    tile = BACKWARD_TILES_SM90[head_dim]
    flag = "true" if causal else "false"
    return KernelLaunch("attention_bwd_dkdv_sm90.cu",
                        f"attention_bwd_dkdv_sm90<{CUDA_TYPES[dtype]}, {head_dim}, {tile.block_m}, {flag}>",
                        tile.threads, tile.smem_bytes(head_dim), tile.block_m, SM90_ARCHS)


# Low-rank forward: cuda_src/lowrank_fwd.cu, one block of LOWRANK_BLOCK positions (lowrank.BLOCK) per thread
# block, its key set (near block, landmarks, sinks) gathered in tiles of as many slots.
LOWRANK_BLOCK = 64
LOWRANK_HEAD_DIMS = (64, 128)


def lowrank_launch(dtype: str, head_dim: int, causal: bool) -> KernelLaunch:
    """The fused low-rank forward for a head dim in `LOWRANK_HEAD_DIMS` (grid: padded / 64 · heads · B blocks).
    Shared memory: the Q tile and one K and one V tile of 16-bit elements, the tile's biases and positions."""
    flag = "true" if causal else "false"
    smem = 3 * LOWRANK_BLOCK * head_dim * 2 + LOWRANK_BLOCK * 8
    return KernelLaunch("lowrank_fwd.cu", f"lowrank_fwd<{CUDA_TYPES[dtype]}, {head_dim}, {flag}>", 128, smem,
                        LOWRANK_BLOCK, SM80_ARCHS)


def landmark_launches(dtype: str) -> tuple[KernelLaunch, KernelLaunch]:
    """The low-rank keys and landmarks (cuda_src/lowrank_landmarks.cu), any head dim: the per-block kernel (grid:
    padded / 64 × heads × B) and the per-segment kernel after it (grid: segments × heads × B), 128 threads, static
    shared memory only."""
    return tuple(KernelLaunch("lowrank_landmarks.cu", f"{name}<{CUDA_TYPES[dtype]}>", 128, 0, LOWRANK_BLOCK,
                              SM80_ARCHS) for name in ("lowrank_block_landmarks", "lowrank_segment_landmarks"))


def all_lowrank_kernels() -> list[KernelLaunch]:
    """Every low-rank forward and landmark instantiation."""
    forwards = [lowrank_launch(dtype, head_dim, causal) for dtype in CUDA_TYPES for head_dim in LOWRANK_HEAD_DIMS
                for causal in (False, True)]
    return forwards + [launch for dtype in CUDA_TYPES for launch in landmark_launches(dtype)]
