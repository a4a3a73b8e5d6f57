"""List-scheduling model of the causal wgmma forward's work order (notes/forward-tuning.md, session 16).

Work tiles of the paper sweep's causal shapes (B·S = 16k tokens, H·D = 2048) go, in the scheduler's order, to
whichever of 132 SMs frees first; a tile costs its key tiles plus half a key tile of overhead. Prints how much
longer than a perfect split (total work / SMs) the launch runs for one (batch, head) pair per section (the order
before session 16) and for sections of G pairs, longest m-block of each pair of a section first. A model only: no
memory traffic, so it cannot say what the sections cost in L2 (measured: benchmarks/results/tuning/
2026-12-04-H200-fwd-causal-sections.txt).

    python3 scripts/causal_schedule_model.py
"""

from __future__ import annotations

import heapq

from adaattn_core.launch_config import FORWARD_TILES_SM90, ceil_div, sm90_tile

SMS = 132  # the H200's (and the H100 SXM's)
OVERHEAD = 0.5  # key tiles' worth per work tile


def tail(seq: int, head_dim: int, section: int) -> float:
    """Launch time over total work / SMs - 1 for sections of `section` pairs (causal, Sq = Sk = seq)."""
    tile = sm90_tile(head_dim, True, seq)
    pairs = 16384 // seq * (2048 // head_dim)
    m_blocks = ceil_div(seq, tile.block_m)
    cost = [ceil_div(min(seq, (m + 1) * tile.block_m), tile.block_n) + OVERHEAD for m in range(m_blocks)]
    order = [m for first in range(0, pairs, section)
             for m in reversed(range(m_blocks)) for _ in range(first, min(pairs, first + section))]
    free = [0.0] * SMS
    for m in order:
        heapq.heapreplace(free, free[0] + cost[m])
    return max(free) / (sum(cost) * pairs / SMS) - 1


def main() -> None:
    sections = (1, 4, 16, 64, 1 << 20)
    print(f"{'D':>4} {'S':>6} | " + " ".join(f"{'all' if g > 1024 else g:>7}" for g in sections)
          + "   (pairs per section; tail in % of the launch)")
    for head_dim in sorted({d for d, causal in FORWARD_TILES_SM90 if causal}):
        for seq in (1024, 2048, 4096, 8192, 16384):
            print(f"{head_dim:>4} {seq:>6} | " + " ".join(f"{100 * tail(seq, head_dim, g):6.2f}%" for g in sections))


if __name__ == "__main__":
    main()
