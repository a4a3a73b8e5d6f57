// Low-rank attention forward (adaattn_core/lowrank.py's approximation) fused into one kernel, mma.sync, sm_80+.
//
// Positions. Query row i sits at position i + q_offset and key j at j + k_offset on a grid of `padded`
// positions cut into blocks of W = 64 and segments of g = W * fine positions (lowrank.py's Geometry). A query at
// position p in block beta of segment c attends, in one softmax (natural units, s = scale * q . k + bias):
//   near    the W keys of block beta, bias key_bias[p_k] (0, or -inf for padding and sinks); CAUSAL: p_k <= p;
//   fine    the block means kf[beta'] of segment c's other blocks, bias log_nf[beta'] (log of the block's key count);
//           CAUSAL: beta' < beta only, else beta' != beta;
//   coarse  the segment means kc[c'], bias log_nc[c']; CAUSAL: c' < c, else c' != c;
//   sinks   the exact keys ks[s] at positions sink_pos[s] (-1: none); CAUSAL: sink_pos[s] <= p;
// with the values vp, vf, vc, vs alike:
//     out[b,h,i,:] = sum over that key set of softmax(s) * value,  lse[b,h,i] = log(sum exp(s)) (fp32).
// Rows with no visible key get out = 0 and lse = -inf. The same scores as lowrank._all_rows, but each block
// gathers its key set into shared memory instead of materialising score buffers per part: O(S (W + t + nc + ns) D)
// work, memory traffic of Q, O and the key set once per block.
//
// Launch.
//   grid.x  = (padded / W) * num_heads * batch, the block index fastest (the blocks of one head share its
//             landmarks in L2).
//   block.x = 128: four warps of 16 query rows.
//   dynamic shared memory = 3 * 64 * HEAD_DIM * 2 + 64 * 8 bytes: the Q tile, one K and one V tile of 64 keys
//             (16-bit, swizzled as mma_sm80.cuh's Swizzle), the tile's key biases (log2 units) and positions.
//   q, out: [B][Hq][Sq][D] with element strides (head-dim stride 1, 16-byte aligned rows); heads[n] are the query
//   heads of prepared head n; kp, vp [B][n][padded][D], kf, vf [B][n][padded / W][D], kc, vc [B][n][segments][D],
//   ks, vs [B][n][sinks][D] (fp32, contiguous: lowrank._keys' arrays), key_bias [n][padded], log_nf [n][padded / W],
//   log_nc [n][segments] (fp32), sink_pos [n][sinks] (int64); lse [B][Hq][Sq] contiguous.
//
// Per block: the Q tile, then the key set as tiles of 64 slots (the near block; then the fine landmarks, the
// coarse ones and the sinks, the last tile padded with -inf slots), each loaded by all threads (fp32 rounded to
// T on the way: no cp.async, the tiles are small and several blocks share an SM), then per warp S = Q K^T, the
// bias and mask, the online softmax and O += P V as in attention_fwd.cu.

#include "mma_sm80.cuh"

namespace adaattn {

// 8 consecutive fp32 as the 16 bytes of 8 T values.
template <typename T>
__device__ __forceinline__ uint4 round8(const float* __restrict__ src) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(src));
    const float4 b = __ldg(reinterpret_cast<const float4*>(src) + 1);
    return make_uint4(pack2<T>(a.x, a.y), pack2<T>(a.z, a.w), pack2<T>(b.x, b.y), pack2<T>(b.z, b.w));
}

}  // namespace adaattn

template <typename T, int HEAD_DIM, bool CAUSAL>
__global__ void __launch_bounds__(128, 1) lowrank_fwd(
    const T* __restrict__ q, long long q_stride_b, long long q_stride_h, long long q_stride_s,
    const float* __restrict__ kp, const float* __restrict__ vp, const float* __restrict__ key_bias,
    const float* __restrict__ kf, const float* __restrict__ vf, const float* __restrict__ log_nf,
    const float* __restrict__ kc, const float* __restrict__ vc, const float* __restrict__ log_nc,
    const float* __restrict__ ks, const float* __restrict__ vs, const long long* __restrict__ sink_pos,
    const int* __restrict__ heads, T* __restrict__ out, long long o_stride_b, long long o_stride_h,
    long long o_stride_s, float* __restrict__ lse, int num_heads, int num_heads_q, int seqlen_q, int padded,
    int fine, int segments, int sinks, int q_offset, float scale_log2) {
    using namespace adaattn;
    using Swz = Swizzle<HEAD_DIM>;
    constexpr int W = 64;        // block of positions = query rows per thread block = key slots per tile
    constexpr int NTHREADS = 128;
    constexpr int NT = W / 8;    // n8 tiles of S
    constexpr int DT = HEAD_DIM / 8;
    constexpr int KD = HEAD_DIM / 16;
    constexpr int KN = W / 16;
    constexpr int CHUNKS = HEAD_DIM / 8;  // 16-byte chunks of a 16-bit row
    constexpr float LOG2E = 1.4426950408889634f;
    static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "Q fragments held in registers: D = 64 or 128");

    extern __shared__ __align__(128) unsigned char smem_raw[];
    T* sQ = reinterpret_cast<T*>(smem_raw);
    T* sK = sQ + W * HEAD_DIM;
    T* sV = sK + W * HEAD_DIM;
    float* s_bias = reinterpret_cast<float*>(sV + W * HEAD_DIM);  // per key slot, log2 units (-inf: hidden)
    int* s_pos = reinterpret_cast<int*>(s_bias + W);              // per key slot: position for the causal test

    const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    const int blocks = padded / W;
    const int beta = blockIdx.x % blocks;
    const int hn = (blockIdx.x / blocks) % num_heads;
    const int b = blockIdx.x / blocks / num_heads;
    const int h = heads[hn];
    const int seg = beta / fine;
    const int p0 = beta * W;  // position of the block's first row and first near key

    // Q tile: rows at positions p0 .. p0 + 63, zeros where no query row sits.
    const T* q_ptr = q + b * q_stride_b + h * q_stride_h;
#pragma unroll
    for (int i = 0; i < W * CHUNKS / NTHREADS; ++i) {
        const int idx = tid + i * NTHREADS, r = idx / CHUNKS, c = idx % CHUNKS;
        const int row = p0 + r - q_offset;
        const bool valid = row >= 0 && row < seqlen_q;
        *reinterpret_cast<uint4*>(sQ + Swz::offset(r, c)) =
            valid ? __ldg(reinterpret_cast<const uint4*>(q_ptr + row * q_stride_s + c * 8)) : make_uint4(0, 0, 0, 0);
    }

    const long long bh = (long long)b * num_heads + hn;
    const int far_slots = fine + segments + sinks;
    const int tiles = 1 + (far_slots + W - 1) / W;

    // Key slot `slot` of tile `tile`: its fp32 K and V rows (nullptr: an empty slot), bias (natural units) and
    // position (INT_MIN: no causal test; landmarks are masked by their bias instead).
    auto slot_source = [&](int tile, int slot, const float*& k_row, const float*& v_row, float& bias, int& pos) {
        constexpr int NONE = -2147483647 - 1;
        k_row = v_row = nullptr;
        bias = neg_inf();
        pos = NONE;
        if (tile == 0) {
            const int p = p0 + slot;
            k_row = kp + (bh * padded + p) * HEAD_DIM;
            v_row = vp + (bh * padded + p) * HEAD_DIM;
            bias = key_bias[(long long)hn * padded + p];
            pos = p;
            return;
        }
        const int f = (tile - 1) * W + slot;
        if (f < fine) {
            const int blk = seg * fine + f;
            k_row = kf + (bh * blocks + blk) * HEAD_DIM;
            v_row = vf + (bh * blocks + blk) * HEAD_DIM;
            if (CAUSAL ? blk < beta : blk != beta) bias = log_nf[(long long)hn * blocks + blk];
        } else if (f < fine + segments) {
            const int c = f - fine;
            k_row = kc + (bh * segments + c) * HEAD_DIM;
            v_row = vc + (bh * segments + c) * HEAD_DIM;
            if (CAUSAL ? c < seg : c != seg) bias = log_nc[(long long)hn * segments + c];
        } else if (f < far_slots) {
            const int s = f - fine - segments;
            const long long sp = sink_pos[(long long)hn * sinks + s];
            k_row = ks + (bh * sinks + s) * HEAD_DIM;
            v_row = vs + (bh * sinks + s) * HEAD_DIM;
            if (sp >= 0) {
                bias = 0.f;
                if (CAUSAL) pos = (int)sp;
            }
        }
    };

    const int a_lane = 2 * Swz::offset(lane & 15, lane >> 4);
    const int k_lane = 2 * Swz::offset((lane & 7) | ((lane >> 4) << 3), (lane >> 3) & 1);
    const int warp_row = warp * 16;
    const int g = lane >> 2, t = lane & 3;
    const unsigned q_lane_addr = smem_u32(sQ) + warp_row * HEAD_DIM * 2 + a_lane;
    const unsigned k_lane_addr = smem_u32(sK) + k_lane;
    const unsigned v_lane_addr = smem_u32(sV) + a_lane;
    const int row_pos[2] = {p0 + warp_row + g, p0 + warp_row + g + 8};

    float acc_o[DT][4];
#pragma unroll
    for (int dt = 0; dt < DT; ++dt)
#pragma unroll
        for (int e = 0; e < 4; ++e) acc_o[dt][e] = 0.f;
    float row_max[2] = {neg_inf(), neg_inf()};  // log2 units, bias included
    float row_sum[2] = {0.f, 0.f};
    unsigned q_frag[KD][4];

    for (int tile = 0; tile < tiles; ++tile) {
        __syncthreads();  // every warp is done with the previous tile
        // Two chunks in flight per thread: O, S and the Q fragments are live here (fully unrolled, ptxas held
        // every load at once and spilled at D = 128).
#pragma unroll 2
        for (int i = 0; i < W * CHUNKS / NTHREADS; ++i) {
            const int idx = tid + i * NTHREADS, r = idx / CHUNKS, c = idx % CHUNKS;
            const float *k_row, *v_row;
            float bias;
            int pos;
            slot_source(tile, r, k_row, v_row, bias, pos);
            const uint4 zero = make_uint4(0, 0, 0, 0);
            *reinterpret_cast<uint4*>(sK + Swz::offset(r, c)) = k_row ? round8<T>(k_row + c * 8) : zero;
            *reinterpret_cast<uint4*>(sV + Swz::offset(r, c)) = v_row ? round8<T>(v_row + c * 8) : zero;
            if (c == 0) {
                s_bias[r] = bias * LOG2E;
                s_pos[r] = pos;
            }
        }
        __syncthreads();
        if (tile == 0) {
#pragma unroll
            for (int kd = 0; kd < KD; ++kd) ldmatrix_x4(q_frag[kd], Swz::ldsm_addr(q_lane_addr, 0, 2 * kd));
        }

        float acc_s[NT][4];
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_s[nt][e] = 0.f;
#pragma unroll
        for (int kd = 0; kd < KD; ++kd)
#pragma unroll
            for (int np = 0; np < NT / 2; ++np) {
                unsigned bk[4];
                ldmatrix_x4(bk, Swz::ldsm_addr(k_lane_addr, np * 16, 2 * kd));
                mma_16816<T>(acc_s[2 * np], q_frag[kd], bk[0], bk[1]);
                mma_16816<T>(acc_s[2 * np + 1], q_frag[kd], bk[2], bk[3]);
            }

        // y = scale * q . k in log2 units plus the slot's bias; -inf where the slot is hidden from the row.
#pragma unroll
        for (int nt = 0; nt < NT; ++nt)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int col = nt * 8 + 2 * t + (e & 1);
                const float y = fmaf(acc_s[nt][e], scale_log2, s_bias[col]);
                acc_s[nt][e] = (CAUSAL && s_pos[col] > row_pos[e >> 1]) ? neg_inf() : y;
            }

        // Online softmax over the quad's lanes, as attention_fwd.cu (the scale is already in y).
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = row_max[r];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(acc_s[nt][2 * r], acc_s[nt][2 * r + 1]));
            mx = quad_max(mx);
            const float m = mx == neg_inf() ? 0.f : mx;  // no visible key yet: keep -inf - -inf from occurring
            const float corr = fast_exp2(row_max[r] - m);
            row_max[r] = mx;
            float sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 2 * r; e < 2 * r + 2; ++e) {
                    const float p = fast_exp2(acc_s[nt][e] - m);
                    acc_s[nt][e] = p;
                    sum += p;
                }
            row_sum[r] = row_sum[r] * corr + sum;
#pragma unroll
            for (int dt = 0; dt < DT; ++dt) {
                acc_o[dt][2 * r] *= corr;
                acc_o[dt][2 * r + 1] *= corr;
            }
        }

        // O += P V (the C fragments of n8 tiles 2kn, 2kn + 1 are the A fragment of k16 step kn).
#pragma unroll
        for (int kn = 0; kn < KN; ++kn) {
            const unsigned a[4] = {pack2<T>(acc_s[2 * kn][0], acc_s[2 * kn][1]),
                                   pack2<T>(acc_s[2 * kn][2], acc_s[2 * kn][3]),
                                   pack2<T>(acc_s[2 * kn + 1][0], acc_s[2 * kn + 1][1]),
                                   pack2<T>(acc_s[2 * kn + 1][2], acc_s[2 * kn + 1][3])};
#pragma unroll
            for (int dp = 0; dp < DT / 2; ++dp) {
                unsigned bv[4];
                ldmatrix_x4_trans(bv, Swz::ldsm_addr(v_lane_addr, kn * 16, 2 * dp));
                mma_16816<T>(acc_o[2 * dp], a, bv[0], bv[1]);
                mma_16816<T>(acc_o[2 * dp + 1], a, bv[2], bv[3]);
            }
        }
    }

    // Epilogue: lse and O / l per row, O staged in the warp's own Q rows for 16-byte row-contiguous stores.
    constexpr float LN2 = 0.693147180559945309f;
    T* o_ptr = out + b * o_stride_b + h * o_stride_h;
    float* lse_ptr = lse + ((long long)b * num_heads_q + h) * seqlen_q;
    __syncwarp();
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const float sum = quad_sum(row_sum[r]);
        const float inv = sum > 0.f ? fast_rcp(sum) : 0.f;
        const int row_local = warp_row + g + r * 8;
        const int row = p0 + row_local - q_offset;
        if (t == 0 && row >= 0 && row < seqlen_q)
            lse_ptr[row] = sum > 0.f ? (row_max[r] + fast_log2(sum)) * LN2 : neg_inf();
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
            *reinterpret_cast<unsigned*>(sQ + Swz::offset(row_local, dt) + 2 * t) =
                pack2<T>(acc_o[dt][2 * r] * inv, acc_o[dt][2 * r + 1] * inv);
    }
    __syncwarp();
#pragma unroll
    for (int i = 0; i < 16 * DT / 32; ++i) {
        const int idx = lane + i * 32;
        const int row_local = warp_row + idx / DT, c = idx % DT;
        const int row = p0 + row_local - q_offset;
        if (row >= 0 && row < seqlen_q)
            *reinterpret_cast<uint4*>(o_ptr + row * o_stride_s + c * 8) =
                *reinterpret_cast<const uint4*>(sQ + Swz::offset(row_local, c));
    }
}
