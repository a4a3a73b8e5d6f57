// Quantisation of attention inputs to e4m3 for attention_fwd_fp8_sm90.cu (sm_89+: cvt ... e4m3x2).
// Three kernels, launched in this order on one stream (adaattn_core/cuda_fp8.py):
//
// quantize_fp8_stats<T, D>: per (b, kv head, split of `rows_per_split` keys) partial column sums of K and
//   column maxima of |V|:  k_sum[b,hk,s,d] = sum_j k[b,hk,j,d],  v_amax[b,hk,s,d] = max_j |v[b,hk,j,d]|.
//   grid.x = num_splits * num_heads_kv * batch (split fastest), block 256, no dynamic shared memory.
//   Splitting the keys over blocks keeps the SMs busy; the consumers add the partials in a fixed order
//   (deterministic, no atomics).
//
// quantize_fp8_rows<T, D, BLOCK, IS_K, ROTATE>: rows of Q (or K) in blocks of BLOCK rows per head, one
//   fp32 scale per block:  y = x - mean_j k[j] (IS_K: softmax-invariant, removes the shared bias that would
//   otherwise dominate the block amax; for Q the kernel instead writes row_bias[b,h,i] = q[i] . mean_j k[j],
//   the shift the attention kernel adds back to lse),  y = y H / sqrt(D) (ROTATE: H the Sylvester Hadamard
//   matrix, applied to Q and K alike so Q K^T is unchanged; spreads outlier entries over the row, which
//   halves the fp8 error on FlashAttention-3's outlier test),  scale = amax|y| / 448,
//   xq = e4m3(y * (448 / amax)), rows past seqlen written as zeros so the attention kernel loads whole
//   tiles. scale = 1 for an all-zero block. Output xq [B, H, S', D] bytes (S' = S rounded up to BLOCK),
//   scales [B, H, S' / BLOCK], row_bias (Q only) [B, H, S'].
//   grid.x = (S' / BLOCK) * num_heads_list * batch for the heads in `heads`; block 256.
//
// quantize_fp8_vt<T, D, KEYS>: V per channel, transposed:  sv[b,hk,d] = amax_j |v[b,hk,j,d]| / 448,
//   vt[b,hk,d,pos(j)] = e4m3(v[b,hk,j,d] * 448 / amax), keys past Sk zero, vt [B, Hkv, D, Sk'] bytes.
//   pos permutes keys inside each 32-key chunk (see attention_fwd_fp8_sm90.cu): key 16 h + r (r < 16) goes
//   to 16 h + 4 ((r % 8) / 2) + 2 (r / 8) + r % 2, which lets P V use the S accumulators as A fragments.
//   grid.x = (Sk' / KEYS) * num_heads_kv * batch; block 256; the tile is transposed through shared memory.
//
// Strides of the 16-bit inputs are in elements, head-dim stride 1, 16-byte aligned rows.

#include "mma_sm80.cuh"

namespace adaattn {

constexpr int QUANT_THREADS = 256;

// Four fp32 values rounded (nearest even, saturating at +-448) to e4m3, element 0 in the low byte.
__device__ __forceinline__ unsigned pack4_e4m3(float x0, float x1, float x2, float x3) {
    unsigned short lo, hi;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(lo) : "f"(x1), "f"(x0));
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(hi) : "f"(x3), "f"(x2));
    return (unsigned)lo | (unsigned)hi << 16;
}

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

}  // namespace adaattn

template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(adaattn::QUANT_THREADS) quantize_fp8_stats(
    const T* __restrict__ k, const T* __restrict__ v,
    long long k_stride_b, long long k_stride_h, long long k_stride_s,
    long long v_stride_b, long long v_stride_h, long long v_stride_s,
    int num_heads_kv, int seqlen_k, int rows_per_split, int num_splits,
    float* __restrict__ k_sum, float* __restrict__ v_amax) {
    using namespace adaattn;
    constexpr int CHUNKS = HEAD_DIM / 8;
    constexpr int ROW_STEP = QUANT_THREADS / CHUNKS;
    __shared__ float red_sum[ROW_STEP][HEAD_DIM];
    __shared__ float red_max[ROW_STEP][HEAD_DIM];

    const int split = blockIdx.x % num_splits;
    const int bh = blockIdx.x / num_splits;
    const int b = bh / num_heads_kv, h = bh % num_heads_kv;
    const int c = threadIdx.x % CHUNKS, r0 = threadIdx.x / CHUNKS;
    const int row_end = min(seqlen_k, (split + 1) * rows_per_split);
    const T* k_ptr = k + b * k_stride_b + h * k_stride_h + c * 8;
    const T* v_ptr = v + b * v_stride_b + h * v_stride_h + c * 8;

    float sum[8] = {}, amax[8] = {};
    for (int row = split * rows_per_split + r0; row < row_end; row += ROW_STEP) {
        float x[8], y[8];
        unpack8<T>(*reinterpret_cast<const uint4*>(k_ptr + row * k_stride_s), x);
        unpack8<T>(*reinterpret_cast<const uint4*>(v_ptr + row * v_stride_s), y);
#pragma unroll
        for (int e = 0; e < 8; ++e) {
            sum[e] += x[e];
            amax[e] = fmaxf(amax[e], fabsf(y[e]));
        }
    }
#pragma unroll
    for (int e = 0; e < 8; ++e) {
        red_sum[r0][c * 8 + e] = sum[e];
        red_max[r0][c * 8 + e] = amax[e];
    }
    __syncthreads();
    if (threadIdx.x < HEAD_DIM) {
        float s = 0.f, m = 0.f;
        for (int r = 0; r < ROW_STEP; ++r) {
            s += red_sum[r][threadIdx.x];
            m = fmaxf(m, red_max[r][threadIdx.x]);
        }
        const long long o = ((long long)bh * num_splits + split) * HEAD_DIM + threadIdx.x;
        k_sum[o] = s;
        v_amax[o] = m;
    }
}

template <typename T, int HEAD_DIM, int BLOCK, bool IS_K, bool ROTATE>
__global__ void __launch_bounds__(adaattn::QUANT_THREADS) quantize_fp8_rows(
    const T* __restrict__ x, long long stride_b, long long stride_h, long long stride_s,
    const int* __restrict__ heads, int num_heads_list, int num_heads, int group_size, int seqlen,
    const float* __restrict__ k_col_sum, int num_splits, int seqlen_k,
    unsigned char* __restrict__ xq, float* __restrict__ scales, float* __restrict__ row_bias) {
    using namespace adaattn;
    constexpr int CHUNKS = HEAD_DIM / 8;
    constexpr int ROW_STEP = QUANT_THREADS / CHUNKS;
    constexpr int ITERS = BLOCK / ROW_STEP;
    constexpr float E4M3_MAX = 448.f;
    static_assert(BLOCK % ROW_STEP == 0, "unsupported block for this head dim");
    __shared__ float warp_max[QUANT_THREADS / 32];

    const int num_blocks = (seqlen + BLOCK - 1) / BLOCK;
    const int blk = blockIdx.x % num_blocks;
    const int bh = blockIdx.x / num_blocks;
    const int b = bh / num_heads_list, h = heads[bh % num_heads_list];
    const int c = threadIdx.x % CHUNKS, r0 = threadIdx.x / CHUNKS;
    const long long bh_full = (long long)b * num_heads + h;

    // Mean over keys of this head's K head, this lane's 8 columns.
    const long long bh_kv = (long long)b * (num_heads / group_size) + h / group_size;
    float mean[8] = {};
    for (int s = 0; s < num_splits; ++s)
#pragma unroll
        for (int e = 0; e < 8; ++e) mean[e] += k_col_sum[(bh_kv * num_splits + s) * HEAD_DIM + c * 8 + e];
#pragma unroll
    for (int e = 0; e < 8; ++e) mean[e] /= (float)seqlen_k;

    const T* ptr = x + b * stride_b + h * stride_h + c * 8;
    float y[ITERS][8];
    float amax = 0.f;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
        const int row = blk * BLOCK + r0 + i * ROW_STEP;
        if (row < seqlen) {
            unpack8<T>(*reinterpret_cast<const uint4*>(ptr + row * stride_s), y[i]);
        } else {
#pragma unroll
            for (int e = 0; e < 8; ++e) y[i][e] = 0.f;
        }
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
            if (c == 0) row_bias[bh_full * num_blocks * BLOCK + row] = dot;
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
    if (threadIdx.x == 0) scales[bh_full * num_blocks + blk] = amax > 0.f ? amax / E4M3_MAX : 1.f;

    unsigned char* out = xq + (bh_full * num_blocks * BLOCK + blk * BLOCK + r0) * HEAD_DIM + c * 8;
#pragma unroll
    for (int i = 0; i < ITERS; ++i) {
        const uint2 packed = make_uint2(pack4_e4m3(y[i][0] * inv, y[i][1] * inv, y[i][2] * inv, y[i][3] * inv),
                                        pack4_e4m3(y[i][4] * inv, y[i][5] * inv, y[i][6] * inv, y[i][7] * inv));
        *reinterpret_cast<uint2*>(out + i * ROW_STEP * HEAD_DIM) = packed;
    }
}

template <typename T, int HEAD_DIM, int KEYS>
__global__ void __launch_bounds__(adaattn::QUANT_THREADS) quantize_fp8_vt(
    const T* __restrict__ v, long long stride_b, long long stride_h, long long stride_s,
    int num_heads_kv, int seqlen_k, int seqlen_k_pad, const float* __restrict__ col_amax, int num_splits,
    unsigned char* __restrict__ vt, float* __restrict__ sv) {
    using namespace adaattn;
    constexpr int CHUNKS = HEAD_DIM / 8;
    constexpr int ROW_STEP = QUANT_THREADS / CHUNKS;
    constexpr float E4M3_MAX = 448.f;
    constexpr int LINE = KEYS + 16;  // padded smem row: 16-byte aligned, staggers the banks of the byte writes
    static_assert(KEYS % 32 == 0 && KEYS % ROW_STEP == 0, "unsupported key tile");
    __shared__ float inv_scale[HEAD_DIM];
    __shared__ __align__(16) unsigned char tile[HEAD_DIM * LINE];

    const int num_tiles = seqlen_k_pad / KEYS;
    const int tile_idx = blockIdx.x % num_tiles;
    const int bh = blockIdx.x / num_tiles;
    const int b = bh / num_heads_kv, h = bh % num_heads_kv;
    const int key0 = tile_idx * KEYS;

    if (threadIdx.x < HEAD_DIM) {
        float amax = 0.f;
        for (int s = 0; s < num_splits; ++s)
            amax = fmaxf(amax, col_amax[((long long)bh * num_splits + s) * HEAD_DIM + threadIdx.x]);
        inv_scale[threadIdx.x] = amax > 0.f ? E4M3_MAX / amax : 1.f;
        if (tile_idx == 0) sv[(long long)bh * HEAD_DIM + threadIdx.x] = amax > 0.f ? amax / E4M3_MAX : 1.f;
    }
    __syncthreads();

    const int c = threadIdx.x % CHUNKS, r0 = threadIdx.x / CHUNKS;
    const T* ptr = v + b * stride_b + h * stride_h + c * 8;
#pragma unroll
    for (int i = 0; i < KEYS / ROW_STEP; ++i) {
        const int key = r0 + i * ROW_STEP;
        float x[8] = {};
        if (key0 + key < seqlen_k) unpack8<T>(*reinterpret_cast<const uint4*>(ptr + (key0 + key) * stride_s), x);
        const int r = key % 16;
        const int pos = (key & ~15) + 4 * ((r % 8) / 2) + 2 * (r / 8) + r % 2;
#pragma unroll
        for (int e = 0; e < 8; e += 4) {
            const unsigned q = pack4_e4m3(x[e] * inv_scale[c * 8 + e], x[e + 1] * inv_scale[c * 8 + e + 1],
                                          x[e + 2] * inv_scale[c * 8 + e + 2], x[e + 3] * inv_scale[c * 8 + e + 3]);
#pragma unroll
            for (int j = 0; j < 4; ++j) tile[(c * 8 + e + j) * LINE + pos] = (unsigned char)(q >> (8 * j));
        }
    }
    __syncthreads();

    unsigned char* out = vt + (long long)bh * HEAD_DIM * seqlen_k_pad + key0;
    for (int idx = threadIdx.x; idx < HEAD_DIM * (KEYS / 16); idx += QUANT_THREADS) {
        const int d = idx / (KEYS / 16), cc = idx % (KEYS / 16);
        *reinterpret_cast<uint4*>(out + (long long)d * seqlen_k_pad + cc * 16) =
            *reinterpret_cast<const uint4*>(tile + d * LINE + cc * 16);
    }
}
