// Attention backward, deterministic dQ pass on mma.sync tensor cores, sm_80 and newer.
//
// For batch b, query head h, query row i (G = group_size, hk = h / G):
//     P[i,j]  = exp2(scale_log2 * q[b,h,i] . k[b,hk,j] - lse_log2[b,h,i])
//     dS[i,j] = P[i,j] * (dout[b,h,i] . v[b,hk,j] - delta[b,h,i])
//     dq[b,h,i] = scale * sum_j dS[i,j] k[b,hk,j]
// lse_log2 and delta come from attention_bwd_preprocess.cu (lse_log2 = +inf for fully masked rows: P = 0
// and dq = 0). Each dq element is summed by one thread in a fixed order: bitwise reproducible. This is
// the deterministic alternative to attention_bwd_dkdv.cu's atomic dQ: it recomputes Q K^T and dO V^T
// (7 GEMMs in the backward instead of 5) but needs no fp32 workspace and no atomics.
//
// Masking as attention_fwd.cu: bottom-right causal (row i sees keys j <= i + seqlen_k - seqlen_q), key
// tiles past the block's last admissible key skipped, a block whose rows see no key writes zeros,
// K/V rows past seqlen_k zero-filled and masked, Q/dO rows past seqlen_q computed on zeros and not stored.
//
// Launch.
//   grid.x  = ceil(seqlen_q / BLOCK_M) * num_heads_q * batch, m-block fastest (reversed when CAUSAL so
//             the longest rows start first); block.x = NUM_WARPS * 32; seqlen_k >= 1.
//   dynamic shared memory bytes = (2 * BLOCK_M + 4 * BLOCK_N) * HEAD_DIM * 2
//             (Q and dO tiles + double-buffered K and V tiles, 16-bit elements).
//   Strides in elements, head-dim stride 1, 16-byte aligned rows; lse_log2/delta are
//   [batch * num_heads_q][stats_stride] fp32 with stats_stride a multiple of BLOCK_M.
//
// Tiling. Warp w owns query rows [w * WARP_M, (w + 1) * WARP_M), MT = WARP_M / 16 m16 tiles. Key tiles
// are visited from last to first with K/V double-buffered by cp.async (one __syncthreads per tile):
//   S = Q K^T, dP = dO V^T   fp32 accumulators; Q/dO fragments kept in registers when they fit in 16
//                            registers each, else re-read by ldmatrix; K/V fragments by ldmatrix;
//   dS                       in registers, rounded to 16 bits as the A operand of
//   dQ += dS K               K by ldmatrix.trans (no transpose).
// Epilogue: dq * scale is staged through the warp's own Q rows so the stores are 16-byte row-contiguous.

#include "mma_sm80.cuh"

template <typename T, int HEAD_DIM, int BLOCK_M, int BLOCK_N, int NUM_WARPS, bool CAUSAL>
__global__ void __launch_bounds__(NUM_WARPS * 32, 1) attention_bwd_dq(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, const T* __restrict__ dout,
    const float* __restrict__ lse_log2, const float* __restrict__ delta, T* __restrict__ dq,
    long long q_stride_b, long long q_stride_h, long long q_stride_s,
    long long k_stride_b, long long k_stride_h, long long k_stride_s,
    long long v_stride_b, long long v_stride_h, long long v_stride_s,
    long long do_stride_b, long long do_stride_h, long long do_stride_s,
    long long dq_stride_b, long long dq_stride_h, long long dq_stride_s,
    int num_heads_q, int group_size, int seqlen_q, int seqlen_k, int stats_stride, float scale_log2,
    float scale) {
    using namespace adaattn;
    using Swz = Swizzle<HEAD_DIM>;
    constexpr int NTHREADS = NUM_WARPS * 32;
    constexpr int WARP_M = BLOCK_M / NUM_WARPS;  // query rows per warp
    constexpr int MT = WARP_M / 16;              // m16 tiles per warp
    constexpr int NT = BLOCK_N / 8;              // n8 key tiles of S
    constexpr int DT = HEAD_DIM / 8;             // n8 tiles of dQ = 16-byte chunks per row
    constexpr int KD = HEAD_DIM / 16;            // k16 steps of Q K^T
    constexpr int KN = BLOCK_N / 16;             // k16 steps of dS K
    constexpr bool A_IN_REGS = MT * KD * 4 <= 16;
    static_assert(WARP_M % 16 == 0 && BLOCK_N % 16 == 0 && HEAD_DIM % 32 == 0 && HEAD_DIM <= 256, "bad tile");

    extern __shared__ __align__(128) unsigned char smem_raw[];
    T* sQ = reinterpret_cast<T*>(smem_raw);
    T* sdO = sQ + BLOCK_M * HEAD_DIM;
    T* sK = sdO + BLOCK_M * HEAD_DIM;     // 2 buffers of [BLOCK_N][HEAD_DIM]
    T* sV = sK + 2 * BLOCK_N * HEAD_DIM;  // 2 buffers of [BLOCK_N][HEAD_DIM]

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;
    const int g = lane >> 2;
    const int t = lane & 3;

    const int num_m_blocks = (seqlen_q + BLOCK_M - 1) / BLOCK_M;
    const int bh = blockIdx.x / num_m_blocks;
    const int h = bh % num_heads_q;
    const int b = bh / num_heads_q;
    int m_block = blockIdx.x % num_m_blocks;
    if (CAUSAL) m_block = num_m_blocks - 1 - m_block;
    const int m_start = m_block * BLOCK_M;
    const int diag = seqlen_k - seqlen_q;

    const int h_kv = h / group_size;
    const T* k_ptr = k + b * k_stride_b + h_kv * k_stride_h;
    const T* v_ptr = v + b * v_stride_b + h_kv * v_stride_h;
    T* dq_ptr = dq + b * dq_stride_b + h * dq_stride_h;

    int n_blocks = (seqlen_k + BLOCK_N - 1) / BLOCK_N;
    if (CAUSAL) {
        const int last_key = min(m_start + BLOCK_M, seqlen_q) - 1 + diag;
        if (last_key < 0) {
            // No row of the block sees a key: dq = 0.
            for (int idx = tid; idx < BLOCK_M * DT; idx += NTHREADS) {
                const int row = m_start + idx / DT;
                if (row < seqlen_q)
                    *reinterpret_cast<uint4*>(dq_ptr + row * dq_stride_s + (idx % DT) * 8) = make_uint4(0, 0, 0, 0);
            }
            return;
        }
        n_blocks = min(n_blocks, last_key / BLOCK_N + 1);
    }

    // Prologue: Q and dO, then the last K/V tile, as two cp.async groups.
    copy_tile_async<BLOCK_M, HEAD_DIM, NTHREADS>(sQ, q + b * q_stride_b + h * q_stride_h, q_stride_s, m_start, seqlen_q,
                                                 tid);
    copy_tile_async<BLOCK_M, HEAD_DIM, NTHREADS>(sdO, dout + b * do_stride_b + h * do_stride_h, do_stride_s, m_start,
                                                 seqlen_q, tid);
    cp_async_commit();
    copy_tile_async<BLOCK_N, HEAD_DIM, NTHREADS>(sK, k_ptr, k_stride_s, (n_blocks - 1) * BLOCK_N, seqlen_k, tid);
    copy_tile_async<BLOCK_N, HEAD_DIM, NTHREADS>(sV, v_ptr, v_stride_s, (n_blocks - 1) * BLOCK_N, seqlen_k, tid);
    cp_async_commit();

    // ldmatrix lane roles as in attention_fwd.cu: a_lane for A operands (and B through .trans of a
    // row-major [k][n] tile), b_lane for B operands of a row-major [n][k] tile.
    const int a_lane = 2 * Swz::offset(lane & 15, lane >> 4);
    const int b_lane = 2 * Swz::offset((lane & 7) | ((lane >> 4) << 3), (lane >> 3) & 1);
    const int warp_row = warp * WARP_M;
    const unsigned q_lane_addr = smem_u32(sQ) + warp_row * HEAD_DIM * 2 + a_lane;
    const unsigned do_lane_addr = smem_u32(sdO) + warp_row * HEAD_DIM * 2 + a_lane;

    // Per-row statistics (rows padded to stats_stride: no bounds check).
    const long long stats = (long long)bh * stats_stride + m_start + warp_row;
    float row_lse[MT][2], row_delta[MT][2];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            row_lse[mt][r] = lse_log2[stats + mt * 16 + g + r * 8];
            row_delta[mt][r] = delta[stats + mt * 16 + g + r * 8];
        }

    float acc_dq[MT][DT][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_dq[mt][dt][e] = 0.f;
    unsigned q_frag[A_IN_REGS ? MT : 1][A_IN_REGS ? KD : 1][4];
    unsigned do_frag[A_IN_REGS ? MT : 1][A_IN_REGS ? KD : 1][4];
    if constexpr (A_IN_REGS) {
        cp_async_wait<1>();
        __syncthreads();
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int kd = 0; kd < KD; ++kd) {
                ldmatrix_x4(q_frag[mt][kd], Swz::ldsm_addr(q_lane_addr, mt * 16, 2 * kd));
                ldmatrix_x4(do_frag[mt][kd], Swz::ldsm_addr(do_lane_addr, mt * 16, 2 * kd));
            }
    }

    for (int it = 0; it < n_blocks; ++it) {
        const int n_block = n_blocks - 1 - it;
        const int buf = it & 1;
        // Tile n_block has landed for every thread, and every warp is done with the other buffer.
        cp_async_wait<0>();
        __syncthreads();
        if (n_block > 0) {
            const int next = (buf ^ 1) * BLOCK_N * HEAD_DIM;
            copy_tile_async<BLOCK_N, HEAD_DIM, NTHREADS>(sK + next, k_ptr, k_stride_s, (n_block - 1) * BLOCK_N,
                                                         seqlen_k, tid);
            copy_tile_async<BLOCK_N, HEAD_DIM, NTHREADS>(sV + next, v_ptr, v_stride_s, (n_block - 1) * BLOCK_N,
                                                         seqlen_k, tid);
            cp_async_commit();
        }
        const unsigned k_tile = smem_u32(sK + buf * BLOCK_N * HEAD_DIM);
        const unsigned v_tile = smem_u32(sV + buf * BLOCK_N * HEAD_DIM);

        // S = Q K^T and dP = dO V^T for this warp's rows and the BLOCK_N keys of the tile.
        float acc_s[MT][NT][4];
        float acc_dp[MT][NT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    acc_s[mt][nt][e] = 0.f;
                    acc_dp[mt][nt][e] = 0.f;
                }
#pragma unroll
        for (int kd = 0; kd < KD; ++kd) {
            unsigned aq[MT][4], ao[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                if constexpr (A_IN_REGS) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        aq[mt][e] = q_frag[mt][kd][e];
                        ao[mt][e] = do_frag[mt][kd][e];
                    }
                } else {
                    ldmatrix_x4(aq[mt], Swz::ldsm_addr(q_lane_addr, mt * 16, 2 * kd));
                    ldmatrix_x4(ao[mt], Swz::ldsm_addr(do_lane_addr, mt * 16, 2 * kd));
                }
            }
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                unsigned bk[4], bv[4];
                ldmatrix_x4(bk, Swz::ldsm_addr(k_tile + b_lane, np * 16, 2 * kd));
                ldmatrix_x4(bv, Swz::ldsm_addr(v_tile + b_lane, np * 16, 2 * kd));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_16816<T>(acc_s[mt][2 * np], aq[mt], bk[0], bk[1]);
                    mma_16816<T>(acc_s[mt][2 * np + 1], aq[mt], bk[2], bk[3]);
                    mma_16816<T>(acc_dp[mt][2 * np], ao[mt], bv[0], bv[1]);
                    mma_16816<T>(acc_dp[mt][2 * np + 1], ao[mt], bv[2], bv[3]);
                }
            }
        }

        // Element mask only on tiles reaching past the ragged key end or (CAUSAL) past the first key
        // hidden from the block's first row.
        const int key_end = n_block * BLOCK_N + BLOCK_N;
        if (key_end > seqlen_k || (CAUSAL && key_end - 1 > m_start + diag)) {
            const int key0 = n_block * BLOCK_N + 2 * t;
#pragma unroll
            for (int mt = 0; mt < MT; ++mt)
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int e = 0; e < 4; ++e) {
                        const int row = m_start + warp_row + mt * 16 + g + (e >> 1) * 8;
                        const int col = key0 + nt * 8 + (e & 1);
                        if (col >= seqlen_k || (CAUSAL && col > row + diag)) acc_s[mt][nt][e] = neg_inf();
                    }
        }

        // dS = P * (dP - delta), P = exp2(S * scale_log2 - lse_log2); rows g (e < 2) and g + 8 (e >= 2).
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const float p = fast_exp2(fmaf(acc_s[mt][nt][e], scale_log2, -row_lse[mt][e >> 1]));
                    acc_dp[mt][nt][e] = p * (acc_dp[mt][nt][e] - row_delta[mt][e >> 1]);
                }

        // dQ += dS K. The C fragments of n8 tiles 2kn, 2kn+1 are the A fragment of k16 step kn; K rows
        // are the k dimension: ldmatrix.trans.
        const unsigned kt_lane_addr = k_tile + a_lane;
#pragma unroll
        for (int kn = 0; kn < KN; ++kn) {
            unsigned a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                a[mt][0] = pack2<T>(acc_dp[mt][2 * kn][0], acc_dp[mt][2 * kn][1]);
                a[mt][1] = pack2<T>(acc_dp[mt][2 * kn][2], acc_dp[mt][2 * kn][3]);
                a[mt][2] = pack2<T>(acc_dp[mt][2 * kn + 1][0], acc_dp[mt][2 * kn + 1][1]);
                a[mt][3] = pack2<T>(acc_dp[mt][2 * kn + 1][2], acc_dp[mt][2 * kn + 1][3]);
            }
#pragma unroll
            for (int dp = 0; dp < DT / 2; ++dp) {
                unsigned bk[4];
                ldmatrix_x4_trans(bk, Swz::ldsm_addr(kt_lane_addr, kn * 16, 2 * dp));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_16816<T>(acc_dq[mt][2 * dp], a[mt], bk[0], bk[1]);
                    mma_16816<T>(acc_dq[mt][2 * dp + 1], a[mt], bk[2], bk[3]);
                }
            }
        }
    }

    // Epilogue: dq * scale staged in this warp's own Q rows (no other warp reads them), then 16-byte
    // row-contiguous stores of the rows below seqlen_q.
    __syncwarp();
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const int row_local = warp_row + mt * 16 + g + r * 8;
#pragma unroll
            for (int dt = 0; dt < DT; ++dt)
                *reinterpret_cast<unsigned*>(sQ + Swz::offset(row_local, dt) + 2 * t) =
                    pack2<T>(acc_dq[mt][dt][2 * r] * scale, acc_dq[mt][dt][2 * r + 1] * scale);
        }
    __syncwarp();
#pragma unroll
    for (int i = 0; i < WARP_M * DT / 32; ++i) {
        const int idx = lane + i * 32;
        const int row_local = warp_row + idx / DT;
        const int c = idx % DT;
        const int row = m_start + row_local;
        if (row < seqlen_q)
            *reinterpret_cast<uint4*>(dq_ptr + row * dq_stride_s + c * 8) =
                *reinterpret_cast<const uint4*>(sQ + Swz::offset(row_local, c));
    }
}
