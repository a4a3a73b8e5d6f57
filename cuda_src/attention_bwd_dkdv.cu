// Attention backward, pass 2: dK and dV (and, with ATOMIC_DQ, dQ by fp32 atomics) on mma.sync tensor
// cores, sm_80 and newer. FlashAttention-2's backward with the key/value tile resident.
//
// For batch b, key/value head hk, key j, with the G = group_size query heads h = hk*G .. hk*G + G-1:
//     P[i,j]  = exp2(scale_log2 * q[b,h,i] . k[b,hk,j] - lse_log2[b,h,i])   (recomputed, never stored)
//     dP[i,j] = dout[b,h,i] . v[b,hk,j]
//     dS[i,j] = P[i,j] * (dP[i,j] - delta[b,h,i])
//     dv[b,hk,j] = sum_h sum_i P[i,j] dout[b,h,i]
//     dk[b,hk,j] = scale * sum_h sum_i dS[i,j] q[b,h,i]
//     ATOMIC_DQ: dq_accum[b,h,i] += sum_j dS[i,j] k[b,hk,j]   (unscaled, fp32 red.add)
// lse_log2 and delta come from attention_bwd_preprocess.cu (lse_log2 = +inf for fully masked and
// padded rows, so their P is exactly 0). GQA/MQA: one thread block reduces its key tile's dK/dV over
// all G query heads in registers, so dk/dv need no per-head copies and no atomics (deterministic).
//
// Masking. Causal is bottom-right aligned: row i sees key j iff j <= i + (seqlen_k - seqlen_q). A key
// tile skips the query tiles entirely above its first key's diagonal; only tiles crossing the diagonal
// or the ragged key end get the element mask (score = -inf). Q/dO rows past seqlen_q are zero-filled
// and have lse_log2 = +inf (P = 0); K/V rows past seqlen_k are zero-filled, masked, and never stored.
//
// Launch.
//   grid.x  = ceil(seqlen_k / BLOCK_N) * num_heads_kv * batch, the n-block index fastest (the blocks
//             reading one (b, hk)'s Q and dO run together; causal: the longest key tiles first).
//   block.x = NUM_WARPS * 32.
//   dynamic shared memory bytes = (2 * BLOCK_N + 4 * BLOCK_M) * HEAD_DIM * 2      K, V; 2 x (Q, dO)
//                               + (ATOMIC_DQ ? BLOCK_N * BLOCK_M * 2 : 0)          dS^T
//                               + 4 * BLOCK_M * 4                                   2 x (lse_log2, delta)
//   Strides in elements, head-dim stride 1, 16-byte aligned rows (16-byte cp.async); lse_log2/delta are
//   [batch * Hq][stats_stride] with stats_stride a multiple of BLOCK_M; dq_accum is
//   [batch * Hq][stats_stride][HEAD_DIM] fp32 and must be zero before the launch.
//
// Tiling. The block owns BLOCK_N keys of one (b, hk); K and V stay in shared memory (and, when they fit
// in 16 registers per operand, in registers). It visits (h, query tile of BLOCK_M rows) pairs in order,
// streaming Q, dO, lse_log2 and delta with double-buffered cp.async (one __syncthreads per tile).
// Warp w owns keys [kw * WARP_N, (kw + 1) * WARP_N), kw = w / D_SPLIT, and head-dim slice w % D_SPLIT
// of dK/dV (D_SPLIT = 2 for D >= 192 keeps the dK/dV accumulators within the register file at the
// cost of computing S^T and dP^T twice). Per query tile and warp, in this order (short live ranges):
//   S^T  = K Q^T                  keys x queries, fp32 accumulators; Q fragments by ldmatrix;
//   P^T                           exp2 in registers, lse_log2 indexed by the accumulator column, kept
//                                 rounded to 16 bits: the C fragments are the A operand of
//   dV  += P^T dO                 (as P in the forward); dO by ldmatrix.trans: no transposes;
//   dP^T = V dO^T, dS^T = P^T * (dP^T - delta)   from the rounded P^T, dS^T rounded to 16 bits;
//   dK  += dS^T Q                 as dV, Q by ldmatrix.trans;
//   ATOMIC_DQ: dS^T goes to shared memory (16-bit), then the warps, re-tiled as DQ_WARPS_M x
//   (NUM_WARPS / DQ_WARPS_M) over queries x head dim, compute dS K (dS by ldmatrix.trans of dS^T, K by
//   ldmatrix.trans) and red.add it into dq_accum. Atomic order varies between runs: dq is not bitwise
//   reproducible; the deterministic path uses attention_bwd_dq.cu instead.
// All 16-bit shared tiles use the XOR swizzle of mma_sm80.cuh. Epilogue: dK * scale and dV are staged
// through the (dead) K/V tiles so the global stores are 16-byte and row-contiguous.

#include "mma_sm80.cuh"

namespace adaattn {

// acc = A B^T for one warp. A: MT m16 row tiles x (16 * KD) columns of a swizzled row-major tile, from
// a_frag when it has the full [MT][KD] shape (fragments held in registers; callers without them pass a
// [1][1] placeholder), else by ldmatrix from a_lane_addr (the A-operand lane address of its first row).
// B^T: NQ n8 tiles of rows of another swizzled row-major tile, by ldmatrix from b_lane_addr (the
// B-operand lane address of its first row). Fully unrolled; acc is zeroed first.
template <typename T, int MT, int NQ, int KD, int A_MT, int A_KD>
__device__ __forceinline__ void warp_gemm_nt(float (&acc)[MT][NQ][4], const unsigned (&a_frag)[A_MT][A_KD][4],
                                             unsigned a_lane_addr, unsigned b_lane_addr) {
    using Swz = Swizzle<KD * 16>;
    constexpr bool A_IN_REGS = A_MT == MT && A_KD == KD;
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int nq = 0; nq < NQ; ++nq)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc[mt][nq][e] = 0.f;
#pragma unroll
    for (int kd = 0; kd < KD; ++kd) {
        unsigned a[MT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
            if constexpr (A_IN_REGS) {
#pragma unroll
                for (int e = 0; e < 4; ++e) a[mt][e] = a_frag[mt][kd][e];
            } else {
                ldmatrix_x4(a[mt], Swz::ldsm_addr(a_lane_addr, mt * 16, 2 * kd));
            }
        }
#pragma unroll
        for (int np = 0; np < NQ / 2; ++np) {
            unsigned b[4];
            ldmatrix_x4(b, Swz::ldsm_addr(b_lane_addr, np * 16, 2 * kd));
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                mma_16816<T>(acc[mt][2 * np], a[mt], b[0], b[1]);
                mma_16816<T>(acc[mt][2 * np + 1], a[mt], b[2], b[3]);
            }
        }
    }
}

}  // namespace adaattn

template <typename T, int HEAD_DIM, int BLOCK_M, int BLOCK_N, int NUM_WARPS, int D_SPLIT, int DQ_WARPS_M,
          bool CAUSAL, bool ATOMIC_DQ>
__global__ void __launch_bounds__(NUM_WARPS * 32, 1) attention_bwd_dkdv(
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
    using Swz = Swizzle<HEAD_DIM>;
    using SwzS = Swizzle<BLOCK_M>;                    // dS^T rows hold BLOCK_M queries
    constexpr int NTHREADS = NUM_WARPS * 32;
    constexpr int KEY_WARPS = NUM_WARPS / D_SPLIT;
    constexpr int WARP_N = BLOCK_N / KEY_WARPS;       // keys per warp
    constexpr int MT = WARP_N / 16;                   // m16 key tiles per warp
    constexpr int NQ = BLOCK_M / 8;                   // n8 query tiles of S^T
    constexpr int KD = HEAD_DIM / 16;                 // k16 steps over the head dim
    constexpr int KQ = BLOCK_M / 16;                  // k16 steps over queries (dV, dK)
    constexpr int KN = BLOCK_N / 16;                  // k16 steps over keys (dQ)
    constexpr int DT = HEAD_DIM / D_SPLIT / 8;        // n8 head-dim tiles of this warp's dK/dV slice
    constexpr int DCH = HEAD_DIM / 8;                 // 16-byte chunks per row
    constexpr int DQ_WARPS_D = NUM_WARPS / DQ_WARPS_M;
    constexpr int DQ_MT = BLOCK_M / 16 / DQ_WARPS_M;  // m16 query tiles per warp in dQ
    constexpr int DQ_DT = HEAD_DIM / DQ_WARPS_D / 8;  // n8 head-dim tiles per warp in dQ
    constexpr bool KV_IN_REGS = MT * KD * 4 <= 16;
    static_assert(NUM_WARPS % D_SPLIT == 0 && WARP_N % 16 == 0 && BLOCK_N % KEY_WARPS == 0, "bad key split");
    static_assert(DT % 2 == 0 && BLOCK_M % 32 == 0 && HEAD_DIM % 32 == 0 && HEAD_DIM <= 256, "bad tile");
    static_assert(NUM_WARPS % DQ_WARPS_M == 0 && DQ_MT >= 1 && BLOCK_M % (16 * DQ_WARPS_M) == 0, "bad dQ split");
    static_assert(DQ_DT % 2 == 0 && HEAD_DIM % (16 * DQ_WARPS_D) == 0, "bad dQ split");
    static_assert(NTHREADS >= BLOCK_M / 2, "statistics loader needs BLOCK_M / 2 threads");

    extern __shared__ __align__(128) unsigned char smem_raw[];
    T* sK = reinterpret_cast<T*>(smem_raw);
    T* sV = sK + BLOCK_N * HEAD_DIM;
    T* sQ = sV + BLOCK_N * HEAD_DIM;                  // 2 buffers of [BLOCK_M][HEAD_DIM]
    T* sdO = sQ + 2 * BLOCK_M * HEAD_DIM;             // 2 buffers of [BLOCK_M][HEAD_DIM]
    T* sdS = sdO + 2 * BLOCK_M * HEAD_DIM;            // [BLOCK_N][BLOCK_M] (ATOMIC_DQ)
    float* sLse = reinterpret_cast<float*>(sdS + (ATOMIC_DQ ? BLOCK_N * BLOCK_M : 0));  // 2 x [BLOCK_M]
    float* sDelta = sLse + 2 * BLOCK_M;                                                // 2 x [BLOCK_M]

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int g = lane >> 2;  // accumulator row within an m16 tile (and g + 8)
    const int t = lane & 3;   // accumulator column pair within an n8 tile

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

    const T* k_ptr = k + b * k_stride_b + h_kv * k_stride_h;
    const T* v_ptr = v + b * v_stride_b + h_kv * v_stride_h;

    auto load_query_tile = [&](int it, int buf) {
        const int h = h_kv * group_size + it / n_m;
        const int m_start = (m_first + it % n_m) * BLOCK_M;
        copy_tile_async<BLOCK_M, HEAD_DIM, NTHREADS>(sQ + buf * BLOCK_M * HEAD_DIM, q + b * q_stride_b + h * q_stride_h,
                                                     q_stride_s, m_start, seqlen_q, tid);
        copy_tile_async<BLOCK_M, HEAD_DIM, NTHREADS>(sdO + buf * BLOCK_M * HEAD_DIM,
                                                     dout + b * do_stride_b + h * do_stride_h, do_stride_s, m_start,
                                                     seqlen_q, tid);
        // Statistics rows are padded to stats_stride: whole 16-byte chunks, no bounds. Threads
        // [0, BLOCK_M / 4) copy lse_log2, [BLOCK_M / 4, BLOCK_M / 2) delta.
        const long long stats = ((long long)b * num_heads_q + h) * stats_stride + m_start;
        if (tid < BLOCK_M / 2) {
            const bool is_lse = tid < BLOCK_M / 4;
            const int c = (is_lse ? tid : tid - BLOCK_M / 4) * 4;
            cp_async_16(smem_u32((is_lse ? sLse : sDelta) + buf * BLOCK_M + c), (is_lse ? lse_log2 : delta) + stats + c,
                        16);
        }
    };

    // Prologue: K and V, then the first query tile, as two cp.async groups.
    copy_tile_async<BLOCK_N, HEAD_DIM, NTHREADS>(sK, k_ptr, k_stride_s, n_start, seqlen_k, tid);
    copy_tile_async<BLOCK_N, HEAD_DIM, NTHREADS>(sV, v_ptr, v_stride_s, n_start, seqlen_k, tid);
    cp_async_commit();
    if (total > 0) {
        load_query_tile(0, 0);
        cp_async_commit();
    }

    // ldmatrix lane roles (as in attention_fwd.cu). a_lane: A operand rows 0-15 of chunks c, c+1, also
    // the B operand through .trans of a row-major [k][n] tile; b_lane: B operand of a row-major [n][k]
    // tile, also the A operand through .trans of a row-major [k][m] tile.
    const int a_lane = 2 * Swz::offset(lane & 15, lane >> 4);
    const int b_lane = 2 * Swz::offset((lane & 7) | ((lane >> 4) << 3), (lane >> 3) & 1);
    const int warp_key = (warp / D_SPLIT) * WARP_N;
    const int d_chunk0 = D_SPLIT == 1 ? 0 : (warp % D_SPLIT) * DT;  // first head-dim chunk of this warp's slice
    const unsigned k_lane_addr = smem_u32(sK) + warp_key * HEAD_DIM * 2 + a_lane;
    const unsigned v_lane_addr = smem_u32(sV) + warp_key * HEAD_DIM * 2 + a_lane;

    unsigned k_frag[KV_IN_REGS ? MT : 1][KV_IN_REGS ? KD : 1][4];
    unsigned v_frag[KV_IN_REGS ? MT : 1][KV_IN_REGS ? KD : 1][4];
    if constexpr (KV_IN_REGS) {
        if (total > 0) cp_async_wait<1>();
        else cp_async_wait<0>();
        __syncthreads();
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int kd = 0; kd < KD; ++kd) {
                ldmatrix_x4(k_frag[mt][kd], Swz::ldsm_addr(k_lane_addr, mt * 16, 2 * kd));
                ldmatrix_x4(v_frag[mt][kd], Swz::ldsm_addr(v_lane_addr, mt * 16, 2 * kd));
            }
    }

    // dQ re-tiling (ATOMIC_DQ): warp (qw, dw) owns queries [qw * DQ_MT * 16, ...) and head-dim chunks
    // [dw * DQ_DT, ...). Lane addresses are fixed; the k16 step over keys adds a row displacement.
    const int dq_row0 = (warp / DQ_WARPS_D) * DQ_MT * 16;
    const int dq_chunk0 = (warp % DQ_WARPS_D) * DQ_DT;
    const unsigned ds_lane_addr =
        smem_u32(sdS) + 2 * SwzS::offset((lane & 7) | ((lane >> 4) << 3), (lane >> 3) & 1);
    const unsigned kt_lane_addr = smem_u32(sK) + a_lane;

    float acc_dk[MT][DT][4];
    float acc_dv[MT][DT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                acc_dk[mt][dt][e] = 0.f;
                acc_dv[mt][dt][e] = 0.f;
            }

    for (int it = 0; it < total; ++it) {
        const int buf = it & 1;
        const int h = h_kv * group_size + it / n_m;
        const int m_start = (m_first + it % n_m) * BLOCK_M;
        // Tile `it` has landed for every thread, and every warp is done with the other buffers (and dS^T).
        cp_async_wait<0>();
        __syncthreads();
        if (it + 1 < total) {
            load_query_tile(it + 1, buf ^ 1);
            cp_async_commit();
        }
        const unsigned q_tile = smem_u32(sQ + buf * BLOCK_M * HEAD_DIM);
        const unsigned do_tile = smem_u32(sdO + buf * BLOCK_M * HEAD_DIM);
        const float* lse_tile = sLse + buf * BLOCK_M;
        const float* delta_tile = sDelta + buf * BLOCK_M;

        // S^T = K Q^T for this warp's keys and the BLOCK_M queries of the tile.
        float acc_s[MT][NQ][4];
        warp_gemm_nt<T, MT, NQ, KD, KV_IN_REGS ? MT : 1, KV_IN_REGS ? KD : 1>(acc_s, k_frag, k_lane_addr, q_tile + b_lane);

        // Element mask, only on tiles reaching past the ragged key end or (CAUSAL) crossing the diagonal
        // (some key of the tile is hidden from the tile's first query row).
        if (n_start + BLOCK_N > seqlen_k || (CAUSAL && n_start + BLOCK_N - 1 > m_start + diag)) {
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nq = 0; nq < NQ; ++nq)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int key = n_start + warp_key + mt * 16 + g + (e >> 1) * 8;
                        const int row = m_start + nq * 8 + 2 * t + (e & 1);
                        if (key >= seqlen_k || (CAUSAL && key > row + diag)) acc_s[mt][nq][e] = neg_inf();
                    }
        }

        // P^T = exp2(S^T * scale_log2 - lse_log2[query]), kept rounded to 16 bits, two columns per register:
        // p_pk[mt][nq][r] holds row g + 8r, columns 2t, 2t+1 (queries nq * 8 + 2t, +1) of n8 tile nq.
        unsigned p_pk[MT][NQ][2];
#pragma unroll
        for (int nq = 0; nq < NQ; ++nq) {
            const float2 l2 = *reinterpret_cast<const float2*>(lse_tile + nq * 8 + 2 * t);
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int r = 0; r < 2; ++r)
                    p_pk[mt][nq][r] = pack2<T>(fast_exp2(fmaf(acc_s[mt][nq][2 * r], scale_log2, -l2.x)),
                                               fast_exp2(fmaf(acc_s[mt][nq][2 * r + 1], scale_log2, -l2.y)));
        }

        // dV += P^T dO over the k16 query steps: n8 tiles 2kq, 2kq+1 of P^T form the A fragment of step kq
        // (as P in the forward); dO rows are the k dimension: ldmatrix.trans.
#pragma unroll
        for (int kq = 0; kq < KQ; ++kq) {
            unsigned ap[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int i = 0; i < 4; ++i) ap[mt][i] = p_pk[mt][2 * kq + (i >> 1)][i & 1];
#pragma unroll
            for (int dp = 0; dp < DT / 2; ++dp) {
                unsigned bo[4];
                ldmatrix_x4_trans(bo, Swz::ldsm_addr(do_tile + a_lane, kq * 16, d_chunk0 + 2 * dp));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_16816<T>(acc_dv[mt][2 * dp], ap[mt], bo[0], bo[1]);
                    mma_16816<T>(acc_dv[mt][2 * dp + 1], ap[mt], bo[2], bo[3]);
                }
            }
        }

        // dP^T = V dO^T, then dS^T = P^T * (dP^T - delta[query]) from the rounded P^T that dV uses (as a
        // same-dtype implementation would), packed like p_pk.
        unsigned ds_pk[MT][NQ][2];
        {
            float acc_dp[MT][NQ][4];
            warp_gemm_nt<T, MT, NQ, KD, KV_IN_REGS ? MT : 1, KV_IN_REGS ? KD : 1>(acc_dp, v_frag, v_lane_addr,
                                                                                do_tile + b_lane);
#pragma unroll
            for (int nq = 0; nq < NQ; ++nq) {
                const float2 dl = *reinterpret_cast<const float2*>(delta_tile + nq * 8 + 2 * t);
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int r = 0; r < 2; ++r) {
                        const float2 p = unpack2<T>(p_pk[mt][nq][r]);
                        ds_pk[mt][nq][r] = pack2<T>(p.x * (acc_dp[mt][nq][2 * r] - dl.x),
                                                    p.y * (acc_dp[mt][nq][2 * r + 1] - dl.y));
                    }
            }
        }
        if constexpr (ATOMIC_DQ) {
            // dS^T to shared memory for the dQ product (one copy: the warps of head-dim slice 0).
            if (D_SPLIT == 1 || warp % D_SPLIT == 0) {
#pragma unroll
                for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                    for (int nq = 0; nq < NQ; ++nq)
#pragma unroll
                        for (int r = 0; r < 2; ++r)
                            *reinterpret_cast<unsigned*>(sdS + SwzS::offset(warp_key + mt * 16 + g + r * 8, nq) + 2 * t) =
                                ds_pk[mt][nq][r];
            }
        }

        // dK += dS^T Q, as dV.
#pragma unroll
        for (int kq = 0; kq < KQ; ++kq) {
            unsigned ads[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int i = 0; i < 4; ++i) ads[mt][i] = ds_pk[mt][2 * kq + (i >> 1)][i & 1];
#pragma unroll
            for (int dp = 0; dp < DT / 2; ++dp) {
                unsigned bq[4];
                ldmatrix_x4_trans(bq, Swz::ldsm_addr(q_tile + a_lane, kq * 16, d_chunk0 + 2 * dp));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_16816<T>(acc_dk[mt][2 * dp], ads[mt], bq[0], bq[1]);
                    mma_16816<T>(acc_dk[mt][2 * dp + 1], ads[mt], bq[2], bq[3]);
                }
            }
        }

        if constexpr (ATOMIC_DQ) {
            // dQ tile = dS K: every warp's dS^T rows are in shared memory after the barrier.
            __syncthreads();
            float acc_dq[DQ_MT][DQ_DT][4];
#pragma unroll
            for (int mt = 0; mt < DQ_MT; ++mt)
#pragma unroll
                for (int dt = 0; dt < DQ_DT; ++dt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) acc_dq[mt][dt][e] = 0.f;
#pragma unroll
            for (int kn = 0; kn < KN; ++kn) {
                unsigned a[DQ_MT][4];
#pragma unroll
                for (int mt = 0; mt < DQ_MT; ++mt)
                    ldmatrix_x4_trans(a[mt], SwzS::ldsm_addr(ds_lane_addr, kn * 16, dq_row0 / 8 + 2 * mt));
#pragma unroll
                for (int dp = 0; dp < DQ_DT / 2; ++dp) {
                    unsigned bk[4];
                    ldmatrix_x4_trans(bk, Swz::ldsm_addr(kt_lane_addr, kn * 16, dq_chunk0 + 2 * dp));
#pragma unroll
                    for (int mt = 0; mt < DQ_MT; ++mt) {
                        mma_16816<T>(acc_dq[mt][2 * dp], a[mt], bk[0], bk[1]);
                        mma_16816<T>(acc_dq[mt][2 * dp + 1], a[mt], bk[2], bk[3]);
                    }
                }
            }
            // Padded workspace rows: rows past seqlen_q receive zeros and need no bounds check.
            float* dq_tile = dq_accum + (((long long)b * num_heads_q + h) * stats_stride + m_start) * HEAD_DIM;
#pragma unroll
            for (int mt = 0; mt < DQ_MT; ++mt)
#pragma unroll
                for (int dt = 0; dt < DQ_DT; ++dt)
#pragma unroll
                    for (int r = 0; r < 2; ++r) {
                        const int row = dq_row0 + mt * 16 + g + r * 8;
                        red_add_f32x2(dq_tile + row * HEAD_DIM + (dq_chunk0 + dt) * 8 + 2 * t, acc_dq[mt][dt][2 * r],
                                      acc_dq[mt][dt][2 * r + 1]);
                    }
        }
    }

    // Epilogue: stage dK * scale and dV in the K/V tiles (every warp is past its last read of them, and no
    // copy is in flight), then 16-byte row-contiguous stores of the rows below seqlen_k.
    cp_async_wait<0>();
    __syncthreads();
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                const int key = warp_key + mt * 16 + g + r * 8;
                const int off = Swz::offset(key, d_chunk0 + dt) + 2 * t;
                *reinterpret_cast<unsigned*>(sK + off) =
                    pack2<T>(acc_dk[mt][dt][2 * r] * scale, acc_dk[mt][dt][2 * r + 1] * scale);
                *reinterpret_cast<unsigned*>(sV + off) = pack2<T>(acc_dv[mt][dt][2 * r], acc_dv[mt][dt][2 * r + 1]);
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
                *reinterpret_cast<const uint4*>(sK + Swz::offset(row, c));
            *reinterpret_cast<uint4*>(dv_ptr + key * dv_stride_s + c * 8) =
                *reinterpret_cast<const uint4*>(sV + Swz::offset(row, c));
        }
    }
}
