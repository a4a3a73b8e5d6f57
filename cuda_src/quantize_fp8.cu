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
//   `rows_per_split` keys to partial sums / maxima / minima in `partial` [B*Hkv][num_splits][4][D]; the last
//   block of a head to finish (ticket from counters[bh], zero on entry, reset on exit) combines the partials
//   in split order. Deterministic, one pass over K and V, no second launch.
//
// quantize_fp8_qkv<T, D, KEY_TILE, K_BLOCK, ROTATE>: every e4m3 tensor in one launch, three kinds of blocks by
// blockIdx.x:
//   [0, nq)          Q tile of 128 rows of one listed query head: row_bias[i] = q[i] . kbar (kbar = stats[0]: the
//                    shift the attention kernel adds back to lse), y = q H / sqrt(D) (ROTATE), one scale per tile
//                    sq = amax|y| / 448, qq = e4m3(y * 448 / amax).
//   [nq, nq + nk)    K block of K_BLOCK keys (the attention kernel's BLOCK_N / K_PARTS, at most 128: a block
//                    is held in registers, and 224 keys took 180 of them, one block per SM and 25% of the
//                    launch's speed) of one kv head: y = (k - kbar) H / sqrt(D), same scaling into kq, sk.
//   [nq + nk, ...)   V: 16 keys x 8 channels per thread, loaded as 16 row vectors and written transposed in
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

// Eight 16-bit values of one 16-byte chunk as fp32.
template <typename T>
__device__ __forceinline__ void unpack8(const uint4& raw, float (&x)[8]) {
    const float2 a = unpack2<T>(raw.x), b = unpack2<T>(raw.y), c = unpack2<T>(raw.z), d = unpack2<T>(raw.w);
    x[0] = a.x, x[1] = a.y, x[2] = b.x, x[3] = b.y, x[4] = c.x, x[5] = c.y, x[6] = d.x, x[7] = d.y;
}

// In-place y <- y H / sqrt(8 CHUNKS) for a row spread over CHUNKS consecutive lanes, lane chunk c holding
// elements 8c .. 8c + 7 (fast Walsh-Hadamard transform: index bits 0-2 inside the thread, the others
// across lanes by shuffles; every lane of the warp takes part).
template <int CHUNKS>
__device__ __forceinline__ void hadamard_row(float (&y)[8], int c) {
#pragma unroll
    for (int m = 1; m < 8; m <<= 1)
#pragma unroll
        for (int e = 0; e < 8; ++e)
            if (!(e & m)) {
                const float a = y[e], b = y[e + m];
                y[e] = a + b;
                y[e + m] = a - b;
            }
#pragma unroll
    for (int m = 1; m < CHUNKS; m <<= 1)
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            const float other = __shfl_xor_sync(0xffffffffu, y[e], m);
            y[e] = (c & m) ? other - y[e] : y[e] + other;
        }
    const float norm = rsqrtf(8.f * CHUNKS);
#pragma unroll
    for (int e = 0; e < 8; ++e) y[e] *= norm;
}

// One Q or K tile of TILE rows (x at row 0 of its head): all loads issued before any use, the tile amax
// by warp shuffles and one shared-memory exchange, 8-byte e4m3 stores (a warp writes 2-4 whole rows).
template <typename T, int HEAD_DIM, int TILE, bool IS_K, bool ROTATE>
__device__ __forceinline__ void quantize_tile(const T* __restrict__ x, long long stride_s, int seqlen, int blk,
                                              const float* __restrict__ k_mean, unsigned char* __restrict__ xq,
                                              float* __restrict__ scale, float* __restrict__ row_bias,
                                              float* warp_max) {
    constexpr int CHUNKS = HEAD_DIM / 8;
    constexpr int ROW_STEP = QUANT_THREADS / CHUNKS;
    constexpr int ITERS = TILE / ROW_STEP;
    static_assert(TILE % ROW_STEP == 0, "whole row steps per tile");
    const int c = threadIdx.x % CHUNKS, r0 = threadIdx.x / CHUNKS;
    const int row_base = blk * TILE + r0;

    uint4 raw[ITERS];
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
        const int row = row_base + i * ROW_STEP;
        raw[i] = row < seqlen ? __ldg(reinterpret_cast<const uint4*>(x + row * stride_s + c * 8))
                              : make_uint4(0, 0, 0, 0);
    }
    float mean[8];
#pragma unroll
    for (int e = 0; e < 8; ++e) mean[e] = k_mean[c * 8 + e];

    float y[ITERS][8];
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
        const int row = row_base + i * ROW_STEP;
        unpack8<T>(raw[i], y[i]);
        if (IS_K) {
#pragma unroll
            for (int e = 0; e < 8; ++e) y[i][e] = row < seqlen ? y[i][e] - mean[e] : 0.f;
        } else {
            // row . mean over the CHUNKS lanes of the row (consecutive lanes, xor stays inside them).
            float dot = 0.f;
#pragma unroll
            for (int e = 0; e < 8; ++e) dot = fmaf(y[i][e], mean[e], dot);
#pragma unroll
            for (int m = 1; m < CHUNKS; m <<= 1) dot += __shfl_xor_sync(0xffffffffu, dot, m);
            if (c == 0) row_bias[row] = dot;
        }
        if (ROTATE) hadamard_row<CHUNKS>(y[i], c);
#pragma unroll
        for (int e = 0; e < 8; ++e) amax = fmaxf(amax, fabsf(y[i][e]));
    }
#pragma unroll
    for (int off = 16; off > 0; off >>= 1) amax = fmaxf(amax, __shfl_xor_sync(0xffffffffu, amax, off));
    if (threadIdx.x % 32 == 0) warp_max[threadIdx.x / 32] = amax;
    __syncthreads();
    amax = 0.f;
#pragma unroll
    for (int w = 0; w < QUANT_THREADS / 32; ++w) amax = fmaxf(amax, warp_max[w]);
    const float inv = amax > 0.f ? E4M3_MAX / amax : 1.f;
    if (threadIdx.x == 0) scale[blk] = amax > 0.f ? amax / E4M3_MAX : 1.f;

    unsigned char* out = xq + (long long)row_base * HEAD_DIM + c * 8;
#pragma unroll
    for (int i = 0; i < ITERS; ++i)
        *reinterpret_cast<uint2*>(out + i * ROW_STEP * HEAD_DIM) =
            make_uint2(pack4_e4m3(y[i][0] * inv, y[i][1] * inv, y[i][2] * inv, y[i][3] * inv),
                       pack4_e4m3(y[i][4] * inv, y[i][5] * inv, y[i][6] * inv, y[i][7] * inv));
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
    constexpr int ROW_STEP = QUANT_THREADS / CHUNKS;
    constexpr int UNROLL = 4;  // 8 independent 16-byte loads in flight per thread
    constexpr int GROUPS = QUANT_THREADS / HEAD_DIM;
    __shared__ float red[4][ROW_STEP][HEAD_DIM];
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
    for (int row0 = split * rows_per_split + r0; row0 < row_end; row0 += UNROLL * ROW_STEP) {
        uint4 kr[UNROLL], vr[UNROLL];
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const int row = min(row0 + u * ROW_STEP, row_end - 1);  // repeats a row: harmless for max/min
            kr[u] = row % K_MEAN_STRIDE == 0 ? __ldg(reinterpret_cast<const uint4*>(k_ptr + row * k_stride_s))
                                             : make_uint4(0, 0, 0, 0);
            vr[u] = __ldg(reinterpret_cast<const uint4*>(v_ptr + row * v_stride_s));
        }
#pragma unroll
        for (int u = 0; u < UNROLL; ++u) {
            const float keep = row0 + u * ROW_STEP < row_end ? 1.f : 0.f;
            float x[8], y[8];
            unpack8<T>(kr[u], x);
            unpack8<T>(vr[u], y);
#pragma unroll
            for (int e = 0; e < 8; ++e) {
                ksum[e] = fmaf(keep, x[e], ksum[e]);
                vsum[e] = fmaf(keep, y[e], vsum[e]);
                vmax[e] = fmaxf(vmax[e], y[e]);
                vmin[e] = fminf(vmin[e], y[e]);
            }
        }
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        red[0][r0][c * 8 + e] = ksum[e];
        red[1][r0][c * 8 + e] = vsum[e];
        red[2][r0][c * 8 + e] = vmax[e];
        red[3][r0][c * 8 + e] = vmin[e];
    }
    __syncthreads();
    // 4 * HEAD_DIM column results of this split, 2 (D = 128) or 1 (D = 64) per thread.
    float* part = partial + ((long long)bh * num_splits + split) * 4 * HEAD_DIM;
    for (int idx = threadIdx.x; idx < 4 * HEAD_DIM; idx += QUANT_THREADS) {
        const int kind = idx / HEAD_DIM, d = idx % HEAD_DIM;
        float acc = red[kind][0][d];
        for (int r = 1; r < ROW_STEP; ++r) {
            const float x = red[kind][r][d];
            acc = kind < 2 ? acc + x : kind == 2 ? fmaxf(acc, x) : fminf(acc, x);
        }
        part[idx] = acc;
    }

    // Last block of this head: combine the partials (split order, then the GROUPS lanes in order).
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
    const int nq = q_tiles * num_heads_list * batch, nk = k_blocks * num_heads_kv * batch;
    const long long plane = (long long)batch * num_heads_kv * HEAD_DIM;
    int block = blockIdx.x;

    if (block < nq) {
        const int blk = block % q_tiles, bh = block / q_tiles;
        const int b = bh / num_heads_list, h = heads[bh % num_heads_list];
        const long long bhq = (long long)b * num_heads_q + h;
        const long long bhk = (long long)b * num_heads_kv + h / (num_heads_q / num_heads_kv);
        quantize_tile<T, HEAD_DIM, Q_TILE, false, ROTATE>(
            q + b * q_stride_b + h * q_stride_h, q_stride_s, seqlen_q, blk, stats + bhk * HEAD_DIM,
            qq + bhq * seqlen_q_pad * HEAD_DIM, sq + bhq * q_tiles, row_bias + bhq * seqlen_q_pad, warp_max);
        return;
    }
    block -= nq;
    if (block < nk) {
        const int blk = block % k_blocks, bh = block / k_blocks;
        const int b = bh / num_heads_kv, h = bh % num_heads_kv;
        const long long bhk = bh;
        quantize_tile<T, HEAD_DIM, K_BLOCK, true, ROTATE>(
            k + b * k_stride_b + h * k_stride_h, k_stride_s, seqlen_k, blk, stats + bhk * HEAD_DIM,
            kq + bhk * seqlen_k_pad * HEAD_DIM, sk + bhk * k_blocks, nullptr, warp_max);
        return;
    }
    block -= nk;
    const int v_blocks = (seqlen_k_pad + 16 * V_GROUPS - 1) / (16 * V_GROUPS);
    const int blk = block % v_blocks, bh = block / v_blocks;
    const int b = bh / num_heads_kv, h = bh % num_heads_kv;
    const int c = threadIdx.x % CHUNKS;
    // Lanes of one 16-key group are consecutive: chunk fastest, so a warp's 16 loads each read whole rows.
    const int key0 = (blk * V_GROUPS + threadIdx.x / CHUNKS) * 16;
    if (key0 >= seqlen_k_pad) return;
    quantize_v_group<T, HEAD_DIM>(v + b * v_stride_b + h * v_stride_h, v_stride_s, seqlen_k, key0, c,
                                  stats + plane + (long long)bh * HEAD_DIM,
                                  stats + 3 * plane + (long long)bh * HEAD_DIM,
                                  vt + (long long)bh * HEAD_DIM * seqlen_k_pad);
}
