// Quantisation of attention inputs to e4m3 for attention_fwd_fp8_sm90.cu (sm_89+: cvt ... e4m3x2).
// Two launches on one stream (adaattn_core/cuda_fp8.py); together they read V twice, Q once, K 1 + 1/8 times
// and write one byte per element: V's per-channel scale must be complete before any V element is rounded.
// (16k tokens x 2048 x bf16: 64 MB per tensor, ~360 MB moved.)
//
// quantize_fp8_stats<T, D>: per (b, kv head) the statistics of K and V,
//     stats[0][bh][d] = mean_{j % 8 = 0} k[j,d]             (K smoothing: subtracting any vector from every key is
//                                                           softmax-invariant, so a mean over every 8th key does
//                                                           the job of the full mean and reads 1/8 of K)
//     stats[1][bh][d] = mean_j v[j,d]                       (V smoothing: the epilogue adds it back exactly)
//     stats[2][bh][d] = a / 448, stats[3][bh][d] = 448 / a  (a = max_j |v[j,d] - mean|; 1 and 1 if a = 0)
//   grid.x = num_splits * num_heads_kv * batch (split fastest), block 256. Each block reduces
//   `rows_per_split` keys, in steps of STATS_ROWS whose V rows and sampled K rows are all loaded before any is
//   used, to partial sums / maxima / minima in `partial` [B*Hkv][num_splits][4][D]; the last
//   block of a head to finish (ticket from counters[bh], zero on entry, reset on exit) combines the partials
//   in a fixed order. Deterministic, one pass over K and V, no second launch.
//
// quantize_fp8_qkv<T, D, KEY_TILE, K_BLOCK, ROTATE>: every e4m3 tensor in one launch, three kinds of blocks
// (nq + nk + nv of them) interleaved evenly over blockIdx.x:
//   Q (nq)           tile of 128 rows of one listed query head: row_bias[i] = q[i] . kbar (kbar = stats[0]: the
//                    shift the attention kernel adds back to lse), y = q H / sqrt(D) (ROTATE), one scale per tile
//                    sq = amax|y| / 448, qq = e4m3(y * 448 / amax). A row is spread over a lane pair, so the
//                    rotation runs in registers but for one shuffle stage.
//   K (nk)           block of K_BLOCK keys (the attention kernel's BLOCK_N / K_PARTS, at most 128: a block
//                    is held in registers: with the earlier 16-lane rows 224 keys took 180 of them, one block
//                    per SM and 25% of the launch's speed) of one kv head: y = (k - kbar) H / sqrt(D), same
//                    scaling into kq, sk.
//   V (nv)           16 keys x 8 channels per thread, loaded as 16 row vectors and written transposed in
//                    32-key chunks, [Sk' / 32][D][32] per head (a chunk is one k32 step of P V: the attention
//                    kernel loads it as a 32-byte-swizzled [D][32] operand, so a key tile is any whole number
//                    of chunks): vt[bh][j' / 32][d][j' % 32] = e4m3((v[j,d] - mean[d]) * 448 / a[d]), j' = pos(j).
//                    pos permutes keys inside each 16-key group (see attention_fwd_fp8_sm90.cu): key 16 h + r
//                    goes to 16 h + 4 ((r % 8) / 2) + 2 (r / 8) + r % 2, which lets P V use the S accumulators
//                    as A fragments. 16 * 256 / (D / 8) keys per block.
//   H is the Sylvester Hadamard matrix, applied to Q and K alike so Q K^T is unchanged; it spreads outlier
//   entries over the row (halves the fp8 error on FlashAttention-3's outlier test). Rows and keys past the
//   sequence are written as zeros (qq: Sq' = Sq rounded up to 128 rows; kq, vt: Sk' = Sk rounded up to
//   KEY_TILE), so the attention kernel loads whole tiles. Scale 1 for an all-zero tile. Block 256, no dynamic
//   smem.
//
// Strides of the 16-bit inputs are in elements, head-dim stride 1, 16-byte aligned rows.

#include "wgmma_sm90.cuh"

namespace adaattn {

constexpr int QUANT_THREADS = 256;
constexpr int Q_TILE = 128;  // rows per Q scale: the attention kernel's BLOCK_M
constexpr int V_CHUNK = 32;  // keys per line of V^T: one k32 step of the attention kernel's P V
constexpr float E4M3_MAX = 448.f;
constexpr int K_MEAN_STRIDE = 8;  // keys j % K_MEAN_STRIDE == 0 form the K mean (adaattn_core/precision.py too)
constexpr int STATS_ROWS = 256;   // keys per load step of the statistics kernel (FP8_STATS_ROWS in launch_config.py)

// Eight 16-bit values of one 16-byte chunk as fp32.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& raw, float (&x)[8]) {
    const float2 a = unpack2<T>(raw.x), b = unpack2<T>(raw.y), c = unpack2<T>(raw.z), d = unpack2<T>(raw.w);
    x[0] = a.x, x[1] = a.y, x[2] = b.x, x[3] = b.y, x[4] = c.x, x[5] = c.y, x[6] = d.x, x[7] = d.y;
}

// In-place y <- y H_D (unnormalised: the caller folds 1 / sqrt(D) into the tile scale) for a row held by a lane
// pair, the lane of `side` 0 or 1 holding elements 16 i + 8 side + e (i < D / 16, e < 8) at y[8 i + e].
// Element-index bits 0-2 and 4.. are inside the thread (fast Walsh-Hadamard butterflies on the local index),
// bit 3 is the lane: one shuffle stage for the whole row.
template <int N>
__device__ __forceinline__ void hadamard_pair(float (&y)[N], int side) {
#pragma unroll
    for (int m = 1; m < N; m <<= 1)
#pragma unroll
        for (int p = 0; p < N; ++p)
            if (!(p & m)) {
                const float a = y[p], b = y[p + m];
                y[p] = a + b;
                y[p + m] = a - b;
            }
    const float sign = side ? -1.f : 1.f;  // lane 0 keeps a + b, lane 1 takes a - b
#pragma unroll
    for (int p = 0; p < N; ++p) y[p] = fmaf(sign, y[p], __shfl_xor_sync(0xffffffffu, y[p], 1));
}

// One Q or K tile of TILE rows (x at row 0 of its head). A row is spread over a lane pair (the lane of `side` 0
// or 1: the 16-byte chunks 2 i + side, so a pair reads 32 contiguous bytes per load and the rotation needs one
// shuffle stage); the block's 128 lane pairs take one row each, those past TILE idle. All loads issued before
// any use, the tile amax by warp shuffles and one shared-memory exchange, 16-byte e4m3 stores. Rows past `seqlen`
// are written as zeros.
template <typename T, int HEAD_DIM, int TILE, bool IS_K, bool ROTATE>
__device__ __forceinline__ void quantize_tile(const T* __restrict__ x, long long stride_s, int seqlen, int blk,
                                              const float* __restrict__ k_mean, unsigned char* __restrict__ xq,
                                              float* __restrict__ scale, float* __restrict__ row_bias,
                                              float* warp_max) {
    constexpr int LANE_CHUNKS = HEAD_DIM / 16;  // 16-byte chunks per lane and row
    constexpr int N = 8 * LANE_CHUNKS;          // elements per lane and row
    static_assert(HEAD_DIM == 64 || HEAD_DIM == 128,
                  "a power-of-two row of whole 32-byte pieces per lane pair (the rotation, the pair swap)");
    static_assert(TILE <= QUANT_THREADS / 2, "one row per lane pair: Q_TILE and K_BLOCK (FP8_K_BLOCK_MAX) <= 128");
    const int side = threadIdx.x % 2, r0 = threadIdx.x / 2;
    const int row = blk * TILE + r0;
    const bool in_tile = r0 < TILE, valid = in_tile && row < seqlen;

    uint4 raw[LANE_CHUNKS];
#pragma unroll
    for (int j = 0; j < LANE_CHUNKS; ++j)
        raw[j] = valid ? __ldg(reinterpret_cast<const uint4*>(x + row * stride_s + (2 * j + side) * 8))
                       : make_uint4(0, 0, 0, 0);

    float y[N];
    float dot = 0.f;
#pragma unroll
    for (int j = 0; j < LANE_CHUNKS; ++j) {
        float v[8];
        unpack8<T>(raw[j], v);
        const float4 m0 = __ldg(reinterpret_cast<const float4*>(k_mean + (2 * j + side) * 8));
        const float4 m1 = __ldg(reinterpret_cast<const float4*>(k_mean + (2 * j + side) * 8 + 4));
        const float mean[8] = {m0.x, m0.y, m0.z, m0.w, m1.x, m1.y, m1.z, m1.w};
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            if (IS_K) v[e] = valid ? v[e] - mean[e] : 0.f;
            else dot = fmaf(v[e], mean[e], dot);
            y[8 * j + e] = v[e];
        }
    }
    if (!IS_K) {  // row . mean over the lane pair
        dot += __shfl_xor_sync(0xffffffffu, dot, 1);
        if (side == 0 && in_tile) row_bias[row] = dot;
    }
    if (ROTATE) hadamard_pair<N>(y, side);
    float amax = 0.f;
#pragma unroll
    for (int p = 0; p < N; ++p) amax = fmaxf(amax, fabsf(y[p]));
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = amax;
    __syncthreads();
    amax = 0.f;
#pragma unroll
    for (int w = 0; w < QUANT_THREADS / 32; ++w) amax = fmaxf(amax, warp_max[w]);
    // y is unnormalised when rotated: the stored scale carries the 1 / sqrt(D) of the orthonormal rotation.
    const float norm = ROTATE ? rsqrtf((float)HEAD_DIM) : 1.f;
    const float inv = amax > 0.f ? E4M3_MAX / amax : 1.f;
    if (threadIdx.x == 0) scale[blk] = amax > 0.f ? amax * norm / E4M3_MAX : 1.f;

    // e4m3 bytes of the lane's chunks (chunk 2 j + side in w[j]); the lanes of a pair swap one chunk per 32 bytes of
    // the row so that each stores 16 contiguous bytes and a pair writes whole 32-byte sectors per instruction.
    uint2 w[LANE_CHUNKS];
#pragma unroll
    for (int j = 0; j < LANE_CHUNKS; ++j) {
        const float* yj = y + 8 * j;
        w[j] = make_uint2(pack4_e4m3(yj[0] * inv, yj[1] * inv, yj[2] * inv, yj[3] * inv),
                          pack4_e4m3(yj[4] * inv, yj[5] * inv, yj[6] * inv, yj[7] * inv));
    }
    unsigned char* out = xq + (long long)row * HEAD_DIM + side * 16;
#pragma unroll
    for (int m = 0; m < LANE_CHUNKS / 2; ++m) {
        // Bytes 32 m .. 32 m + 31 hold chunks 4 m .. 4 m + 3: lane 0 has 4 m and 4 m + 2, lane 1 4 m + 1 and
        // 4 m + 3; lane 0 stores the first 16 bytes, lane 1 the second.
        const uint2 give = side ? w[2 * m] : w[2 * m + 1];
        const uint2 got = make_uint2(__shfl_xor_sync(0xffffffffu, give.x, 1), __shfl_xor_sync(0xffffffffu, give.y, 1));
        const uint4 line = side ? make_uint4(got.x, got.y, w[2 * m + 1].x, w[2 * m + 1].y)
                             : make_uint4(w[2 * m].x, w[2 * m].y, got.x, got.y);
        if (in_tile) *reinterpret_cast<uint4*>(out + m * 32) = line;
    }
}

// 16 keys x 8 channels of V (v at key 0, channel 0 of its head; vt at the head's first chunk): 16 row loads in
// flight, 8 transposed 16-byte stores (consecutive lanes of a key group write lines d 32 bytes apart; the
// lanes of the neighbouring key group the other half of the same lines).
template <typename T, int HEAD_DIM>
__device__ __forceinline__ void quantize_v_group(const T* __restrict__ v, long long stride_s, int seqlen_k,
                                                 int key0, int c, const float* __restrict__ mean,
                                                 const float* __restrict__ inv_scale, unsigned char* __restrict__ vt) {
    uint4 raw[16];
#pragma unroll
    for (int r = 0; r < 16; ++r)
        raw[r] = key0 + r < seqlen_k ? __ldg(reinterpret_cast<const uint4*>(v + (key0 + r) * stride_s + c * 8))
                                     : make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        const int d = c * 8 + e;
        const float m = mean[d], inv = inv_scale[d];
        float y[16];
#pragma unroll
        for (int r = 0; r < 16; ++r) {
            const unsigned word = e < 2 ? raw[r].x : e < 4 ? raw[r].y : e < 6 ? raw[r].z : raw[r].w;
            const float2 pair = unpack2<T>(word);
            y[r] = key0 + r < seqlen_k ? ((e & 1) ? pair.y : pair.x) - m : 0.f;
        }
        // Byte p of the group holds key r(p) = 8 ((p / 2) % 2) + 2 (p / 4) + p % 2 (the inverse of pos).
        unsigned w[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) {
            float z[4];
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const int p = 4 * q + i;
                z[i] = y[8 * ((p / 2) % 2) + 2 * (p / 4) + p % 2] * inv;
            }
            w[q] = pack4_e4m3(z[0], z[1], z[2], z[3]);
        }
        unsigned char* line = vt + ((long long)(key0 / V_CHUNK) * HEAD_DIM + d) * V_CHUNK + key0 % V_CHUNK;
        *reinterpret_cast<uint4*>(line) = make_uint4(w[0], w[1], w[2], w[3]);
    }
}

// V block `block` = bh * v_blocks + blk (block blk of kv head bh): 16 * QUANT_THREADS / (D / 8) keys of one kv
// head, a 16-key group per D / 8 consecutive threads (chunk fastest, so a warp's 16 loads each read whole rows).
template <typename T, int HEAD_DIM>
__device__ __forceinline__ void quantize_v_block(int block, int v_blocks, int num_heads_kv, int seqlen_k,
                                                 int seqlen_k_pad, const T* __restrict__ v, long long stride_b,
                                                 long long stride_h, long long stride_s,
                                                 const float* __restrict__ mean, const float* __restrict__ inv_scale,
                                                 unsigned char* __restrict__ vt) {
    constexpr int CHUNKS = HEAD_DIM / 8;
    constexpr int V_GROUPS = QUANT_THREADS / CHUNKS;
    const int blk = block % v_blocks, bh = block / v_blocks;
    const int b = bh / num_heads_kv, h = bh % num_heads_kv;
    const int key0 = (blk * V_GROUPS + threadIdx.x / CHUNKS) * 16;
    if (key0 >= seqlen_k_pad) return;
    quantize_v_group<T, HEAD_DIM>(v + b * stride_b + h * stride_h, stride_s, seqlen_k, key0, threadIdx.x % CHUNKS,
                                  mean + (long long)bh * HEAD_DIM, inv_scale + (long long)bh * HEAD_DIM,
                                  vt + (long long)bh * HEAD_DIM * seqlen_k_pad);
}

}  // namespace adaattn

template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(adaattn::QUANT_THREADS) quantize_fp8_stats(
    const T* __restrict__ k, const T* __restrict__ v,
    long long k_stride_b, long long k_stride_h, long long k_stride_s,
    long long v_stride_b, long long v_stride_h, long long v_stride_s,
    int num_heads_kv, int batch, int seqlen_k, int rows_per_split, int num_splits,
    float* __restrict__ partial, unsigned* __restrict__ counters, float* __restrict__ stats) {
    using namespace adaattn;
    constexpr int CHUNKS = HEAD_DIM / 8;
    constexpr int ROW_STEP = QUANT_THREADS / CHUNKS;    // rows a block covers per load
    constexpr int V_LOADS = STATS_ROWS / ROW_STEP;      // every row of a step in flight at once
    constexpr int K_LOADS = STATS_ROWS / K_MEAN_STRIDE / ROW_STEP;  // the step's sampled keys, spread alike
    constexpr int WARPS = QUANT_THREADS / 32;
    static_assert(K_LOADS >= 1 && STATS_ROWS % (K_MEAN_STRIDE * ROW_STEP) == 0, "whole sampled rows per step");
    __shared__ float red[4][WARPS][HEAD_DIM];
    __shared__ bool is_last;

    const int split = blockIdx.x % num_splits;
    const int bh = blockIdx.x / num_splits;
    const int b = bh / num_heads_kv, h = bh % num_heads_kv;
    const int c = threadIdx.x % CHUNKS, r0 = threadIdx.x / CHUNKS;
    const int row_end = min(seqlen_k, (split + 1) * rows_per_split);
    const T* k_ptr = k + b * k_stride_b + h * k_stride_h + c * 8;
    const T* v_ptr = v + b * v_stride_b + h * v_stride_h + c * 8;

    float ksum[8] = {}, vsum[8] = {}, vmax[8], vmin[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) vmax[e] = neg_inf(), vmin[e] = -neg_inf();
    for (int base = split * rows_per_split; base < row_end; base += STATS_ROWS) {
        const int step_end = min(row_end, base + STATS_ROWS);
        const int sample0 = (base + K_MEAN_STRIDE - 1) / K_MEAN_STRIDE * K_MEAN_STRIDE;  // first key j % 8 = 0
        uint4 vr[V_LOADS], kr[K_LOADS];
#pragma unroll
        for (int u = 0; u < K_LOADS; ++u) {
            const int row = sample0 + (r0 + u * ROW_STEP) * K_MEAN_STRIDE;
            kr[u] = row < step_end ? __ldg(reinterpret_cast<const uint4*>(k_ptr + row * k_stride_s))
                                   : make_uint4(0, 0, 0, 0);
        }
#pragma unroll
        for (int u = 0; u < V_LOADS; ++u) {
            // Rows past the step repeat the first row's values (harmless for max/min, weighted 0 in the sum):
            // only the first load clamps its row, the others are predicated, so that ptxas keeps the loads in
            // flight together (with every row clamped it placed each load just before its use).
            const int row = base + r0 + u * ROW_STEP;
            vr[u] = u == 0 || row < step_end
                        ? __ldg(reinterpret_cast<const uint4*>(v_ptr + min(row, step_end - 1) * v_stride_s))
                        : vr[0];
        }
#pragma unroll
        for (int u = 0; u < V_LOADS; ++u) {
            const float keep = base + r0 + u * ROW_STEP < step_end ? 1.f : 0.f;
            float y[8];
            unpack8<T>(vr[u], y);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                vsum[e] = fmaf(keep, y[e], vsum[e]);
                vmax[e] = fmaxf(vmax[e], y[e]);
                vmin[e] = fminf(vmin[e], y[e]);
            }
        }
#pragma unroll
        for (int u = 0; u < K_LOADS; ++u) {
            float x[8];
            unpack8<T>(kr[u], x);
#pragma unroll
            for (int e = 0; e < 8; ++e) ksum[e] += x[e];
        }
    }
    // Lanes of one warp that hold the same chunk (32 / CHUNKS rows) first, then the warps through shared memory.
#pragma unroll
    for (int off = CHUNKS; off < 32; off <<= 1)
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            ksum[e] += __shfl_xor_sync(0xffffffffu, ksum[e], off);
            vsum[e] += __shfl_xor_sync(0xffffffffu, vsum[e], off);
            vmax[e] = fmaxf(vmax[e], __shfl_xor_sync(0xffffffffu, vmax[e], off));
            vmin[e] = fminf(vmin[e], __shfl_xor_sync(0xffffffffu, vmin[e], off));
        }
    const int warp = threadIdx.x / 32;
    if (threadIdx.x % 32 < CHUNKS)
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            red[0][warp][c * 8 + e] = ksum[e];
            red[1][warp][c * 8 + e] = vsum[e];
            red[2][warp][c * 8 + e] = vmax[e];
            red[3][warp][c * 8 + e] = vmin[e];
        }
    __syncthreads();
    // 4 * HEAD_DIM column results of this split, 2 (D = 128) or 1 (D = 64) per thread.
    float* part = partial + ((long long)bh * num_splits + split) * 4 * HEAD_DIM;
    for (int idx = threadIdx.x; idx < 4 * HEAD_DIM; idx += QUANT_THREADS) {
        const int kind = idx / HEAD_DIM, d = idx % HEAD_DIM;
        float acc = red[kind][0][d];
        for (int w = 1; w < WARPS; ++w) {
            const float x = red[kind][w][d];
            acc = kind < 2 ? acc + x : kind == 2 ? fmaxf(acc, x) : fminf(acc, x);
        }
        part[idx] = acc;
    }

    // Last block of this head: combine the partials (thread group g takes splits g, g + GROUPS, ..., then the
    // GROUPS groups' results in order).
    constexpr int GROUPS = QUANT_THREADS / HEAD_DIM;
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) is_last = atomicAdd(counters + bh, 1u) == (unsigned)num_splits - 1;
    __syncthreads();
    if (!is_last) return;
    __threadfence();
    const int d = threadIdx.x % HEAD_DIM, g = threadIdx.x / HEAD_DIM;
    float s_k = 0.f, s_v = 0.f, mx = neg_inf(), mn = -neg_inf();
    const float* head = partial + (long long)bh * num_splits * 4 * HEAD_DIM + d;
#pragma unroll 4
    for (int s = g; s < num_splits; s += GROUPS) {
        const float* p = head + (long long)s * 4 * HEAD_DIM;
        s_k += __ldcg(p);
        s_v += __ldcg(p + HEAD_DIM);
        mx = fmaxf(mx, __ldcg(p + 2 * HEAD_DIM));
        mn = fminf(mn, __ldcg(p + 3 * HEAD_DIM));
    }
    red[0][g][d] = s_k, red[1][g][d] = s_v, red[2][g][d] = mx, red[3][g][d] = mn;
    __syncthreads();
    if (threadIdx.x < HEAD_DIM) {
        for (int i = 1; i < GROUPS; ++i) {
            s_k += red[0][i][d], s_v += red[1][i][d];
            mx = fmaxf(mx, red[2][i][d]), mn = fminf(mn, red[3][i][d]);
        }
        const int k_count = (seqlen_k + K_MEAN_STRIDE - 1) / K_MEAN_STRIDE;
        const float k_mean = k_count > 0 ? s_k / (float)k_count : 0.f;
        const float v_mean = seqlen_k > 0 ? s_v / (float)seqlen_k : 0.f;
        const float amax = seqlen_k > 0 ? fmaxf(mx - v_mean, v_mean - mn) : 0.f;
        const long long plane = (long long)batch * num_heads_kv * HEAD_DIM, o = (long long)bh * HEAD_DIM + d;
        stats[o] = k_mean;
        stats[plane + o] = v_mean;
        stats[2 * plane + o] = amax > 0.f ? amax / E4M3_MAX : 1.f;
        stats[3 * plane + o] = amax > 0.f ? E4M3_MAX / amax : 1.f;
        if (threadIdx.x == 0) counters[bh] = 0u;  // ready for the next call on this buffer
    }
}

template <typename T, int HEAD_DIM, int KEY_TILE, int K_BLOCK, bool ROTATE>
__global__ void __launch_bounds__(adaattn::QUANT_THREADS) quantize_fp8_qkv(
    const T* __restrict__ q, long long q_stride_b, long long q_stride_h, long long q_stride_s,
    const T* __restrict__ k, long long k_stride_b, long long k_stride_h, long long k_stride_s,
    const T* __restrict__ v, long long v_stride_b, long long v_stride_h, long long v_stride_s,
    const int* __restrict__ heads, int num_heads_list, int num_heads_q, int num_heads_kv, int batch,
    int seqlen_q, int seqlen_k, const float* __restrict__ stats,
    unsigned char* __restrict__ qq, float* __restrict__ sq, float* __restrict__ row_bias,
    unsigned char* __restrict__ kq, float* __restrict__ sk, unsigned char* __restrict__ vt) {
    using namespace adaattn;
    constexpr int CHUNKS = HEAD_DIM / 8;
    constexpr int V_GROUPS = QUANT_THREADS / CHUNKS;  // 16-key groups per V block
    __shared__ float warp_max[QUANT_THREADS / 32];

    static_assert(KEY_TILE % V_CHUNK == 0, "whole V^T chunks per key tile");
    static_assert(KEY_TILE % K_BLOCK == 0, "whole K scale blocks per key tile");
    const int q_tiles = (seqlen_q + Q_TILE - 1) / Q_TILE;
    const int seqlen_q_pad = q_tiles * Q_TILE;
    const int seqlen_k_pad = (seqlen_k + KEY_TILE - 1) / KEY_TILE * KEY_TILE;
    const int k_blocks = seqlen_k_pad / K_BLOCK;  // padding rows included: zeros, scale 1
    const int v_blocks = (seqlen_k_pad + 16 * V_GROUPS - 1) / (16 * V_GROUPS);
    const int nq = q_tiles * num_heads_list * batch, nk = k_blocks * num_heads_kv * batch;
    const long long nv = (long long)v_blocks * num_heads_kv * batch, n = nq + nk + nv;
    const long long plane = (long long)batch * num_heads_kv * HEAD_DIM;
    // The three kinds of blocks interleaved evenly over the grid (block b is V block k = floor(b nv / n) when
    // floor((b + 1) nv / n) > k, then the same between K and Q), so that every SM mixes the
    // shuffle- and ALU-heavy Q/K tiles with the load-heavy V blocks instead of running them in turn.
    const long long b_all = blockIdx.x, v_before = b_all * nv / n;
    if ((b_all + 1) * nv / n > v_before) {
        quantize_v_block<T, HEAD_DIM>((int)v_before, v_blocks, num_heads_kv, seqlen_k, seqlen_k_pad, v, v_stride_b,
                                      v_stride_h, v_stride_s, stats + plane, stats + 3 * plane, vt);
        return;
    }
    const long long m = b_all - v_before, k_before = m * nk / (nq + nk);
    if ((m + 1) * nk / (nq + nk) == k_before) {  // a Q tile
        const int block = (int)(m - k_before), blk = block % q_tiles, bh = block / q_tiles;
        const int b = bh / num_heads_list, h = heads[bh % num_heads_list];
        const long long bhq = (long long)b * num_heads_q + h;
        const long long bhk = (long long)b * num_heads_kv + h / (num_heads_q / num_heads_kv);
        quantize_tile<T, HEAD_DIM, Q_TILE, false, ROTATE>(
            q + b * q_stride_b + h * q_stride_h, q_stride_s, seqlen_q, blk, stats + bhk * HEAD_DIM,
            qq + bhq * seqlen_q_pad * HEAD_DIM, sq + bhq * q_tiles, row_bias + bhq * seqlen_q_pad, warp_max);
        return;
    }
    const int blk = (int)(k_before % k_blocks), bh = (int)(k_before / k_blocks);
    const int b = bh / num_heads_kv, h = bh % num_heads_kv;
    quantize_tile<T, HEAD_DIM, K_BLOCK, true, ROTATE>(
        k + b * k_stride_b + h * k_stride_h, k_stride_s, seqlen_k, blk, stats + (long long)bh * HEAD_DIM,
        kq + (long long)bh * seqlen_k_pad * HEAD_DIM, sk + (long long)bh * k_blocks, nullptr, warp_max);
}
