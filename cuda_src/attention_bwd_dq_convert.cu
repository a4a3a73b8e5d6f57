// Attention backward, pass 3 of 3 (atomic dq path only): dq = scale * dq_accum, rounded to the input
// dtype and written through dq's strides, sm_80 and newer.
//
// dq_accum is the fp32 workspace [batch * num_heads_q][stats_stride][HEAD_DIM] into which
// attention_bwd_dkdv.cu added dS K with atomics (unscaled); rows past seqlen_q are padding and ignored.
//
// Launch.
//   grid.x  = ceil(batch * num_heads_q * seqlen_q * HEAD_DIM / 8 / 256); block.x = 256.
//   Thread idx converts one 16-byte output chunk: 8 consecutive head-dim elements of one row.
//   No shared memory. dq strides in elements, head-dim stride 1, 16-byte aligned rows.

#include "mma_sm80.cuh"

template <typename T, int HEAD_DIM>
__global__ void __launch_bounds__(256) attention_bwd_dq_convert(
    const float* __restrict__ dq_accum, T* __restrict__ dq,
    long long dq_stride_b, long long dq_stride_h, long long dq_stride_s,
    int num_heads_q, int num_rows, int seqlen_q, int stats_stride, float scale) {
    using namespace adaattn;
    constexpr int CHUNKS = HEAD_DIM / 8;
    const long long idx = (long long)blockIdx.x * blockDim.x + threadIdx.x;
    if (idx >= (long long)num_rows * seqlen_q * CHUNKS) return;
    const int c = static_cast<int>(idx % CHUNKS);
    const long long row = idx / CHUNKS;
    const int i = static_cast<int>(row % seqlen_q);
    const int bh = static_cast<int>(row / seqlen_q);
    const int b = bh / num_heads_q;
    const int h = bh % num_heads_q;

    const float4* src = reinterpret_cast<const float4*>(dq_accum + ((long long)bh * stats_stride + i) * HEAD_DIM + c * 8);
    const float4 x = src[0];
    const float4 y = src[1];
    const uint4 packed = make_uint4(pack2<T>(x.x * scale, x.y * scale), pack2<T>(x.z * scale, x.w * scale),
                                    pack2<T>(y.x * scale, y.y * scale), pack2<T>(y.z * scale, y.w * scale));
    *reinterpret_cast<uint4*>(dq + b * dq_stride_b + h * dq_stride_h + i * dq_stride_s + c * 8) = packed;
}
