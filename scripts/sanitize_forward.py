"""Small-shape matrix of the fused forward kernels, for compute-sanitizer (memcheck / racecheck / synccheck).

Every instantiation — the mma.sync kernel (ADAATTN_FORWARD_KERNEL=sm80) and, on Hopper, the
warp-specialised wgmma kernel (=sm90), whose tile can depend on Sq, and the fp8 kernel with its quantisers
(policy "fp8", choice fp8) — on ragged sizes, GQA and Sq ≠ Sk both ways, plus one batch with more query tiles
than SMs, so that the persistent wgmma kernel's blocks each take several work tiles.
`python3 scripts/sanitize_forward.py [CHOICE ...]` limits the run to some kernel choices (default: all three).
The choice "sm90-sections" runs the wgmma kernel with causal sections of a few (batch, head) pairs (the shapes'
K/V are too small for the default budget to make more than one section), so the batch of 40 ends on a short one.
"""

import os
import sys

import cupy as cp

import adaattn_core as aa
from adaattn_core import cuda_forward, launch_config
from adaattn_core.launch_config import CUDA_TYPES, FORWARD_TILES, FP8_KEY_TILES
from adaattn_core.precision import FP8

#: CAUSAL_SECTION_BYTES for "sm90-sections": 3 pairs per section at D = 64, Sk = 170 (4 · 170 · 64 / 2 bytes a head).
SMALL_SECTION_BYTES = 70_000
DEFAULT_SECTION_BYTES = launch_config.CAUSAL_SECTION_BYTES
# batch, Sq, Sk
SHAPES = [(1, 1, 1), (1, 17, 33), (1, 129, 65), (1, 65, 129), (1, 200, 200), (1, 384, 400), (40, 200, 170)]

calls = fp8_calls = 0
for choice in sys.argv[1:] or ("sm80", "sm90", "fp8"):
    fp8 = choice == "fp8"
    if not fp8:
        os.environ["ADAATTN_FORWARD_KERNEL"] = choice.removesuffix("-sections")
        sections = choice.endswith("-sections")
        launch_config.CAUSAL_SECTION_BYTES = SMALL_SECTION_BYTES if sections else DEFAULT_SECTION_BYTES
        cuda_forward._launch.cache_clear()
    cases = FP8_KEY_TILES if fp8 else FORWARD_TILES
    for dtype in CUDA_TYPES:
        for dim, causal in cases:
            for batch, seq_q, seq_k in SHAPES:
                q = cp.random.standard_normal((batch, 4, seq_q, dim), dtype=cp.float32).astype(dtype)
                k = cp.random.standard_normal((batch, 2, seq_k, dim), dtype=cp.float32).astype(dtype)
                v = cp.random.standard_normal((batch, 2, seq_k, dim), dtype=cp.float32).astype(dtype)
                report = aa.Report()
                aa.attention(q, k, v, causal=causal, report=report, policy="fp8" if fp8 else "exact")
                assert report.backend == "cuda"
                calls += 1
                fp8_calls += any(label.endswith(f"/{FP8}") for label in report.decisions())
cp.cuda.Device().synchronize()
print(f"sanitize_forward: {calls} attention calls done, {fp8_calls} with heads on the fp8 kernel "
      "(whose calls also launch the quantisers)")
