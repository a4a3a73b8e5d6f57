"""Estimators behind the rank policy: a sampled-row probe and spectral statistics of a pooled attention map.

Probe (exact, O(m·Sk·D) per head). For m sampled query rows i of every query head (the same rows for all
heads, see `probe_rows`), with s_ij = scale · q_i · k_j over the keys row i may see (bottom-right causal
mask, GQA: head h reads key/value head h // G), one streaming pass with a running max M gives::

    l = Σ_j exp(s_ij − M),  t = Σ_j exp(s_ij − M) · (s_ij − M)
    lse_i = M + log l,      entropy_i = −Σ_j p_ij log p_ij = log l − t / l,      p_ij = exp(s_ij − lse_i)

and from p: the exact output rows out_i = Σ_j p_ij v_j (the rank policy's validation set), the top-k mass
Σ of the k largest p_ij, and the column mass c_j = Σ_i p_ij over the probe rows (a column holding a large
share of every row's mass is an attention sink). On CuPy arrays the probe runs as three Numba CUDA kernels
(`_kernels`); on NumPy arrays as the equivalent NumPy code (`_probe_numpy`). The kernels also run under the
Numba CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``, NumPy arrays) for CI: every cross-thread reduction goes
through shared memory, since the simulator has no warp shuffles.

Pooled map (O((S/b)²·D) per head). Q and K mean-pooled over blocks of b tokens give a small map
A = softmax(scale · Q̄ K̄ᵀ) (causal: key blocks with any visible key). On A (host NumPy, float64, batched
over heads): power iteration (with the randomized SVD's σ₁ as a second lower bound) → spectral norm σ₁;
Hutch++ → ‖A‖_F² = tr(AᵀA) with its standard error; randomized SVD → leading singular values.
stable rank = ‖A‖_F² / σ₁²; energy rank = the fewest singular values holding a target share of ‖A‖_F².
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from functools import cache, lru_cache
from typing import Any

import numpy as np

from . import launch_config
from ._arrays import compute_dtype, library_name, namespace, on_device, to_host64
from .problem import AttentionProblem
from .reference import masked_softmax

#: Threads per probe block; a power of two (tree reductions in shared memory).
THREADS = 128
#: Threads per block of the two kernels that reduce a whole row or head in one block (the row statistics, the head
#: statistics); a power of two. Few blocks (m·B·Hq, Hq) each stream up to Sk keys, so they need many threads in
#: flight: at 128 the statistics kernel was latency-bound, 0.38 ms for 8 rows × 16 heads × 32k keys (not 1024: the
#: head-statistics kernel takes 86 registers, 64 at most fit 1024 threads). Under the simulator, where every thread
#: is a Python thread, THREADS.
REDUCE_THREADS = THREADS if os.environ.get("NUMBA_ENABLE_CUDASIM") == "1" else 512
#: Largest head dim and probe row count the kernels hold in shared memory (32 KiB of query rows).
MAX_D = 256
MAX_ROWS = 32
#: Largest k of the top-k mass the kernels keep per thread.
MAX_TOPK = 8
#: Keys per block of the output kernel (split over keys for parallelism: every probe row of a head shares a block).
KEYS_PER_BLOCK = 256
#: Head-dim columns of the key tile the scores kernel stages in shared memory per step (its rows padded by one
#: float: thread t reads row t, so an odd row stride puts a warp's reads in 32 different banks).
KEY_TILE_D = 16
#: Output elements per thread in the output kernel (thread d owns d, d + THREADS, ...); a literal for Numba.
D_PER_THREAD = MAX_D // THREADS


@dataclass
class ProbeResult:
    """Exact statistics of the m probe rows (the `rows` given to `probe`); arrays on the inputs' device, float32
    (float64 for NumPy float64).

    out:       [B, Hq, m, D] exact attention output of those rows
    lse:       [B, Hq, m] log-sum-exp (−inf for rows that see no key)
    entropy:   [B, Hq, m] −Σ p log p in nats (0 for rows that see no key)
    topk_mass: [B, Hq, m] probability mass of the `topk` largest entries
    col_mass:  [B, Hq, Sk] Σ over probe rows of each key's probability
    """

    out: Any
    lse: Any
    entropy: Any
    topk_mass: Any
    col_mass: Any


def probe_rows(problem: AttentionProblem, count: int, seed: int = 0) -> np.ndarray:
    """min(`count`, eligible rows) distinct query rows (sorted, int64): stratified random rows, plus the last rows
    when causal.

    Causal rows late in the sequence see the most keys (and are where a low-rank far-field is largest), so a
    quarter of the rows (at least one) are the last ones. Causal with Sq >= Sk, the first Sq − Sk + 1 rows see
    fewer than two keys (`AttentionProblem.keys_seen`) and are not eligible when any row sees two: a row's
    normalised entropy H / log(keys seen) says nothing there, and with Sq ≫ Sk most rows see none, which made
    uniform heads look peaked. Raises ValueError for count < 1.
    """
    if count < 1:
        raise ValueError(f"probe_rows: count must be >= 1, got {count}")
    seq = problem.seqlen_q
    first = max(0, seq - problem.seqlen_k + 1) if problem.causal else 0  # row i sees i + Sk − Sq + 1 keys
    first = first if first < seq else 0
    count = min(count, seq - first)
    tail = max(1, count // 4) if problem.causal else 0
    strata = count - tail
    rng = np.random.default_rng(seed)
    edges = np.linspace(first, seq - tail, strata + 1)
    picked = {int(lo + rng.random() * (hi - lo)) for lo, hi in zip(edges[:-1], edges[1:])}
    picked |= set(range(seq - tail, seq))
    # Strata narrower than one row can collide; top up with the first unused rows.
    spare = (i for i in range(first, seq) if i not in picked)
    while len(picked) < count:
        picked.add(next(spare))
    return np.array(sorted(picked), dtype=np.int64)


def probe(
    problem: AttentionProblem, q: Any, k: Any, v: Any, rows: np.ndarray, *, topk: int = 8,
    kernel: bool | None = None,
) -> ProbeResult:
    """Exact statistics of query `rows` for every head (see the module docstring for the formulas).

    Args:
        problem: the validated call; q [B, Hq, Sq, D], k and v [B, Hkv, Sk, D] views (any strides).
        rows: query-row indices from `probe_rows` (at most MAX_ROWS for the kernels).
        topk: k of the top-k mass, 1 <= k <= MAX_TOPK.
        kernel: run the Numba CUDA kernels (default: for CuPy inputs the kernels take, i.e. D <= MAX_D, at most
            MAX_ROWS rows and B · Hq <= MAX_GRID_YZ, their grid.y; else CuPy array operations; True with NumPy
            inputs needs the simulator, NUMBA_ENABLE_CUDASIM=1).

    Raises ValueError for topk or rows out of range, or kernel=True where the kernels do not take the problem.
    """
    if not 1 <= topk <= MAX_TOPK:
        raise ValueError(f"topk must be in [1, {MAX_TOPK}], got {topk}")
    if len(rows) == 0 or rows.min() < 0 or rows.max() >= problem.seqlen_q:
        got = f"{len(rows)} rows in [{rows.min()}, {rows.max()}]" if len(rows) else "no rows"
        raise ValueError(f"rows must be non-empty indices in [0, {problem.seqlen_q}), got {got}")
    fits = (problem.head_dim <= MAX_D and len(rows) <= MAX_ROWS
            and problem.batch * problem.heads_q <= launch_config.MAX_GRID_YZ)
    use_kernel = (problem.library == "cupy" and fits) if kernel is None else kernel
    if use_kernel and not fits:
        raise ValueError(f"the probe kernels take D <= {MAX_D}, <= {MAX_ROWS} rows and B * Hq <= "
                         f"{launch_config.MAX_GRID_YZ}, got D = {problem.head_dim}, {len(rows)} rows and B * Hq = "
                         f"{problem.batch * problem.heads_q}")
    if use_kernel:
        return _probe_cuda(problem, q, k, v, rows, topk)
    return _probe_numpy(problem, q, k, v, rows, topk)


# --------------------------------------------------------------------------------------------------------------
# Probe: NumPy


def _probe_numpy(problem: AttentionProblem, q: Any, k: Any, v: Any, rows: np.ndarray, topk: int) -> ProbeResult:
    """The probe with array operations of the inputs' library (NumPy, or CuPy where the kernels are not taken);
    one query head at a time."""
    xp = namespace(problem.library)
    ctype = compute_dtype(problem.dtype).type
    B, Hq, G, Sk = problem.batch, problem.heads_q, problem.group_size, problem.seqlen_k
    m = len(rows)
    limits = on_device(xp, problem.keys_seen(rows))
    visible = xp.arange(Sk)[None, :] < limits[:, None]  # [m, Sk]
    out = xp.zeros((B, Hq, m, problem.head_dim), dtype=ctype)
    lse, entropy, topk_mass = (xp.zeros((B, Hq, m), dtype=ctype) for _ in range(3))
    col_mass = xp.zeros((B, Hq, Sk), dtype=ctype)
    for h in range(Hq):
        kh = k[:, h // G].astype(ctype)
        vh = v[:, h // G].astype(ctype)
        scores = (q[:, h, rows].astype(ctype) @ kh.swapaxes(-1, -2)) * ctype(problem.scale)  # [B, m, Sk]
        scores = xp.where(visible, scores, -xp.inf)
        row_max = scores.max(axis=-1, keepdims=True) if Sk else xp.full((B, m, 1), -xp.inf, dtype=ctype)
        shift = xp.where(xp.isneginf(row_max), 0, row_max)
        weights = xp.exp(scores - shift)
        total = weights.sum(axis=-1)
        seen = total > 0
        safe = xp.where(seen, total, 1)
        # t = Σ exp(s − M)(s − M): masked entries have weight 0 and a −inf difference; count them as 0.
        tilt = (weights * xp.where(visible, scores - shift, 0)).sum(axis=-1)
        probs = weights / safe[..., None]
        out[:, h] = probs @ vh
        lse[:, h] = xp.where(seen, shift[..., 0] + xp.log(safe), -xp.inf)
        entropy[:, h] = xp.where(seen, xp.log(safe) - tilt / safe, 0)
        top = -xp.sort(-probs, axis=-1)[..., :topk] if Sk else xp.zeros((B, m, 0), dtype=ctype)
        topk_mass[:, h] = top.sum(axis=-1)
        col_mass[:, h] = probs.sum(axis=1)
    return ProbeResult(out, lse, entropy, topk_mass, col_mass)


# --------------------------------------------------------------------------------------------------------------
# Probe: Numba CUDA kernels


#: `numba.cuda`, bound by `_numba_cuda` on first use. A module global (not a local) because the CUDA
#: simulator swaps in its own module only through the kernels' globals.
cuda: Any = None


def _numba_cuda() -> Any:
    """`numba.cuda`, imported on first use (importing the core must not import numba-cuda).

    NumPy >= 2.5 shim, the only one in the project: numba-cuda 0.30 (maintenance mode) still calls
    `numpy.row_stack`, removed in NumPy 2.5 (NVIDIA/numba-cuda#907, will not be fixed upstream). It is
    an alias of `numpy.vstack`; restoring the alias before any kernel compiles makes the kernels work.
    Delete this when numba-cuda stops calling it.
    """
    global cuda
    if cuda is None:
        if not hasattr(np, "row_stack"):
            np.row_stack = np.vstack
        from numba import cuda as numba_cuda

        cuda = numba_cuda
    return cuda


@cache
def _kernels(bfloat16: bool, rows: int) -> tuple[Any, Any, Any]:
    """(scores, row statistics, output) kernels, compiled lazily by Numba; `bfloat16`: k and v arrive as the
    uint16 bit patterns of bfloat16 (Numba has no bfloat16 type) and are decoded in registers. `rows`, the probe
    row count m, is a compile-time constant of the scores and output kernels: their loops over the rows unroll,
    so the per-row accumulators live in registers (a local array indexed at run time lives in local memory)."""
    _numba_cuda()
    from numba import float32, int64

    @cuda.jit(device=True, inline=True)
    def to_f32(x: Any) -> Any:
        return float32(x)

    @cuda.jit(device=True, inline=True)
    def bf16_to_f32(bits: Any) -> Any:
        # bfloat16 = sign | 8-bit exponent | 7-bit mantissa; value = (128 + mantissa) · 2^(exponent − 134) for
        # normal numbers, mantissa · 2^−133 for subnormals. Arithmetic decoding (no bit casts) so that the
        # simulator, which has no libdevice, runs it too. Inf/NaN never reach attention inputs we accept.
        b = int64(bits)
        exponent = (b >> 7) & 0xFF
        mantissa = b & 0x7F
        if exponent == 0:
            value = math.ldexp(float32(mantissa), -133)
        else:
            value = math.ldexp(float32(mantissa + 128), int(exponent - 134))
        return float32(-value if b & 0x8000 else value)

    load = bf16_to_f32 if bfloat16 else to_f32
    key_tile_row = KEY_TILE_D + 1  # a shared-memory shape must be a constant, not an expression

    @cuda.jit
    def scores_kernel(q_rows: Any, limits: Any, k: Any, scale: float, group: int, scores: Any) -> None:
        """scores[b, h, r, j] = scale · q_rows[b, h, r] · k[b, h // group, j] (−inf where j >= limits[r]).

        Launch: grid (ceil(Sk / THREADS), B·Hq), THREADS threads; thread = one key, all m = `rows` rows of the
        head. The block's THREADS keys go through shared memory KEY_TILE_D columns at a time, loaded by all
        threads along the rows (neighbouring threads read neighbouring elements: a thread reading its own key row
        would touch 32 rows per warp load) and decoded once. The m query rows sit in shared memory and are read
        by all threads at the same address (a broadcast, no bank conflicts).
        """
        tid = cuda.threadIdx.x
        key0 = cuda.blockIdx.x * THREADS
        n_heads = q_rows.shape[1]
        b = cuda.blockIdx.y // n_heads
        h = cuda.blockIdx.y % n_heads
        dim, seq_k = q_rows.shape[3], k.shape[2]
        k_head = k[b, h // group]  # a view: the address arithmetic once, not per element
        q_sh = cuda.shared.array((rows, MAX_D), float32)
        k_sh = cuda.shared.array((THREADS, key_tile_row), float32)
        for idx in range(tid, rows * dim, THREADS):
            q_sh[idx // dim, idx % dim] = q_rows[b, h, idx // dim, idx % dim]
        acc = cuda.local.array(rows, float32)
        for r in range(rows):
            acc[r] = 0.0
        for d0 in range(0, dim, KEY_TILE_D):
            cuda.syncthreads()  # q_sh written, or the previous tile read by every thread
            for idx in range(tid, THREADS * KEY_TILE_D, THREADS):
                key, dd = idx // KEY_TILE_D, idx % KEY_TILE_D
                value = float32(0.0)
                if key0 + key < seq_k and d0 + dd < dim:
                    value = load(k_head[key0 + key, d0 + dd])
                k_sh[key, dd] = value
            cuda.syncthreads()
            for dd in range(min(KEY_TILE_D, dim - d0)):
                kd = k_sh[tid, dd]
                for r in range(rows):
                    acc[r] += q_sh[r, d0 + dd] * kd
        j = key0 + tid
        if j < seq_k:
            for r in range(rows):
                scores[b, h, r, j] = acc[r] * scale if j < limits[r] else -math.inf

    @cuda.jit(device=True, inline=True)
    def rescaled(l_val: float, t_val: float, m_old: float, m_new: float) -> tuple[float, float]:
        """(l, t) of one softmax state moved from max m_old to m_new >= m_old (t gains (m_old − m_new)·l)."""
        if l_val == 0.0:
            return float32(0.0), float32(0.0)
        alpha = math.exp(m_old - m_new)
        return float32(alpha * l_val), float32(alpha * (t_val + (m_old - m_new) * l_val))

    @cuda.jit
    def stats_kernel(scores: Any, topk: int, lse: Any, entropy: Any, topk_mass: Any) -> None:
        """lse, entropy and top-k mass of probe row r = blockIdx.x of head (b, h) = divmod(blockIdx.y, Hq).

        Launch: grid (m, B·Hq), REDUCE_THREADS threads. Each thread streams its keys j ≡ tid (mod
        REDUCE_THREADS) of the row's scores with a running max (m, l, t) and a descending top-k list; states and
        lists merge pairwise in a shared-memory tree.
        """
        tid = cuda.threadIdx.x
        r = cuda.blockIdx.x
        n_heads = scores.shape[1]
        b = cuda.blockIdx.y // n_heads
        h = cuda.blockIdx.y % n_heads
        seq_k = scores.shape[3]
        sh_m = cuda.shared.array(REDUCE_THREADS, float32)
        sh_l = cuda.shared.array(REDUCE_THREADS, float32)
        sh_t = cuda.shared.array(REDUCE_THREADS, float32)
        sh_top = cuda.shared.array((REDUCE_THREADS, MAX_TOPK), float32)

        run_m, run_l, run_t = float32(-math.inf), float32(0.0), float32(0.0)
        top = cuda.local.array(MAX_TOPK, float32)
        for i in range(topk):
            top[i] = -math.inf
        for j in range(tid, seq_k, REDUCE_THREADS):
            s = scores[b, h, r, j]
            if s == -math.inf:
                continue
            if s > run_m:
                run_l, run_t = rescaled(run_l, run_t, run_m, s)
                run_m = s
            e = math.exp(s - run_m)
            run_l += e
            run_t += e * (s - run_m)
            if s > top[topk - 1]:  # insertion into the descending list
                i = topk - 1
                while i > 0 and top[i - 1] < s:
                    top[i] = top[i - 1]
                    i -= 1
                top[i] = s
        sh_m[tid], sh_l[tid], sh_t[tid] = run_m, run_l, run_t
        for i in range(topk):
            sh_top[tid, i] = top[i]
        cuda.syncthreads()

        # Tree merge, log2(REDUCE_THREADS) steps: the (m, l, t) states, and the two descending top-k lists
        # into their top k (a + c = i < topk picks so far, so neither index leaves its list).
        stride = REDUCE_THREADS // 2
        while stride > 0:
            if tid < stride:
                m_a, m_b = sh_m[tid], sh_m[tid + stride]
                m_new = max(m_a, m_b)
                if m_new > -math.inf:
                    l_a, t_a = rescaled(sh_l[tid], sh_t[tid], m_a, m_new)
                    l_b, t_b = rescaled(sh_l[tid + stride], sh_t[tid + stride], m_b, m_new)
                    sh_m[tid], sh_l[tid], sh_t[tid] = m_new, l_a + l_b, t_a + t_b
                a, c = 0, 0
                for i in range(topk):
                    x, y = sh_top[tid, a], sh_top[tid + stride, c]
                    if x >= y:
                        top[i] = x
                        a += 1
                    else:
                        top[i] = y
                        c += 1
                for i in range(topk):
                    sh_top[tid, i] = top[i]
            cuda.syncthreads()
            stride //= 2
        row_m, row_l, row_t = sh_m[0], sh_l[0], sh_t[0]

        if tid == 0:
            mass = float32(0.0)
            for i in range(topk):
                if sh_top[0, i] > -math.inf:
                    mass += math.exp(sh_top[0, i] - row_m) / row_l
            topk_mass[b, h, r] = mass
            if row_l > 0.0:
                lse[b, h, r] = row_m + math.log(row_l)
                entropy[b, h, r] = math.log(row_l) - row_t / row_l
            else:
                lse[b, h, r] = -math.inf
                entropy[b, h, r] = 0.0

    @cuda.jit
    def output_kernel(scores: Any, lse: Any, v: Any, group: int, out: Any, col_mass: Any) -> None:
        """out[b, h, r] += Σ_j p_rj v[j] for every probe row r and col_mass[b, h, j] += Σ_r p_rj over one chunk
        of KEYS_PER_BLOCK keys, p_rj = exp(s_rj − lse_r) (0 for a row with no visible key: lse_r = −inf).

        Launch: grid (ceil(Sk / KEYS_PER_BLOCK), B·Hq), THREADS threads: split over keys so that the chunks give
        enough blocks; partial rows are summed by float32 atomics into the zeroed `out`. Per step of THREADS keys,
        the m = `rows` rows' p go to shared memory (one col_mass atomic per key), then thread d accumulates all m
        rows for d ≡ tid (mod THREADS): each v element is read (coalesced) and decoded once for all rows.
        """
        tid = cuda.threadIdx.x
        n_heads = scores.shape[1]
        b = cuda.blockIdx.y // n_heads
        h = cuda.blockIdx.y % n_heads
        seq_k, dim = scores.shape[3], v.shape[3]
        v_head = v[b, h // group]  # a view: the address arithmetic once, not per element
        sh_p = cuda.shared.array((MAX_ROWS, THREADS), float32)
        acc = cuda.local.array((D_PER_THREAD, rows), float32)
        for i in range(D_PER_THREAD):
            for r in range(rows):
                acc[i, r] = 0.0
        first = cuda.blockIdx.x * KEYS_PER_BLOCK
        last = min(first + KEYS_PER_BLOCK, seq_k)
        for j0 in range(first, last, THREADS):
            j = j0 + tid
            mass = float32(0.0)
            for r in range(rows):
                p = float32(0.0)
                row_lse = lse[b, h, r]
                if j < last and row_lse > -math.inf:
                    p = math.exp(scores[b, h, r, j] - row_lse)
                sh_p[r, tid] = p
                mass += p
            if j < last:
                cuda.atomic.add(col_mass, (b, h, j), mass)
            cuda.syncthreads()
            for i in range(D_PER_THREAD):
                d = tid + i * THREADS
                if d < dim:
                    for jj in range(min(THREADS, last - j0)):
                        vd = load(v_head[j0 + jj, d])
                        for r in range(rows):
                            acc[i, r] += sh_p[r, jj] * vd
            cuda.syncthreads()
        for i in range(D_PER_THREAD):
            d = tid + i * THREADS
            if d < dim:
                for r in range(rows):
                    cuda.atomic.add(out, (b, h, r, d), acc[i, r])

    return scores_kernel, stats_kernel, output_kernel


def _probe_cuda(problem: AttentionProblem, q: Any, k: Any, v: Any, rows: np.ndarray, topk: int) -> ProbeResult:
    """The probe as three Numba CUDA kernels on CuPy arrays (or NumPy arrays under the simulator).

    The kernels run on CuPy's current stream (`_launch`). Intermediate: the probe rows' scores, [B, Hq, m, Sk] float32.
    """
    _numba_cuda()
    xp = namespace(problem.library)
    B, Hq, Sk, m = problem.batch, problem.heads_q, problem.seqlen_k, len(rows)
    bf16 = problem.dtype == "bfloat16"
    k_in, v_in = (x.view(xp.uint16) if bf16 else x for x in (k, v))
    q_rows = xp.ascontiguousarray(q[:, :, on_device(xp, rows)].astype(xp.float32))
    limits = on_device(xp, problem.keys_seen(rows))
    scores = xp.empty((B, Hq, m, Sk), dtype=xp.float32)
    out = xp.zeros((B, Hq, m, problem.head_dim), dtype=xp.float32)
    lse, entropy, topk_mass = (xp.empty((B, Hq, m), dtype=xp.float32) for _ in range(3))
    col_mass = xp.zeros((B, Hq, Sk), dtype=xp.float32)
    scores_kernel, stats_kernel, output_kernel = _kernels(bf16, m)
    if Sk > 0:
        _launch(scores_kernel, ((Sk + THREADS - 1) // THREADS, B * Hq), THREADS,
                q_rows, limits, k_in, np.float32(problem.scale), problem.group_size, scores)
    # With no key: lse = −inf, entropy = top-k mass = 0 from the statistics kernel alone.
    _launch(stats_kernel, (m, B * Hq), REDUCE_THREADS, scores, topk, lse, entropy, topk_mass)
    if Sk > 0:
        _launch(output_kernel, ((Sk + KEYS_PER_BLOCK - 1) // KEYS_PER_BLOCK, B * Hq), THREADS,
                scores, lse, v_in, problem.group_size, out, col_mass)
    return ProbeResult(out, lse, entropy, topk_mass, col_mass)


def _launch(kernel: Any, grid: tuple[int, ...] | int, block: int, *args: Any) -> None:
    """Launch a Numba kernel on CuPy arrays, on CuPy's current stream, or on NumPy arrays (the simulator).

    A CuPy array reaches Numba as its __cuda_array_interface__ without the "stream" entry: the kernel runs on
    that very stream, so there is nothing to synchronise, and with the entry Numba would block the host on the
    stream at every launch. Numba reads the interface itself; `cuda.as_cuda_array(a, sync=False)` instead
    costs ~40 µs of host time per array. The Numba stream and the launch configuration are kept per launch shape
    and stream (`_configured`): made at every launch they cost another ~115 µs
    (benchmarks/results/logs/2026-12-04-H200-numba-launch-overhead-s15.txt).
    """
    on_cupy = [library_name(a) == "cupy" for a in args]
    if any(on_cupy):
        _configured(kernel, grid, block, _cupy_stream())(*(_SameStream(a) if gpu else a
                                                           for a, gpu in zip(args, on_cupy)))
    else:
        kernel[grid, block](*args)


@lru_cache(maxsize=256)
def _configured(kernel: Any, grid: tuple[int, ...] | int, block: int, stream: Any) -> Any:
    """`kernel[grid, block, stream]`, kept (`stream`: one of `_cupy_stream`'s kept Numba streams): making it checks
    the grid and, for grids under 128 blocks, formats Numba's low-occupancy warning at every launch."""
    return kernel[grid, block, stream]


def _cupy_stream() -> Any:
    """CuPy's current stream as a Numba stream, the same object for the same device and stream."""
    import cupy

    return _numba_stream(cupy.cuda.runtime.getDevice(), cupy.cuda.get_current_stream().ptr)


@lru_cache(maxsize=64)
def _numba_stream(device: int, stream_ptr: int) -> Any:
    """CuPy's stream `stream_ptr` of `device` as a Numba stream (the legacy default stream for the null stream, which
    `device` tells apart). Numba only wraps an external stream's handle (no ownership), so keeping it is safe."""
    return cuda.external_stream(stream_ptr) if stream_ptr else cuda.default_stream()


class _SameStream:
    """A CuPy array's __cuda_array_interface__ with "stream" dropped (CAI v3: no synchronisation needed), for a
    consumer that works on the producer's stream. Holds the array: the interface alone does not keep it alive."""

    __slots__ = ("__cuda_array_interface__", "array")

    def __init__(self, array: Any) -> None:
        interface = dict(array.__cuda_array_interface__)
        interface.pop("stream", None)
        self.__cuda_array_interface__ = interface
        self.array = array


# --------------------------------------------------------------------------------------------------------------
# Per-head reduction of the probe


#: Most sink candidates per head the head-statistics kernel keeps (more: the array path).
MAX_SINK_SLOTS = 16


def head_statistics(probe: ProbeResult, limits: np.ndarray, sink_threshold: float, sink_share: float, count: int,
                    *, kernel: bool | None = None) -> tuple[Any, Any]:
    """The probe reduced per query head, on its device (no transfer): ([Hq, 4 + 2c] float64 statistics,
    [Hq, c] int64 sink table), c = `count`.

    Statistics: (mean over the probe rows and batch of the normalised entropy H / log(keys the row sees), mean
    entropy, mean top-k mass, dominant-sink mass, then the c largest column shares in descending order, then their
    key indices with −1 where the share is below `sink_threshold`: the sinks, a prefix since the shares descend).
    A key's share is the max over the batch of its column mass divided by the probe rows that see some key; the c
    keys come from c rounds of argmax (ties: the lowest index). Dominant-sink mass: the summed share of those of
    the c keys holding >= `sink_share`. The sink table is the last c columns as int64.

    `limits`: [m] host ints, the keys each probe row sees (`AttentionProblem.keys_seen`). `kernel`: one Numba
    CUDA launch (default: for CuPy arrays when c <= MAX_SINK_SLOTS; True with NumPy arrays needs the simulator),
    else ~4·c + 13 array operations. Raises ValueError for c > MAX_SINK_SLOTS with the kernel, c > Sk, or
    `limits` not of the probe's row count.
    """
    seq_k, rows = probe.col_mass.shape[2], probe.entropy.shape[2]
    if len(limits) != rows:
        raise ValueError(f"limits must have one entry per probe row ({rows}), got {len(limits)}")
    if not 0 <= count <= seq_k:
        raise ValueError(f"count must be in [0, {seq_k}] (the keys), got {count}")
    use_kernel = (library_name(probe.col_mass) == "cupy" and count <= MAX_SINK_SLOTS) if kernel is None else kernel
    if use_kernel and count > MAX_SINK_SLOTS:
        raise ValueError(f"the head-statistics kernel keeps at most {MAX_SINK_SLOTS} sinks, got count = {count}")
    log_seen = np.maximum(np.log(np.clip(limits, 1, None)), 1e-12)  # a row that sees one key: H = 0 anyway
    rows_seen = max(1, int((np.asarray(limits) > 0).sum()))
    backend = _head_statistics_cuda if use_kernel else _head_statistics_arrays
    return backend(probe, log_seen, rows_seen, sink_threshold, sink_share, count)


def _head_statistics_arrays(probe: ProbeResult, log_seen: np.ndarray, rows_seen: int, sink_threshold: float,
                            sink_share: float, count: int) -> tuple[Any, Any]:
    """`head_statistics` with array operations of the probe's library."""
    xp = namespace(library_name(probe.col_mass))
    heads, seq_k = probe.col_mass.shape[1], probe.col_mass.shape[2]
    ratio = (probe.entropy / on_device(xp, log_seen)).mean(axis=(0, 2))
    share = probe.col_mass.max(axis=0) / rows_seen  # [Hq, Sk], a new array: picked keys are overwritten
    flat, row_start = share.reshape(-1), on_device(xp, np.arange(heads) * seq_k)
    top_share, top_key = [], []
    for _ in range(count):  # c rounds of argmax: no sort of [Hq, Sk]
        key = share.argmax(axis=-1)
        at = key + row_start
        top_share.append(flat[at])
        top_key.append(key)
        flat[at] = -1
    tops = xp.stack(top_share, axis=1) if count else xp.zeros((heads, 0), dtype=share.dtype)
    keys = xp.stack(top_key, axis=1) if count else xp.zeros((heads, 0), dtype=xp.int64)
    sink_keys = xp.where(tops >= sink_threshold, keys, -1)
    dominant = xp.where(tops >= sink_share, tops, 0).sum(axis=1)
    columns = [ratio, probe.entropy.mean(axis=(0, 2)), probe.topk_mass.mean(axis=(0, 2)), dominant]
    stats = xp.concatenate([*(c[:, None] for c in columns), tops, sink_keys], axis=1, dtype=xp.float64)
    return stats, sink_keys


@cache
def _head_statistics_kernel() -> Any:
    """The head-statistics kernel (`head_statistics`), compiled lazily by Numba."""
    _numba_cuda()
    from numba import float32, float64, int64

    @cuda.jit
    def head_stats_kernel(entropy: Any, topk_mass: Any, col_mass: Any, log_seen: Any, rows_seen: float,
                          sink_threshold: float, sink_share: float, count: int, stats: Any, sink_keys: Any) -> None:
        """stats[h] and sink_keys[h] of `head_statistics` for head h = blockIdx.x.

        Launch: grid (Hq,), REDUCE_THREADS threads. The means: each thread sums its (batch, row) pairs, then a tree in
        shared memory. The shares: per round each thread scans its keys j ≡ tid (mod REDUCE_THREADS) for the largest
        share not yet picked (ascending j and a strict >, so its first one), then a tree keeps the larger share
        or, on a tie, the lower key; keys picked in earlier rounds sit in shared memory.
        """
        tid = cuda.threadIdx.x
        h = cuda.blockIdx.x
        batch, m, seq_k = entropy.shape[0], entropy.shape[2], col_mass.shape[2]
        sh_a = cuda.shared.array(REDUCE_THREADS, float64)
        sh_b = cuda.shared.array(REDUCE_THREADS, float64)
        sh_c = cuda.shared.array(REDUCE_THREADS, float64)
        sh_key = cuda.shared.array(REDUCE_THREADS, int64)
        picked = cuda.shared.array(MAX_SINK_SLOTS, int64)

        ratio, ent, top = float64(0.0), float64(0.0), float64(0.0)
        for idx in range(tid, batch * m, REDUCE_THREADS):
            b, r = idx // m, idx % m
            e = float64(entropy[b, h, r])
            ratio += e / log_seen[r]
            ent += e
            top += float64(topk_mass[b, h, r])
        sh_a[tid], sh_b[tid], sh_c[tid] = ratio, ent, top
        cuda.syncthreads()
        stride = REDUCE_THREADS // 2
        while stride > 0:
            if tid < stride:
                sh_a[tid] += sh_a[tid + stride]
                sh_b[tid] += sh_b[tid + stride]
                sh_c[tid] += sh_c[tid + stride]
            cuda.syncthreads()
            stride //= 2
        if tid == 0:
            rows_total = float64(batch * m)
            stats[h, 0] = sh_a[0] / rows_total
            stats[h, 1] = sh_b[0] / rows_total
            stats[h, 2] = sh_c[0] / rows_total
        cuda.syncthreads()  # sh_a is reused below

        dominant = float64(0.0)
        for s in range(count):
            best, best_key = float32(-1.0), int64(-1)
            for j in range(tid, seq_k, REDUCE_THREADS):
                taken = False
                for u in range(s):
                    if picked[u] == j:
                        taken = True
                if not taken:
                    value = col_mass[0, h, j]
                    for b in range(1, batch):
                        value = max(value, col_mass[b, h, j])
                    value = value / float32(rows_seen)
                    if value > best:
                        best, best_key = value, j
            sh_a[tid], sh_key[tid] = best, best_key
            cuda.syncthreads()
            stride = REDUCE_THREADS // 2
            while stride > 0:
                if tid < stride:
                    other, other_key = sh_a[tid + stride], sh_key[tid + stride]
                    if other > sh_a[tid] or (other == sh_a[tid] and 0 <= other_key < sh_key[tid]):
                        sh_a[tid], sh_key[tid] = other, other_key
                cuda.syncthreads()
                stride //= 2
            if tid == 0:
                share, key = sh_a[0], sh_key[0]
                picked[s] = key
                if share >= sink_share:
                    dominant += share
                stats[h, 4 + s] = share
                sink = key if share >= sink_threshold else -1
                stats[h, 4 + count + s] = float64(sink)
                sink_keys[h, s] = sink
            cuda.syncthreads()
        if tid == 0:
            stats[h, 3] = dominant

    return head_stats_kernel


def _head_statistics_cuda(probe: ProbeResult, log_seen: np.ndarray, rows_seen: int, sink_threshold: float,
                          sink_share: float, count: int) -> tuple[Any, Any]:
    """`head_statistics` as one Numba CUDA launch on CuPy arrays (or NumPy arrays under the simulator)."""
    kernel = _head_statistics_kernel()
    library = library_name(probe.col_mass)
    xp = namespace(library)
    heads = probe.col_mass.shape[1]
    stats = xp.empty((heads, 4 + 2 * count), dtype=xp.float64)
    sink_keys = xp.empty((heads, count), dtype=xp.int64)
    args = (probe.entropy, probe.topk_mass, probe.col_mass, on_device(xp, log_seen, np.float64),
            float(rows_seen), float(sink_threshold), float(sink_share), count, stats, sink_keys)
    _launch(kernel, heads, REDUCE_THREADS, *args)
    return stats, sink_keys


# --------------------------------------------------------------------------------------------------------------
# Pooled block map and its spectrum


def pooled_map(problem: AttentionProblem, q: Any, k: Any, block: int) -> np.ndarray:
    """A = softmax(scale · Q̄ K̄ᵀ) per query head, [B·Hq, ceil(Sq/b), ceil(Sk/b)] float64 on the host.

    Q̄, K̄: means over blocks of `block` tokens (the last block over what remains). Causal: key block c is
    kept for query block i when some key of c is visible to some row of i. Rows of query blocks that see
    no key are 0. Computed on the inputs' device (float32), returned as host float64.
    Raises ValueError for block < 1.
    """
    if block < 1:
        raise ValueError(f"block must be >= 1, got {block}")
    xp = namespace(problem.library)
    ctype = compute_dtype(problem.dtype).type

    def pooled(x: Any, seq: int) -> Any:
        # Sums in ctype straight from the input (splitting the S axis is a view for any strides): no
        # converted copy of Q or K is made, so the map costs one read of each.
        full, rest = divmod(seq, block)
        parts = []
        if full:
            blocks = x[:, :, : full * block].reshape(*x.shape[:2], full, block, x.shape[3])
            parts.append(blocks.sum(axis=3, dtype=ctype) / ctype(block))
        if rest:
            parts.append(x[:, :, full * block:].sum(axis=2, keepdims=True, dtype=ctype) / ctype(rest))
        return xp.concatenate(parts, axis=2)

    q_bar = pooled(q, problem.seqlen_q)
    k_bar = xp.repeat(pooled(k, problem.seqlen_k), problem.group_size, axis=1)
    scores = (q_bar @ k_bar.swapaxes(-1, -2)) * ctype(problem.scale)
    visible = None
    if problem.causal:  # key block c for query block i: its first key seen by the block's last row
        last_row = xp.minimum(block * (xp.arange(q_bar.shape[2]) + 1), problem.seqlen_q) - 1
        visible = problem.visible(last_row, block * xp.arange(k_bar.shape[2]))
    probs, _ = masked_softmax(xp, scores, visible, with_lse=False)
    return to_host64(probs).reshape(-1, *probs.shape[2:])


def power_iteration(a: np.ndarray, iters: int, rng: np.random.Generator) -> np.ndarray:
    """σ₁ of each matrix of `a` [N, r, c]: `iters` steps of x ← AᵀA x / ‖AᵀA x‖ from a random start, σ₁ = ‖A x‖.

    Converges like (σ₂/σ₁)^(2·iters) in the Rayleigh quotient and never overestimates σ₁.
    """
    x = rng.standard_normal((a.shape[0], a.shape[2]))
    x /= np.linalg.norm(x, axis=-1, keepdims=True)
    for _ in range(iters):
        y = np.einsum("nrc,nr->nc", a, np.einsum("nrc,nc->nr", a, x))
        norm = np.linalg.norm(y, axis=-1, keepdims=True)
        x = np.where(norm > 0, y / np.where(norm > 0, norm, 1), x)
    return np.linalg.norm(np.einsum("nrc,nc->nr", a, x), axis=-1)


def hutchpp_frobenius(a: np.ndarray, samples: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """(estimate, standard error) of ‖A‖_F² = tr(AᵀA) per matrix of `a` [N, r, c] by Hutch++ (Meyer et al. 2021).

    A third of the `samples` (>= 6) matrix-vector products sketch the top right subspace, Q = orth(AᵀA S),
    whose share ‖A Q‖_F² is exact; the other two thirds estimate the rest by Hutchinson with Rademacher
    z projected off Q: E‖A (I − QQᵀ) z‖² = ‖A (I − QQᵀ)‖_F². The standard error is the empirical one of
    those draws, sqrt(var / draws); it is small when A is close to rank samples/3, as attention maps are.
    """
    if samples < 6:
        raise ValueError(f"samples must be >= 6, got {samples}")
    sketch = samples // 3
    draws = samples - sketch
    basis, _ = np.linalg.qr(np.ascontiguousarray(a.swapaxes(-1, -2)) @ (a @ rng.standard_normal((a.shape[2], sketch))))
    head = np.einsum("nrk,nrk->n", a @ basis, a @ basis)
    z = rng.choice(np.array([-1.0, 1.0]), size=(a.shape[0], a.shape[2], draws))
    z = z - basis @ (np.ascontiguousarray(basis.swapaxes(-1, -2)) @ z)
    tail = ((a @ z) ** 2).sum(axis=1)  # [N, draws]
    return head + tail.mean(axis=-1), tail.std(axis=-1, ddof=1) / math.sqrt(draws)


def randomized_singular_values(a: np.ndarray, rank: int, rng: np.random.Generator, *, oversample: int = 8,
                               power_iters: int = 2) -> np.ndarray:
    """Leading `rank` singular values of each matrix of `a` [N, r, c] by randomized SVD (Halko et al. 2011).

    Range finder Y = (AAᵀ)^q A Ω with Ω Gaussian [c, rank + oversample], re-orthonormalised by QR after every
    product; then the exact SVD of the small Qᵀ A. Returns [N, min(rank, r, c)], descending.
    """
    width = min(rank + oversample, *a.shape[1:])
    a_t = np.ascontiguousarray(a.swapaxes(-1, -2))  # stacked matmul takes the BLAS path on contiguous operands
    basis, _ = np.linalg.qr(a @ rng.standard_normal((a.shape[2], width)))
    for _ in range(power_iters):
        basis, _ = np.linalg.qr(a_t @ basis)
        basis, _ = np.linalg.qr(a @ basis)
    values = np.linalg.svd(np.ascontiguousarray(basis.swapaxes(-1, -2)) @ a, compute_uv=False)
    return values[:, : min(rank, *a.shape[1:])]


@dataclass
class Spectrum:
    """Spectral estimates of the pooled maps, one entry per head (host NumPy, float64).

    spectral_norm: σ₁ (the larger of power iteration and the randomized SVD's first value);
    frobenius_sq / frobenius_sq_se: ‖A‖_F² (Hutch++) and its standard error;
    stable_rank: ‖A‖_F² / σ₁² (>= 1);
    energy_rank: fewest leading singular values (of the randomized SVD) whose squares reach `energy` · ‖A‖_F²
    (the SVD's width + 1 when they do not).
    """

    spectral_norm: np.ndarray
    frobenius_sq: np.ndarray
    frobenius_sq_se: np.ndarray
    stable_rank: np.ndarray
    energy_rank: np.ndarray


def spectrum(a: np.ndarray, *, energy: float = 0.95, max_rank: int = 32, seed: int = 0, power_iters: int = 30,
             samples: int = 64) -> Spectrum:
    """Spectral estimates of maps `a` [N, r, c] (see `Spectrum`). Raises ValueError for energy outside (0, 1] or
    max_rank < 1 (checked before any work)."""
    if not 0 < energy <= 1:
        raise ValueError(f"energy must be in (0, 1], got {energy}")
    if max_rank < 1:
        raise ValueError(f"max_rank must be >= 1, got {max_rank}")
    rng = np.random.default_rng(seed)
    values = randomized_singular_values(a, max_rank, rng)
    # Both are lower bounds of σ₁; power iteration alone stalls when σ₂ ≈ σ₁ (common in causal maps), where
    # the randomized SVD's block iteration does not.
    sigma1 = np.maximum(power_iteration(a, power_iters, rng), values[:, 0])
    frob, frob_se = hutchpp_frobenius(a, samples, rng)
    captured = np.cumsum(values**2, axis=-1)
    energy_rank = 1 + (captured < energy * frob[:, None]).sum(axis=-1)
    safe = np.where(sigma1 > 0, sigma1, 1.0)
    stable = np.where(sigma1 > 0, np.maximum(frob / safe**2, 1.0), 1.0)
    return Spectrum(sigma1, frob, frob_se, stable, energy_rank)
