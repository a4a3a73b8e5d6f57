// Attention backward, pass 1 of 3: per-row statistics the fused gradient kernels read, sm_80 and newer.
//
// For batch b, query head h, query row i (rows are padded to stats_stride, a multiple of every BLOCK_M):
//     delta[b,h,i]    = sum_d dout[b,h,i,d] * out[b,h,i,d]        (fp32; 0 for padded rows)
//     lse_log2[b,h,i] = lse[b,h,i] * log2(e)                       (+inf for lse = -inf and padded rows)
//     dq_accum[b,h,i,:] = 0                                        (only when dq_accum is not null)
// lse_log2 = +inf makes every recomputed probability exp2(s * scale_log2 - lse_log2) exactly 0, so fully
// masked rows and padded rows contribute nothing and get dq = 0 without a branch in the main kernels.
// The padding lets those kernels load BLOCK_M statistics with unconditional 16-byte cp.async.
//
// Launch.
//   grid.x  = ceil(batch * num_heads_q * stats_stride / ROWS_PER_BLOCK), ROWS_PER_BLOCK = 256 / TPR.
//   block.x = 256; TPR (threads per row) = the power of two >= HEAD_DIM / 8, so a row is a group of
//             TPR lanes inside one warp, each loading one 16-byte chunk of dout and out.
//   No shared memory. Strides in elements; dout/out head-dim stride 1, 16-byte aligned rows.
//   lse_log2 / delta are [batch * num_heads_q][stats_stride] fp32, dq_accum
//   [batch * num_heads_q][stats_stride][HEAD_DIM] fp32, all contiguous.

#include "mma_sm80.cuh"

namespace adaattn {

// Eight 16-bit values (one 16-byte chunk) to fp32; returns sum_j a[j] * b[j].
template <typename T>
__device__ __forceinline__ float dot8(const uint4& a, const uint4& b) {
    const T* x = reinterpret_cast<const T*>(&a);
    const T* y = reinterpret_cast<const T*>(&b);
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < 8; ++j) sum = fmaf(static_cast<float>(x[j]), static_cast<float>(y[j]), sum);
    return sum;
}

}  // namespace adaattn

template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(256) attention_bwd_preprocess(
    const T* __restrict__ dout, const T* __restrict__ out, const float* __restrict__ lse,
    float* __restrict__ lse_log2, float* __restrict__ delta, float* __restrict__ dq_accum,
    long long do_stride_b, long long do_stride_h, long long do_stride_s,
    long long o_stride_b, long long o_stride_h, long long o_stride_s,
    long long lse_stride_b, long long lse_stride_h, long long lse_stride_s,
    int num_heads_q, int num_rows, int seqlen_q, int stats_stride) {
    using namespace adaattn;
    constexpr int CHUNKS = HEAD_DIM / 8;
    constexpr int TPR = CHUNKS <= 4 ? 4 : CHUNKS <= 8 ? 8 : CHUNKS <= 16 ? 16 : 32;
    constexpr int ROWS_PER_BLOCK = 256 / TPR;
    constexpr float LOG2E = 1.4426950408889634f;
    static_assert(HEAD_DIM % 8 == 0 && CHUNKS <= 32, "unsupported head dim");

    const int c = threadIdx.x % TPR;
    const long long row = (long long)blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / TPR;
    const bool valid = row < (long long)num_rows * stats_stride;  // row group = TPR lanes of one warp
    const int bh = static_cast<int>(row / stats_stride);
    const int i = static_cast<int>(row % stats_stride);
    const int b = bh / num_heads_q;
    const int h = bh % num_heads_q;

    float sum = 0.f;
    if (valid && i < seqlen_q && c < CHUNKS) {
        const uint4 x = *reinterpret_cast<const uint4*>(dout + b * do_stride_b + h * do_stride_h + i * do_stride_s + c * 8);
        const uint4 y = *reinterpret_cast<const uint4*>(out + b * o_stride_b + h * o_stride_h + i * o_stride_s + c * 8);
        sum = dot8<T>(x, y);
    }
    // Every lane of the warp takes part in the shuffles; invalid rows only skip the stores.
#pragma unroll
    for (int off = TPR / 2; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);

    if (!valid) return;
    if (c == 0) {
        float l2 = __int_as_float(0x7f800000);  // +inf: P = 0 for the whole row
        if (i < seqlen_q) {
            const float l = lse[b * lse_stride_b + h * lse_stride_h + i * lse_stride_s];
            if (l != neg_inf()) l2 = l * LOG2E;
        }
        lse_log2[row] = l2;
        delta[row] = sum;
    }
    if (dq_accum != nullptr && c < CHUNKS) {
        float4* dst = reinterpret_cast<float4*>(dq_accum + row * HEAD_DIM + c * 8);
        dst[0] = make_float4(0.f, 0.f, 0.f, 0.f);
        dst[1] = make_float4(0.f, 0.f, 0.f, 0.f);
    }
}
