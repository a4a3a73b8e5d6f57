// Fused attention forward (FlashAttention-2 algorithm) on mma.sync tensor cores, sm_80 and newer.
//
// Computes, for batch b, query head h, query row i (g = num_heads_q / num_heads_kv = group_size):
//     out[b,h,i,:] = sum_j softmax_j(scale * q[b,h,i,:] . k[b,h/g,j,:]) * v[b,h/g,j,:]
//     lse[b,h,i]   = log(sum_j exp(scale * q[b,h,i,:] . k[b,h/g,j,:]))        (natural log, fp32)
// GQA/MQA read the shared K/V head in place. fp32 accumulation throughout; out has the input dtype.
//
// Masking. Causal is bottom-right aligned (flash-attn >= 2.1): row i may attend key j iff
// j <= i + (seqlen_k - seqlen_q). Rows with no admissible key (causal, i < seqlen_q - seqlen_k) get
// out = 0 and lse = -inf. Ragged edges: K/V rows past seqlen_k are zero-filled in shared memory and
// their scores set to -inf; Q rows past seqlen_q are computed on zeros and never stored. CAUSAL
// skips the key tiles past the block's last admissible key, and a block with no admissible key at
// all writes zeros / -inf and exits. Only tiles crossing the diagonal or the key end are masked.
//
// Launch.
//   grid.x  = ceil(seqlen_q / BLOCK_M) * num_heads_launch * batch; the m-block index varies fastest so the
//             blocks sharing one K/V head run together (L2 reuse). CAUSAL visits m-blocks in reverse
//             so the longest rows start first.
//   block.x = NUM_WARPS * 32.
//   head_index = int32[num_heads_launch] query heads to compute (one launch per policy group), or
//             nullptr for all num_heads_q heads in order (num_heads_launch = num_heads_q).
//   dynamic shared memory bytes = (BLOCK_M + 4 * BLOCK_N) * HEAD_DIM * 2
//             (Q tile + double-buffered K and V tiles, 16-bit elements; no static shared memory).
//   Strides are in elements, the head-dim stride is 1, pointers are 16-byte aligned and every stride
//   is a multiple of 8 elements (all 16-byte cp.async).
//
// Tiling. A thread block owns BLOCK_M query rows of one (b, h); warp w owns rows
// [w * BLOCK_M / NUM_WARPS, (w + 1) * BLOCK_M / NUM_WARPS), i.e. MT = BLOCK_M / NUM_WARPS / 16
// m16 tiles (MT = 2 halves the shared-memory reads per MMA compared with MT = 1). Key tiles of
// BLOCK_N rows are visited from last to first, so the tiles that need the element mask (ragged key
// end, causal diagonal) come first; while tile n is computed, tile n - 1's K and V stream into the
// other buffer with cp.async (one __syncthreads per tile). Per tile and warp:
//   S = Q K^T     mma.sync m16n8k16, fp32 accumulators; K fragments via ldmatrix; Q fragments
//                 loaded once into registers when they fit in 32 of them, else re-read from smem;
//   softmax       online, in registers: row max/sum reduced over the 4 lanes of a quad, the scale
//                 folded into exp2 (one FFMA + ex2 per score), O rescaled by 2^(m_old - m_new);
//   O += P V      P rounded to 16 bits in registers and used directly as the A operand (the
//                 m16n8k16 C layout of two n8 tiles is the A layout of one k16 step); V fragments
//                 via ldmatrix.trans, so V needs no transpose.
// Shared tiles use the XOR swizzle of mma_sm80.cuh: cp.async stores and ldmatrix loads are
// bank-conflict free. Epilogue: O / l is staged through the warp's own (now dead) Q rows in shared
// memory so the global stores are 16-byte and row-contiguous; lse is written per row.

#include "mma_sm80.cuh"

template <typename T, int HEAD_DIM, int BLOCK_M, int BLOCK_N, int NUM_WARPS, bool CAUSAL>
__global__ void __launch_bounds__(NUM_WARPS * 32, 1) attention_fwd(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    T* __restrict__ out, float* __restrict__ lse,
    long long q_stride_b, long long q_stride_h, long long q_stride_s,
    long long k_stride_b, long long k_stride_h, long long k_stride_s,
    long long v_stride_b, long long v_stride_h, long long v_stride_s,
    long long o_stride_b, long long o_stride_h, long long o_stride_s,
    const int* __restrict__ head_index, int num_heads_launch,
    int num_heads_q, int group_size, int seqlen_q, int seqlen_k, float scale_log2) {
    using namespace adaattn;
    using Swz = Swizzle<HEAD_DIM>;
    constexpr int NTHREADS = NUM_WARPS * 32;
    constexpr int WARP_M = BLOCK_M / NUM_WARPS;  // query rows per warp
    constexpr int MT = WARP_M / 16;              // m16 tiles per warp
    constexpr int NT = BLOCK_N / 8;              // n8 tiles of S
    constexpr int DT = HEAD_DIM / 8;             // n8 tiles of O = 16-byte chunks per row
    constexpr int KD = HEAD_DIM / 16;            // k16 steps of Q K^T
    constexpr int KN = BLOCK_N / 16;             // k16 steps of P V
    constexpr bool Q_IN_REGS = MT * KD * 4 <= 32;
    static_assert(WARP_M % 16 == 0 && BLOCK_N % 16 == 0 && HEAD_DIM % 32 == 0, "unsupported tile shape");
    static_assert(HEAD_DIM <= 256, "unsupported head dim");

    extern __shared__ __align__(128) unsigned char smem_raw[];
    T* sQ = reinterpret_cast<T*>(smem_raw);
    T* sK = sQ + BLOCK_M * HEAD_DIM;      // 2 buffers of [BLOCK_N][HEAD_DIM]
    T* sV = sK + 2 * BLOCK_N * HEAD_DIM;  // 2 buffers of [BLOCK_N][HEAD_DIM]

    const int tid = threadIdx.x;
    const int lane = tid & 31;
    const int warp = tid >> 5;

    const int num_m_blocks = (seqlen_q + BLOCK_M - 1) / BLOCK_M;
    const int bh = blockIdx.x / num_m_blocks;
    const int b = bh / num_heads_launch;
    // A launch covers the heads of one policy group: head_index lists them (nullptr: all heads in order).
    const int h = head_index ? head_index[bh % num_heads_launch] : bh % num_heads_launch;
    int m_block = blockIdx.x % num_m_blocks;
    if (CAUSAL) m_block = num_m_blocks - 1 - m_block;
    const int m_start = m_block * BLOCK_M;
    const int diag = seqlen_k - seqlen_q;  // row i may attend keys j <= i + diag

    const int h_kv = h / group_size;
    const T* q_ptr = q + b * q_stride_b + h * q_stride_h;
    const T* k_ptr = k + b * k_stride_b + h_kv * k_stride_h;
    const T* v_ptr = v + b * v_stride_b + h_kv * v_stride_h;
    T* o_ptr = out + b * o_stride_b + h * o_stride_h;
    float* lse_ptr = lse + ((long long)b * num_heads_q + h) * seqlen_q;

    int n_blocks = (seqlen_k + BLOCK_N - 1) / BLOCK_N;
    if (CAUSAL) {
        // Largest key any row of this block may attend; tiles past it are skipped entirely.
        const int last_key = min(m_start + BLOCK_M, seqlen_q) - 1 + diag;
        if (last_key < 0) {
            // Every row of the block is fully masked: out = 0, lse = -inf.
            write_masked_rows<BLOCK_M, HEAD_DIM, NTHREADS>(o_ptr, o_stride_s, lse_ptr, m_start, seqlen_q, tid);
            return;
        }
        n_blocks = min(n_blocks, last_key / BLOCK_N + 1);
    }

    // Prologue: Q, then the last K/V tile, as two cp.async groups.
    copy_tile_async<BLOCK_M, HEAD_DIM, NTHREADS>(sQ, q_ptr, q_stride_s, m_start, seqlen_q, tid);
    cp_async_commit();
    copy_tile_async<BLOCK_N, HEAD_DIM, NTHREADS>(sK, k_ptr, k_stride_s, (n_blocks - 1) * BLOCK_N, seqlen_k, tid);
    copy_tile_async<BLOCK_N, HEAD_DIM, NTHREADS>(sV, v_ptr, v_stride_s, (n_blocks - 1) * BLOCK_N, seqlen_k, tid);
    cp_async_commit();

    // ldmatrix lane roles. A operand (Q) and V^T: lanes 0-15 address rows 0-15 of chunk c, lanes
    // 16-31 rows 0-15 of chunk c+1, giving a0..a3 = (r0-7,c), (r8-15,c), (r0-7,c+1), (r8-15,c+1).
    // K (B operand of Q K^T): matrices (keys 0-7, c), (keys 0-7, c+1), (keys 8-15, c), (keys 8-15,
    // c+1) = {b0, b1} of key tile n8 #0 then of n8 #1.
    const int a_lane = 2 * Swz::offset(lane & 15, lane >> 4);
    const int k_lane = 2 * Swz::offset((lane & 7) | ((lane >> 4) << 3), (lane >> 3) & 1);
    const int warp_row = warp * WARP_M;
    const int g = lane >> 2;  // accumulator row within an m16 tile (and g + 8)
    const int t = lane & 3;   // accumulator column pair within an n8 tile
    const unsigned q_lane_addr = smem_u32(sQ) + warp_row * HEAD_DIM * 2 + a_lane;

    float acc_o[MT][DT][4];
    float row_max[MT][2];  // running max of raw scores (unscaled)
    float row_sum[MT][2];  // running sum of exp, partial over this lane's columns
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_o[mt][dt][e] = 0.f;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            row_max[mt][r] = neg_inf();
            row_sum[mt][r] = 0.f;
        }
    }
    unsigned q_frag[Q_IN_REGS ? MT : 1][Q_IN_REGS ? KD : 1][4];
    if constexpr (Q_IN_REGS) {
        cp_async_wait<1>();
        __syncthreads();
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int kd = 0; kd < KD; ++kd)
                ldmatrix_x4(q_frag[mt][kd], Swz::ldsm_addr(q_lane_addr, mt * 16, 2 * kd));
    }

    // Key tiles are visited from n_blocks - 1 down to 0, so the tiles that need the element mask
    // (ragged key end, causal diagonal) come first.
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
        const unsigned k_lane_addr = smem_u32(sK + buf * BLOCK_N * HEAD_DIM) + k_lane;
        const unsigned v_lane_addr = smem_u32(sV + buf * BLOCK_N * HEAD_DIM) + a_lane;

        // S = Q K^T for this warp's rows and the BLOCK_N keys of the tile.
        float acc_s[MT][NT][4];
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) acc_s[mt][nt][e] = 0.f;
#pragma unroll
        for (int kd = 0; kd < KD; ++kd) {
            unsigned a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                if constexpr (Q_IN_REGS) {
#pragma unroll
                    for (int e = 0; e < 4; ++e) a[mt][e] = q_frag[mt][kd][e];
                } else {
                    ldmatrix_x4(a[mt], Swz::ldsm_addr(q_lane_addr, mt * 16, 2 * kd));
                }
            }
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                unsigned bk[4];
                ldmatrix_x4(bk, Swz::ldsm_addr(k_lane_addr, np * 16, 2 * kd));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_16816<T>(acc_s[mt][2 * np], a[mt], bk[0], bk[1]);
                    mma_16816<T>(acc_s[mt][2 * np + 1], a[mt], bk[2], bk[3]);
                }
            }
        }

        // Mask only tiles that reach past the ragged key end or (CAUSAL) past the first key hidden
        // from this block's first row.
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

        // Online softmax. Row r of an m16 tile holds accumulator elements {2r, 2r+1} of every n8 tile
        // and is spread over the 4 lanes of a quad. p = 2^(s * scale_log2 - max * scale_log2).
#pragma unroll
        for (int mt = 0; mt < MT; ++mt)
#pragma unroll
            for (int r = 0; r < 2; ++r) {
                float mx = row_max[mt][r];
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
                    mx = fmaxf(mx, fmaxf(acc_s[mt][nt][2 * r], acc_s[mt][nt][2 * r + 1]));
                mx = quad_max(mx);
                // A row with no admissible key yet keeps max = -inf; use 0 so -inf - -inf never occurs.
                const float mx_scaled = mx == neg_inf() ? 0.f : mx * scale_log2;
                const float corr = fast_exp2(row_max[mt][r] * scale_log2 - mx_scaled);
                row_max[mt][r] = mx;
                float sum = 0.f;
#pragma unroll
                for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                    for (int e = 2 * r; e < 2 * r + 2; ++e) {
                        const float p = fast_exp2(fmaf(acc_s[mt][nt][e], scale_log2, -mx_scaled));
                        acc_s[mt][nt][e] = p;
                        sum += p;
                    }
                row_sum[mt][r] = row_sum[mt][r] * corr + sum;
#pragma unroll
                for (int dt = 0; dt < DT; ++dt) {
                    acc_o[mt][dt][2 * r] *= corr;
                    acc_o[mt][dt][2 * r + 1] *= corr;
                }
            }

        // O += P V. The C fragments of n8 tiles 2kn and 2kn+1 are exactly the A fragment of k16 step kn.
#pragma unroll
        for (int kn = 0; kn < KN; ++kn) {
            unsigned a[MT][4];
#pragma unroll
            for (int mt = 0; mt < MT; ++mt) {
                a[mt][0] = pack2<T>(acc_s[mt][2 * kn][0], acc_s[mt][2 * kn][1]);
                a[mt][1] = pack2<T>(acc_s[mt][2 * kn][2], acc_s[mt][2 * kn][3]);
                a[mt][2] = pack2<T>(acc_s[mt][2 * kn + 1][0], acc_s[mt][2 * kn + 1][1]);
                a[mt][3] = pack2<T>(acc_s[mt][2 * kn + 1][2], acc_s[mt][2 * kn + 1][3]);
            }
#pragma unroll
            for (int dp = 0; dp < DT / 2; ++dp) {
                unsigned bv[4];
                ldmatrix_x4_trans(bv, Swz::ldsm_addr(v_lane_addr, kn * 16, 2 * dp));
#pragma unroll
                for (int mt = 0; mt < MT; ++mt) {
                    mma_16816<T>(acc_o[mt][2 * dp], a[mt], bv[0], bv[1]);
                    mma_16816<T>(acc_o[mt][2 * dp + 1], a[mt], bv[2], bv[3]);
                }
            }
        }
    }

    // Epilogue: finish the row sums over the quad, write lse, normalise O and stage it in this warp's
    // own Q rows (no other warp reads them) so the global stores are 16-byte and row-contiguous.
    constexpr float LN2 = 0.693147180559945309f;
    __syncwarp();
#pragma unroll
    for (int mt = 0; mt < MT; ++mt)
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float sum = quad_sum(row_sum[mt][r]);
            const float inv = sum > 0.f ? fast_rcp(sum) : 0.f;
            const int row_local = warp_row + mt * 16 + g + r * 8;
            const int row = m_start + row_local;
            if (t == 0 && row < seqlen_q)
                lse_ptr[row] = sum > 0.f ? (row_max[mt][r] * scale_log2 + fast_log2(sum)) * LN2 : neg_inf();
#pragma unroll
            for (int dt = 0; dt < DT; ++dt)
                *reinterpret_cast<unsigned*>(sQ + Swz::offset(row_local, dt) + 2 * t) =
                    pack2<T>(acc_o[mt][dt][2 * r] * inv, acc_o[mt][dt][2 * r + 1] * inv);
        }
    __syncwarp();
#pragma unroll
    for (int i = 0; i < WARP_M * DT / 32; ++i) {
        const int idx = lane + i * 32;
        const int row_local = warp_row + idx / DT;
        const int c = idx % DT;
        const int row = m_start + row_local;
        if (row < seqlen_q)
            *reinterpret_cast<uint4*>(o_ptr + row * o_stride_s + c * 8) =
                *reinterpret_cast<const uint4*>(sQ + Swz::offset(row_local, c));
    }
}
