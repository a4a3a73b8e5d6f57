// Attention backward, pass 2 on Hopper warpgroup tensor cores (wgmma.mma_async), sm_90a only: dK, dV,
// and dQ by fp32 atomics. FlashAttention-3's backward with the key/value tile resident; the same
// computation, parameters and workspace as attention_bwd_dkdv.cu with ATOMIC_DQ (which it replaces on
// Hopper when dq need not be bitwise reproducible).
//
// For batch b, key/value head hk, key j, with the G = group_size query heads h = hk*G .. hk*G + G-1:
//     P[i,j]  = exp2(scale_log2 * q[b,h,i] . k[b,hk,j] - lse_log2[b,h,i])   (recomputed, never stored)
//     dP[i,j] = dout[b,h,i] . v[b,hk,j]
//     dS[i,j] = P[i,j] * (dP[i,j] - delta[b,h,i])
//     dv[b,hk,j] = sum_h sum_i P[i,j] dout[b,h,i]
//     dk[b,hk,j] = scale * sum_h sum_i dS[i,j] q[b,h,i]
//     dq_accum[b,h,i] += sum_j dS[i,j] k[b,hk,j]   (unscaled, fp32 red.add; attention_bwd_dq_convert.cu scales)
// lse_log2 and delta come from attention_bwd_preprocess.cu (lse_log2 = +inf for fully masked and padded
// rows, so their P is exactly 0). GQA/MQA: the block reduces its key tile's dK/dV over all G query heads
// in registers (no per-head copies, no atomics: dk/dv are reproducible; dq is not).
//
// Masking. Causal is bottom-right aligned: row i sees key j iff j <= i + (seqlen_k - seqlen_q). A key
// tile skips the query tiles entirely above its first key's diagonal; only tiles crossing the diagonal
// or the ragged key end get the element mask (score = -inf). Q/dO rows past seqlen_q are zero-filled
// and have lse_log2 = +inf (P = 0); K/V rows past seqlen_k are zero-filled, masked, and never stored.
//
// Launch.
//   grid.x  = ceil(seqlen_k / 128) * num_heads_kv * batch, the n-block index fastest (causal: the key
//             tiles with the most query tiles first).
//   block.x = 256: two warpgroups, each owning 64 of the block's BLOCK_N = 128 keys.
//   dynamic shared memory bytes = (2 * 128 + 4 * BLOCK_M) * HEAD_DIM * 2     K, V; 2 x (Q, dO)
//                               + 128 * BLOCK_M * 2                           dS^T
//                               + 4 * BLOCK_M * 4                             2 x (lse_log2, delta)
//                               + 1024                                        base round-up to 1024 bytes
//   Strides in elements, head-dim stride 1, 16-byte aligned rows (16-byte cp.async); lse_log2/delta are
//   [batch * Hq][stats_stride] with stats_stride a multiple of BLOCK_M; dq_accum is
//   [batch * Hq][stats_stride][HEAD_DIM] fp32 and must be zero before the launch.
//
// Tiling. K and V stay in shared memory; the block visits (h, query tile of BLOCK_M rows) pairs in order,
// streaming Q, dO, lse_log2 and delta with double-buffered cp.async (a __syncthreads at the top of each
// tile; a second one per tile publishes dS^T). All 16-bit tiles are HEAD_DIM / 64 (or BLOCK_M / 64)
// column blocks of 128-byte swizzled lines, the canonical layouts wgmma reads through descriptors
// (wgmma_sm90.cuh). Per query tile, warpgroup w (keys [64 w, 64 w + 64)) computes, every product one
// m64 wgmma chain:
//   S^T  = K Q^T                  A = K rows, B = Q rows, both K-major;
//   P^T                           exp2 in registers, lse_log2 indexed by the accumulator column; rounded
//                                 to 16 bits the accumulators of n8 blocks 2k, 2k+1 are the register A
//                                 fragment of k16 step k (as P in the forward), so
//   dP^T = V dO^T                 as S^T: with BLOCK_M = 64 issued right behind it so that it runs under
//                                 the exponentials; with 128 (S^T, P^T and dP^T would not fit in 255
//                                 registers together) issued once P^T is packed;
//   dV  += P^T dO                 A = P^T from registers, B = dO N-major (its rows are the k dimension);
//   dS^T = P^T * (dP^T - delta)   once dP^T lands, from the rounded P^T (as a same-dtype implementation);
//   dK  += dS^T Q                 as dV; dS^T is also stored (16-bit, swizzled) to shared memory, and
//   dQ   = dS K                   after a barrier (each warpgroup needs both halves of dS^T): A = dS^T
//                                 read M-major (transposed by the instruction, legal for 16-bit), B = K
//                                 N-major. Warpgroup w takes query rows [64 w, +64) when BLOCK_M = 128,
//                                 else head-dim columns [64 w, +64); red.add into dq_accum.
// The two warpgroups' chains interleave on the tensor cores while the other one is in its exponentials.
// dK/dV stay in registers across all tiles (HEAD_DIM / 2 fp32 accumulators per thread each); S^T, dP^T
// and dQ are per-tile accumulators. Epilogue: dK * scale and dV are staged through the (dead) K/V tiles
// so the global stores are 16-byte and row-contiguous.

#include "wgmma_sm90.cuh"

template <typename T, int HEAD_DIM, int BLOCK_M, bool CAUSAL>
__global__ void __launch_bounds__(256, 1) attention_bwd_dkdv_sm90(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
    const float* __restrict__ lse_log2, const float* __restrict__ delta,
    T* __restrict__ dk, T* __restrict__ dv, float* __restrict__ dq_accum,
    long long q_stride_b, long long q_stride_h, long long q_stride_s,
    long long k_stride_b, long long k_stride_h, long long k_stride_s,
    long long v_stride_b, long long v_stride_h, long long v_stride_s,
    long long do_stride_b, long long do_stride_h, long long do_stride_s,
    long long dk_stride_b, long long dk_stride_h, long long dk_stride_s,
    long long dv_stride_b, long long dv_stride_h, long long dv_stride_s,
    int num_heads_kv, int group_size, int seqlen_q, int seqlen_k, int stats_stride, float scale_log2,
    float scale) {
    using namespace adaattn;
    constexpr int BLOCK_N = 128;                  // keys per block, 64 per warpgroup
    constexpr int NTHREADS = 256;
    constexpr int KD = HEAD_DIM / 16;             // k16 steps over the head dim (S^T, dP^T)
    constexpr int KQ = BLOCK_M / 16;              // k16 steps over queries (dV, dK)
    constexpr int KN = BLOCK_N / 16;              // k16 steps over keys (dQ)
    constexpr int DCH = HEAD_DIM / 8;             // 16-byte chunks per row
    constexpr bool DQ_SPLIT_M = BLOCK_M == 128;   // dQ split over the warpgroups by query rows, else by columns
    constexpr int DQ_N = DQ_SPLIT_M ? HEAD_DIM : HEAD_DIM / 2;
    constexpr unsigned KV_BYTES = BLOCK_N * HEAD_DIM * 2;
    constexpr unsigned Q_BYTES = BLOCK_M * HEAD_DIM * 2;
    // dP^T in flight while P^T is computed: S^T, dP^T and P^T live together fit in 255 registers next to
    // dK/dV with 64 queries per tile (D = 128), not with 128 (D = 64).
    constexpr bool EARLY_DP = BLOCK_M == 64;
    static_assert(sizeof(T) == 2, "16-bit inputs only");
    static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "unsupported head dim");
    static_assert(BLOCK_M == 64 || BLOCK_M == 128, "no wgmma wrapper for BLOCK_M");
    static_assert(DQ_N % 64 == 0, "dQ columns of a warpgroup must be whole 64-column blocks");

    extern __shared__ __align__(1024) unsigned char smem_raw[];
    // The swizzle is a function of address bits 4-9: tiles start 1024-byte aligned (the allocation
    // carries 1024 spare bytes for this round-up).
    const unsigned smem_base = (smem_u32(smem_raw) + 1023u) & ~1023u;
    const unsigned sK = smem_base;
    const unsigned sV = sK + KV_BYTES;
    const unsigned sQ = sV + KV_BYTES;           // 2 buffers of [BLOCK_M][HEAD_DIM]
    const unsigned sdO = sQ + 2 * Q_BYTES;       // 2 buffers of [BLOCK_M][HEAD_DIM]
    const unsigned sdS = sdO + 2 * Q_BYTES;      // [BLOCK_N][BLOCK_M]: dS^T, queries contiguous
    const unsigned sStats = sdS + BLOCK_N * BLOCK_M * 2;  // 2 buffers of (lse_log2[BLOCK_M], delta[BLOCK_M])
    unsigned char* smem = smem_raw + (smem_base - smem_u32(smem_raw));  // generic pointer to sK
    const float* stats = reinterpret_cast<const float*>(smem + (sStats - sK));

    const int tid = threadIdx.x;
    const int wg = tid / 128;         // warpgroup: keys [64 wg, 64 wg + 64) of the block
    const int warp = (tid / 32) % 4;  // warp within the warpgroup: its rows 16 warp .. 16 warp + 15
    const int lane = tid % 32;
    const int g = lane / 4;  // accumulator rows g and g + 8 of the warp
    const int t = lane % 4;  // accumulator column pair 2t, 2t + 1 of every n8 block

    const int num_n_blocks = (seqlen_k + BLOCK_N - 1) / BLOCK_N;
    const int n_block = blockIdx.x % num_n_blocks;
    const int bhk = blockIdx.x / num_n_blocks;
    const int h_kv = bhk % num_heads_kv;
    const int b = bhk / num_heads_kv;
    const int num_heads_q = num_heads_kv * group_size;
    const int n_start = n_block * BLOCK_N;
    const int diag = seqlen_k - seqlen_q;  // row i sees keys j <= i + diag

    // Query tiles of each head: all of them, or (CAUSAL) those from the one holding the first row that
    // sees key n_start. Work item `it` = (head it / n_m of the group, query tile m_first + it % n_m).
    const int num_m_blocks = (seqlen_q + BLOCK_M - 1) / BLOCK_M;
    const int m_first = CAUSAL ? max(0, n_start - diag) / BLOCK_M : 0;
    const int n_m = num_m_blocks - m_first;
    const int total = group_size * max(n_m, 0);

    auto load_query_tile = [&](int it, int buf) {
        const int h = h_kv * group_size + it / n_m;
        const int m_start = (m_first + it % n_m) * BLOCK_M;
        load_tile_sw128<BLOCK_M, HEAD_DIM, NTHREADS>(sQ + buf * Q_BYTES, q + b * q_stride_b + h * q_stride_h,
                                                     q_stride_s, m_start, seqlen_q, tid);
        load_tile_sw128<BLOCK_M, HEAD_DIM, NTHREADS>(sdO + buf * Q_BYTES, dout + b * do_stride_b + h * do_stride_h,
                                                     do_stride_s, m_start, seqlen_q, tid);
        // Statistics rows are padded to stats_stride: whole 16-byte chunks, no bounds. Threads
        // [0, BLOCK_M / 4) copy lse_log2, [BLOCK_M / 4, BLOCK_M / 2) delta.
        const long long row = ((long long)b * num_heads_q + h) * stats_stride + m_start;
        if (tid < BLOCK_M / 2) {
            const bool is_lse = tid < BLOCK_M / 4;
            const int c = (is_lse ? tid : tid - BLOCK_M / 4) * 4;
            cp_async_16(sStats + ((2 * buf + (is_lse ? 0 : 1)) * BLOCK_M + c) * 4,
                        (is_lse ? lse_log2 : delta) + row + c, 16);
        }
    };

    // Prologue: K, V and the first query tile.
    load_tile_sw128<BLOCK_N, HEAD_DIM, NTHREADS>(sK, k + b * k_stride_b + h_kv * k_stride_h, k_stride_s, n_start,
                                                 seqlen_k, tid);
    load_tile_sw128<BLOCK_N, HEAD_DIM, NTHREADS>(sV, v + b * v_stride_b + h_kv * v_stride_h, v_stride_s, n_start,
                                                 seqlen_k, tid);
    if (total > 0) load_query_tile(0, 0);
    cp_async_commit();

    // Matrix descriptors (buffer 0, k16 step 0); steps add (bytes >> 4) to the start address field.
    // K-major (S^T, dP^T): A = this warpgroup's 64 rows of K / V, B = the BLOCK_M rows of Q / dO; 8-row
    // groups 1024 bytes apart, leading offset unused (one k16 step stays inside a 128-byte line).
    const unsigned long long k_desc = wgmma_desc_sw128(sK + wg * 64 * 128, 16, 1024);
    const unsigned long long v_desc = wgmma_desc_sw128(sV + wg * 64 * 128, 16, 1024);
    const unsigned long long q_desc = wgmma_desc_sw128(sQ, 16, 1024);
    const unsigned long long do_desc = wgmma_desc_sw128(sdO, 16, 1024);
    // N-major B (dV, dK): lines are 64 head-dim columns of one query; 8-query groups 1024 bytes apart,
    // 64-column blocks BLOCK_M lines apart; k16 step kq is 16 lines further.
    const unsigned long long q_desc_mn = wgmma_desc_sw128(sQ, BLOCK_M * 128, 1024);
    const unsigned long long do_desc_mn = wgmma_desc_sw128(sdO, BLOCK_M * 128, 1024);
    // dQ: A = dS^T M-major (lines are 64 queries of one key), B = K N-major (lines are 64 columns of one
    // key); both with 8-key groups 1024 bytes apart and 64-wide blocks BLOCK_N lines apart. The
    // warpgroup's 64 query rows or 64 columns are one such block.
    const unsigned long long ds_desc = wgmma_desc_sw128(sdS + (DQ_SPLIT_M ? wg * BLOCK_N * 128 : 0), BLOCK_N * 128, 1024);
    const unsigned long long kt_desc = wgmma_desc_sw128(sK + (DQ_SPLIT_M ? 0 : wg * BLOCK_N * 128), BLOCK_N * 128, 1024);

    // K-major k16 step kk of a [ROWS][HEAD_DIM] tile: column block kk / 4, 32 bytes per step inside it.
    auto k_step = [](int kk, int rows) { return (unsigned)((kk / 4) * rows * 128 + (kk % 4) * 32) >> 4; };
    constexpr unsigned LINES16 = (16 * 128) >> 4;  // 16 lines: one MN-major k16 step

    const int key_local = wg * 64 + warp * 16 + g;  // the thread's keys key_local and key_local + 8
    float acc_dk[HEAD_DIM / 2];
    float acc_dv[HEAD_DIM / 2];
#pragma unroll
    for (int i = 0; i < HEAD_DIM / 2; ++i) {
        acc_dk[i] = 0.f;
        acc_dv[i] = 0.f;
    }

    for (int it = 0; it < total; ++it) {
        const int buf = it & 1;
        const int h = h_kv * group_size + it / n_m;
        const int m_start = (m_first + it % n_m) * BLOCK_M;
        // Tile `it` has landed for every thread and is visible to wgmma; every warpgroup is done with the
        // other buffers and with dS^T (all its wgmmas of the previous tile were waited for).
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();
        if (it + 1 < total) {
            load_query_tile(it + 1, buf ^ 1);
            cp_async_commit();
        }
        const unsigned qb = (buf * Q_BYTES) >> 4;
        const float* lse_tile = stats + 2 * buf * BLOCK_M;
        const float* delta_tile = lse_tile + BLOCK_M;

        // S^T = K Q^T and dP^T = V dO^T, one group each. Per-tile accumulators are zeroed so that nothing
        // flows from the previous tile (they are not live across it). EARLY_DP: dP^T runs under the
        // exponentials; else it is issued once P^T is packed and S^T is dead.
        float acc_s[BLOCK_M / 2];
        float acc_dp[BLOCK_M / 2];
        auto zero_dp = [&]() {
#pragma unroll
            for (int i = 0; i < BLOCK_M / 2; ++i) acc_dp[i] = 0.f;
            reg_fence(acc_dp);
        };
        auto issue_dp = [&]() {  // behind a wgmma_fence
#pragma unroll
            for (int kk = 0; kk < KD; ++kk)
                Wgmma<BLOCK_M>::template ss<T>(acc_dp, v_desc + k_step(kk, BLOCK_N),
                                               do_desc + qb + k_step(kk, BLOCK_M), kk > 0);
            wgmma_commit();
        };
#pragma unroll
        for (int i = 0; i < BLOCK_M / 2; ++i) acc_s[i] = 0.f;
        reg_fence(acc_s);
        wgmma_fence();
#pragma unroll
        for (int kk = 0; kk < KD; ++kk)
            Wgmma<BLOCK_M>::template ss<T>(acc_s, k_desc + k_step(kk, BLOCK_N), q_desc + qb + k_step(kk, BLOCK_M),
                                           kk > 0);
        wgmma_commit();
        if constexpr (EARLY_DP) {
            zero_dp();
            wgmma_fence();
            issue_dp();
        }
        wgmma_wait<EARLY_DP ? 1 : 0>();  // S^T landed
        reg_fence(acc_s);

        // Element mask, only on tiles reaching past the ragged key end or (CAUSAL) crossing the diagonal
        // (some key of the tile is hidden from the tile's first query row). Thread element 4 j + e is key
        // key_local + 8 (e / 2), query 8 j + 2 t + e % 2 of the tile.
        if (n_start + BLOCK_N > seqlen_k || (CAUSAL && n_start + BLOCK_N - 1 > m_start + diag)) {
#pragma unroll
            for (int j = 0; j < BLOCK_M / 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = n_start + key_local + (e >> 1) * 8;
                    const int row = m_start + j * 8 + 2 * t + (e & 1);
                    if (key >= seqlen_k || (CAUSAL && key > row + diag)) acc_s[4 * j + e] = neg_inf();
                }
        }

        // P^T = exp2(S^T * scale_log2 - lse_log2[query]) rounded to 16 bits as the A fragments of P^T dO:
        // n8 blocks 2 kq and 2 kq + 1 form k16 step kq, p[kq][2 (j % 2) + r] = row g + 8 r of block j.
        unsigned p[KQ][4];
#pragma unroll
        for (int j = 0; j < BLOCK_M / 8; ++j) {
            const float2 l2 = *reinterpret_cast<const float2*>(lse_tile + j * 8 + 2 * t);
#pragma unroll
            for (int r = 0; r < 2; ++r)
                p[j / 2][2 * (j % 2) + r] = pack2<T>(fast_exp2(fmaf(acc_s[4 * j + 2 * r], scale_log2, -l2.x)),
                                                     fast_exp2(fmaf(acc_s[4 * j + 2 * r + 1], scale_log2, -l2.y)));
        }

        // dV += P^T dO (behind dP^T when it was not issued early).
        if constexpr (!EARLY_DP) zero_dp();
        reg_fence(acc_dv);
#pragma unroll
        for (int kq = 0; kq < KQ; ++kq) reg_fence(p[kq]);
        wgmma_fence();
        if constexpr (!EARLY_DP) issue_dp();
#pragma unroll
        for (int kq = 0; kq < KQ; ++kq)
            Wgmma<HEAD_DIM>::template rs<T>(acc_dv, p[kq], do_desc_mn + qb + kq * LINES16, 1);
        wgmma_commit();
        wgmma_wait<1>();  // dP^T landed (committed before P^T dO, which may still run)
        reg_fence(acc_dp);

        // dS^T = P^T * (dP^T - delta[query]), packed like p, and stored to shared memory for dQ: element
        // pairs (key, queries 8 j + 2t, +1) are 4 bytes at chunk j of line `key` (8 rows of a quad column
        // hit 8 distinct swizzled chunks: conflict-free).
        unsigned ds[KQ][4];
#pragma unroll
        for (int j = 0; j < BLOCK_M / 8; ++j) {
            const float2 dl = *reinterpret_cast<const float2*>(delta_tile + j * 8 + 2 * t);
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const float2 pr = unpack2<T>(p[j / 2][2 * (j % 2) + r]);
                const unsigned d2 = pack2<T>(pr.x * (acc_dp[4 * j + 2 * r] - dl.x),
                                             pr.y * (acc_dp[4 * j + 2 * r + 1] - dl.y));
                ds[j / 2][2 * (j % 2) + r] = d2;
                *reinterpret_cast<unsigned*>(smem + (sdS - sK) + sw128_offset<BLOCK_N>(key_local + 8 * r, j) + 4 * t) =
                    d2;
            }
        }

        // dK += dS^T Q.
        reg_fence(acc_dk);
#pragma unroll
        for (int kq = 0; kq < KQ; ++kq) reg_fence(ds[kq]);
        wgmma_fence();
#pragma unroll
        for (int kq = 0; kq < KQ; ++kq)
            Wgmma<HEAD_DIM>::template rs<T>(acc_dk, ds[kq], q_desc_mn + qb + kq * LINES16, 1);
        wgmma_commit();
        wgmma_wait<1>();  // P^T dO done: the P^T registers were read up to here
#pragma unroll
        for (int kq = 0; kq < KQ; ++kq) reg_fence(p[kq]);

        // dQ = dS K once both warpgroups' dS^T rows are in shared memory and visible to wgmma.
        fence_proxy_async();
        __syncthreads();
        float acc_dq[DQ_N / 2];
#pragma unroll
        for (int i = 0; i < DQ_N / 2; ++i) acc_dq[i] = 0.f;
        reg_fence(acc_dq);
        wgmma_fence();
#pragma unroll
        for (int kn = 0; kn < KN; ++kn)
            Wgmma<DQ_N>::template ss_mn<T>(acc_dq, ds_desc + kn * LINES16, kt_desc + kn * LINES16, kn > 0);
        wgmma_commit();
        wgmma_wait<0>();
        reg_fence(acc_dq);
        reg_fence(acc_dk);
        reg_fence(acc_dv);
#pragma unroll
        for (int kq = 0; kq < KQ; ++kq) reg_fence(ds[kq]);

        // Padded workspace rows: rows past seqlen_q receive zeros and need no bounds check. Thread element
        // 4 j + e is query row dq_row + 8 (e / 2), column dq_col + 8 j + 2 t + e % 2.
        float* dq_tile = dq_accum + (((long long)b * num_heads_q + h) * stats_stride + m_start) * HEAD_DIM;
        const int dq_row = (DQ_SPLIT_M ? wg * 64 : 0) + warp * 16 + g;
        const int dq_col = DQ_SPLIT_M ? 0 : wg * 64;
#pragma unroll
        for (int j = 0; j < DQ_N / 8; ++j)
#pragma unroll
            for (int r = 0; r < 2; ++r)
                red_add_f32x2(dq_tile + (dq_row + 8 * r) * HEAD_DIM + dq_col + j * 8 + 2 * t, acc_dq[4 * j + 2 * r],
                              acc_dq[4 * j + 2 * r + 1]);
    }

    // Epilogue: stage dK * scale and dV in the K/V tiles (every warpgroup's wgmmas are complete, and no
    // copy is in flight), then 16-byte row-contiguous stores of the rows below seqlen_k.
    cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int j = 0; j < HEAD_DIM / 8; ++j)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int off = sw128_offset<BLOCK_N>(key_local + 8 * r, j) + 4 * t;
            *reinterpret_cast<unsigned*>(smem + off) =
                pack2<T>(acc_dk[4 * j + 2 * r] * scale, acc_dk[4 * j + 2 * r + 1] * scale);
            *reinterpret_cast<unsigned*>(smem + KV_BYTES + off) =
                pack2<T>(acc_dv[4 * j + 2 * r], acc_dv[4 * j + 2 * r + 1]);
        }
    __syncthreads();
    T* dk_ptr = dk + b * dk_stride_b + h_kv * dk_stride_h;
    T* dv_ptr = dv + b * dv_stride_b + h_kv * dv_stride_h;
#pragma unroll
    for (int i = 0; i < BLOCK_N * DCH / NTHREADS; ++i) {
        const int idx = tid + i * NTHREADS;
        const int row = idx / DCH;
        const int c = idx % DCH;
        const int key = n_start + row;
        if (key < seqlen_k) {
            *reinterpret_cast<uint4*>(dk_ptr + key * dk_stride_s + c * 8) =
                *reinterpret_cast<const uint4*>(smem + sw128_offset<BLOCK_N>(row, c));
            *reinterpret_cast<uint4*>(dv_ptr + key * dv_stride_s + c * 8) =
                *reinterpret_cast<const uint4*>(smem + KV_BYTES + sw128_offset<BLOCK_N>(row, c));
        }
    }
}
