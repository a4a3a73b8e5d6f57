// The low-rank path's keys and landmarks (adaattn_core/lowrank.py's _keys): what lowrank_fwd.cu reads, built from
// K and V in two launches instead of ~40 array operations.
//
// Positions. Key j sits at position j + k_offset on a grid of `padded` positions, cut into blocks of W = 64 and
// segments of `fine` blocks (lowrank.py's Geometry). For prepared head n (key/value head kv_heads[n]) and batch b,
// a position p holds a landmark key when a key sits there and p is not one of the head's sink positions
// (sink_pos[n][s] = sinks[n][s] + k_offset, -1: none): weight(p) = 1, else 0.
//
// lowrank_block_landmarks, grid (padded / W, n, B), 128 threads:
//     kp[b][n][p][:] = K[b][kv_heads[n]][p - k_offset][:] as fp32, 0 where no key sits; vp likewise;
//     kf[b][n][beta][:] = sum over block beta of weight(p) * kp[b][n][p][:] / count, vf likewise, count = the
//     block's summed weight (0 for an empty block: the sums are 0); batch entry 0 also writes
//     key_bias[n][p] = 0 where weight(p) = 1, else -inf, count_f[n][beta] = count and log_nf[n][beta] = log(count)
//     (-inf for an empty block).
//     Thread d of the head dim (and d + 128, ...) walks the block's 64 positions, so each K and V row is read once,
//     coalesced, and converted once.
// lowrank_segment_landmarks, grid (segments, n, B), 128 threads, after it:
//     kc[b][n][c][:] = sum over the segment's blocks of count_f * kf / count_c (count_c = their summed counts),
//     vc likewise; batch entry 0 also writes log_nc[n][c] (-inf for an empty segment); segment 0's blocks copy the
//     sink rows ks[b][n][s][:] = K[b][kv_heads[n]][max(sinks[n][s], 0)][:] as fp32, vs likewise (a -1 entry reads
//     key 0: finite values the forward masks by its sink_pos).
// K and V: [B][Hkv][Sk][D] with element strides (head-dim stride 1); the outputs are contiguous fp32.

#include "mma_sm80.cuh"

template <typename T>
__global__ void __launch_bounds__(128) lowrank_block_landmarks(
    const T* __restrict__ k, long long k_stride_b, long long k_stride_h, long long k_stride_s,
    const T* __restrict__ v, long long v_stride_b, long long v_stride_h, long long v_stride_s,
    const int* __restrict__ kv_heads, const long long* __restrict__ sink_pos, int sinks, int seqlen_k, int k_offset,
    int padded, int head_dim, float* __restrict__ kp, float* __restrict__ vp, float* __restrict__ key_bias,
    float* __restrict__ kf, float* __restrict__ vf, float* __restrict__ count_f, float* __restrict__ log_nf) {
    using namespace adaattn;
    constexpr int W = 64;
    constexpr int NTHREADS = 128;
    __shared__ float s_weight[W];
    __shared__ float s_count;

    const int tid = threadIdx.x, beta = blockIdx.x, n = blockIdx.y, b = blockIdx.z;
    const int blocks = gridDim.x, num_heads = gridDim.y;
    const int p0 = beta * W;
    if (tid < W) {
        const int p = p0 + tid, j = p - k_offset;
        bool real = j >= 0 && j < seqlen_k;
        for (int s = 0; s < sinks; ++s) real = real && sink_pos[(long long)n * sinks + s] != p;
        s_weight[tid] = real ? 1.f : 0.f;
        if (b == 0) key_bias[(long long)n * padded + p] = real ? 0.f : neg_inf();
    }
    __syncthreads();
    if (tid == 0) {
        float count = 0.f;
        for (int i = 0; i < W; ++i) count += s_weight[i];
        s_count = count;
        if (b == 0) {
            count_f[(long long)n * blocks + beta] = count;
            log_nf[(long long)n * blocks + beta] = count > 0.f ? logf(count) : neg_inf();
        }
    }
    __syncthreads();
    const float denom = s_count > 0.f ? s_count : 1.f;

    const long long bn = (long long)b * num_heads + n;
    const T* k_head = k + b * k_stride_b + kv_heads[n] * k_stride_h;
    const T* v_head = v + b * v_stride_b + kv_heads[n] * v_stride_h;
    float* kp_block = kp + (bn * padded + p0) * head_dim;
    float* vp_block = vp + (bn * padded + p0) * head_dim;
    for (int d = tid; d < head_dim; d += NTHREADS) {
        float sum_k = 0.f, sum_v = 0.f;
        for (int i = 0; i < W; ++i) {
            const int j = p0 + i - k_offset;
            const bool inside = j >= 0 && j < seqlen_k;
            const float kx = inside ? static_cast<float>(k_head[j * k_stride_s + d]) : 0.f;
            const float vx = inside ? static_cast<float>(v_head[j * v_stride_s + d]) : 0.f;
            kp_block[i * head_dim + d] = kx;
            vp_block[i * head_dim + d] = vx;
            sum_k += s_weight[i] * kx;
            sum_v += s_weight[i] * vx;
        }
        kf[(bn * blocks + beta) * head_dim + d] = sum_k / denom;
        vf[(bn * blocks + beta) * head_dim + d] = sum_v / denom;
    }
}

template <typename T>
__global__ void __launch_bounds__(128) lowrank_segment_landmarks(
    const T* __restrict__ k, long long k_stride_b, long long k_stride_h, long long k_stride_s,
    const T* __restrict__ v, long long v_stride_b, long long v_stride_h, long long v_stride_s,
    const int* __restrict__ kv_heads, const long long* __restrict__ sinks, int num_sinks, int fine, int head_dim,
    const float* __restrict__ kf, const float* __restrict__ vf, const float* __restrict__ count_f,
    float* __restrict__ kc, float* __restrict__ vc, float* __restrict__ log_nc, float* __restrict__ ks,
    float* __restrict__ vs) {
    using namespace adaattn;
    constexpr int NTHREADS = 128;
    const int tid = threadIdx.x, c = blockIdx.x, n = blockIdx.y, b = blockIdx.z;
    const int segments = gridDim.x, num_heads = gridDim.y;
    const int blocks = segments * fine;
    const long long bn = (long long)b * num_heads + n;
    const float* counts = count_f + (long long)n * blocks + c * fine;

    float count = 0.f;  // every thread sums the segment's counts: fine is small (<= a few hundred)
    for (int f = 0; f < fine; ++f) count += counts[f];
    if (b == 0 && tid == 0) log_nc[(long long)n * segments + c] = count > 0.f ? logf(count) : neg_inf();
    const float denom = count > 0.f ? count : 1.f;
    const float* kf_seg = kf + (bn * blocks + c * fine) * head_dim;
    const float* vf_seg = vf + (bn * blocks + c * fine) * head_dim;
    for (int d = tid; d < head_dim; d += NTHREADS) {
        float sum_k = 0.f, sum_v = 0.f;
        for (int f = 0; f < fine; ++f) {
            sum_k += counts[f] * kf_seg[f * head_dim + d];
            sum_v += counts[f] * vf_seg[f * head_dim + d];
        }
        kc[(bn * segments + c) * head_dim + d] = sum_k / denom;
        vc[(bn * segments + c) * head_dim + d] = sum_v / denom;
    }

    if (c != 0) return;
    const T* k_head = k + b * k_stride_b + kv_heads[n] * k_stride_h;
    const T* v_head = v + b * v_stride_b + kv_heads[n] * v_stride_h;
    for (int s = 0; s < num_sinks; ++s) {
        const long long key = max(sinks[(long long)n * num_sinks + s], 0LL);
        for (int d = tid; d < head_dim; d += NTHREADS) {
            ks[(bn * num_sinks + s) * head_dim + d] = static_cast<float>(k_head[key * k_stride_s + d]);
            vs[(bn * num_sinks + s) * head_dim + d] = static_cast<float>(v_head[key * v_stride_s + d]);
        }
    }
}
