// Fused attention forward on Hopper warpgroup tensor cores (wgmma.mma_async), sm_90a only.
//
// Computes, for batch b, query head h, query row i (g = num_heads_q / num_heads_kv = group_size):
//     out[b,h,i,:] = sum_j softmax_j(scale * q[b,h,i,:] . k[b,h/g,j,:]) * v[b,h/g,j,:]
//     lse[b,h,i]   = log(sum_j exp(scale * q[b,h,i,:] . k[b,h/g,j,:]))        (natural log, fp32)
// Same semantics and parameters as attention_fwd.cu: GQA/MQA read the shared K/V head in place, fp32
// accumulation throughout, out has the input dtype.
//
// Masking. Causal is bottom-right aligned: row i may attend key j iff j <= i + (seqlen_k - seqlen_q).
// Rows with no admissible key get out = 0 and lse = -inf. Ragged edges: K/V rows past seqlen_k are
// zero-filled in shared memory (so 0 * V never meets garbage) and their scores set to -inf; Q rows
// past seqlen_q are computed on zeros and never stored. CAUSAL skips the key tiles past the block's
// last admissible key; a block with no admissible key at all writes zeros / -inf and exits. Only
// tiles crossing the diagonal or the key end are masked.
//
// Launch.
//   grid.x  = ceil(seqlen_q / BLOCK_M) * num_heads_launch * batch, m-block fastest (blocks sharing one K/V
//             head run together); CAUSAL visits m-blocks in reverse so the longest rows start first.
//   block.x = 2 * BLOCK_M: one 128-thread warpgroup per 64 query rows.
//   head_index = int32[num_heads_launch] query heads to compute (one launch per policy group), or
//             nullptr for all num_heads_q heads in order (num_heads_launch = num_heads_q).
//   dynamic shared memory bytes = (BLOCK_M + 4 * BLOCK_N) * HEAD_DIM * 2 + 1024
//             (Q tile + double-buffered K and V tiles, 16-bit elements, + 1024 to round the base up
//             to the 1024-byte alignment of the swizzle pattern; no static shared memory).
//   Strides are in elements, the head-dim stride is 1, pointers are 16-byte aligned and every stride
//   is a multiple of 8 elements (all 16-byte cp.async).
//
// Tiling. A thread block owns BLOCK_M query rows of one (b, h); warpgroup w owns rows [64 w, 64 w + 64)
// and all HEAD_DIM output columns, so every MMA is one m64 wgmma. Shared tiles ([rows][HEAD_DIM]) are
// stored as HEAD_DIM / 64 column blocks of [rows][64] with the 128-byte swizzle, the canonical
// layout wgmma reads through a matrix descriptor: K-major for Q and K (operands of Q K^T), N-major for
// V (B operand of P V, transposed by the instruction), so cp.async copies rows as they are in memory.
// Key tiles of BLOCK_N rows are visited from last to first (the masked tiles come first). Per tile
// and warpgroup, software-pipelined so that P V of the previous tile overlaps this tile's softmax:
//   S = Q K^T         HEAD_DIM / 16 wgmma m64n{BLOCK_N}k16, A and B from shared memory;
//   O += P_prev V_prev  BLOCK_N / 16 wgmma m64n{HEAD_DIM}k16 issued right behind, A = P from registers;
//   softmax           once S has landed (wait_group 1): online, in registers, row max/sum reduced over
//                     the 4 lanes of a quad, the scale folded into exp2 (one FFMA + ex2 per score);
//   rescale O         once P_prev V_prev has landed (wait_group 0), by 2^(m_old - m_new); then P is
//                     rounded to 16 bits in place of the A fragments (the m64nN accumulator layout of
//                     n8 blocks 2k, 2k+1 is the register A layout of k16 step k).
// Loads: all threads issue cp.async; at the top of iteration j (one __syncthreads) K tile j + 1 and
// V tile j stream into the buffers freed by iteration j - 1, so K is one tile ahead of V. Epilogue:
// O / l is staged through the warpgroup's own (now dead) Q rows so global stores are 16-byte and
// row-contiguous; lse is written per row.

#include "wgmma_sm90.cuh"

template <typename T, int HEAD_DIM, int BLOCK_M, int BLOCK_N, bool CAUSAL>
__global__ void __launch_bounds__(BLOCK_M * 2, 1) attention_fwd_sm90(
    const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v,
    T* __restrict__ out, float* __restrict__ lse,
    long long q_stride_b, long long q_stride_h, long long q_stride_s,
    long long k_stride_b, long long k_stride_h, long long k_stride_s,
    long long v_stride_b, long long v_stride_h, long long v_stride_s,
    long long o_stride_b, long long o_stride_h, long long o_stride_s,
    const int* __restrict__ head_index, int num_heads_launch,
    int num_heads_q, int group_size, int seqlen_q, int seqlen_k, float scale_log2) {
    using namespace adaattn;
    constexpr int NTHREADS = BLOCK_M * 2;
    constexpr int NT = BLOCK_N / 8;     // n8 column blocks of S
    constexpr int DT = HEAD_DIM / 8;    // n8 column blocks of O = 16-byte chunks per row
    constexpr int KD = HEAD_DIM / 16;   // k16 steps of Q K^T
    constexpr int KN = BLOCK_N / 16;    // k16 steps of P V
    constexpr unsigned KV_BYTES = BLOCK_N * HEAD_DIM * 2;
    static_assert(sizeof(T) == 2, "16-bit inputs only");
    static_assert(BLOCK_M % 64 == 0 && BLOCK_N % 16 == 0 && HEAD_DIM % 64 == 0, "unsupported tile shape");
    static_assert(BLOCK_N == 64 || BLOCK_N == 128 || BLOCK_N == 176 || BLOCK_N == 256, "no wgmma wrapper for BLOCK_N");
    static_assert(HEAD_DIM == 64 || HEAD_DIM == 128 || HEAD_DIM == 256, "unsupported head dim");

    extern __shared__ __align__(1024) unsigned char smem_raw[];
    // The swizzle is a function of address bits 4-9: tiles start 1024-byte aligned (the allocation
    // carries 1024 spare bytes for this round-up).
    const unsigned smem_base = (smem_u32(smem_raw) + 1023u) & ~1023u;
    const unsigned sQ = smem_base;
    const unsigned sK = sQ + BLOCK_M * HEAD_DIM * 2;  // 2 buffers of [BLOCK_N][HEAD_DIM]
    const unsigned sV = sK + 2 * KV_BYTES;            // 2 buffers of [BLOCK_N][HEAD_DIM]

    const int tid = threadIdx.x;
    const int wg = tid / 128;        // warpgroup: query rows [64 wg, 64 wg + 64) of the block
    const int warp = (tid / 32) % 4;  // warp within the warpgroup: its rows 16 warp .. 16 warp + 15
    const int lane = tid % 32;
    const int g = lane / 4;  // accumulator rows g and g + 8 of the warp
    const int t = lane % 4;  // accumulator column pair 2t, 2t + 1 of every n8 block

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
    // Largest key any row of this block may attend; tiles past it are skipped entirely.
    const int last_key = min(m_start + BLOCK_M, seqlen_q) - 1 + diag;
    if (CAUSAL) n_blocks = min(n_blocks, last_key / BLOCK_N + 1);
    if (n_blocks <= 0 || (CAUSAL && last_key < 0)) {
        // Every row of the block is fully masked: out = 0, lse = -inf.
        for (int idx = tid; idx < BLOCK_M * DT; idx += NTHREADS) {
            const int row = m_start + idx / DT;
            if (row < seqlen_q)
                *reinterpret_cast<uint4*>(o_ptr + row * o_stride_s + (idx % DT) * 8) = make_uint4(0, 0, 0, 0);
        }
        for (int r = tid; r < BLOCK_M; r += NTHREADS)
            if (m_start + r < seqlen_q) lse_ptr[m_start + r] = neg_inf();
        return;
    }

    // Matrix descriptors (buffer 0, k16 step 0). Q: this warpgroup's 64 rows; K: the BLOCK_N rows of a
    // tile; both K-major with 8-row groups 1024 bytes apart (leading offset unused: one k16 step stays
    // inside a 128-byte line). V: N-major, 8-key groups 1024 bytes apart, 64-column blocks BLOCK_N
    // lines apart. Steps add (bytes >> 4) to the start address field.
    const unsigned long long q_desc = wgmma_desc_sw128(sQ + wg * 64 * 128, 16, 1024);
    const unsigned long long k_desc = wgmma_desc_sw128(sK, 16, 1024);
    const unsigned long long v_desc = wgmma_desc_sw128(sV, BLOCK_N * 128, 1024);

    // K-major k16 step kk of a [ROWS][HEAD_DIM] tile: column block kk / 4, 32 bytes per step inside it.
    auto k_step = [](int kk, int rows) { return (unsigned)((kk / 4) * rows * 128 + (kk % 4) * 32) >> 4; };

    // S = Q K^T for K buffer `buf`, overwriting acc_s.
    float acc_s[BLOCK_N / 2];
    auto issue_qk = [&](int buf) {
#pragma unroll
        for (int kk = 0; kk < KD; ++kk)
            Wgmma<BLOCK_N>::template ss<T>(acc_s, q_desc + k_step(kk, BLOCK_M),
                                           k_desc + ((buf * KV_BYTES) >> 4) + k_step(kk, BLOCK_N), kk > 0);
    };

    // O += P V for V buffer `buf`; k16 step kn is keys 16 kn .. 16 kn + 15 = 16 lines further.
    float acc_o[HEAD_DIM / 2];
    unsigned p[KN][4];
    auto issue_pv = [&](int buf) {
#pragma unroll
        for (int kn = 0; kn < KN; ++kn)
            Wgmma<HEAD_DIM>::template rs<T>(acc_o, p[kn], v_desc + ((buf * KV_BYTES + kn * 16 * 128) >> 4), 1);
    };

    // Online softmax of key tile n_block on acc_s (scores -> unnormalised probabilities). Row r of the
    // thread (= g + 8 r of its warp) holds elements {4 nt + 2 r, 4 nt + 2 r + 1} of every n8 block and
    // is spread over the 4 lanes of a quad. p = 2^(s * scale_log2 - max * scale_log2). corr[r] is the
    // factor 2^(m_old - m_new) that O and the row sum must be rescaled by.
    const int row0 = m_start + wg * 64 + warp * 16 + g;  // the thread's rows row0 and row0 + 8
    float row_max[2] = {neg_inf(), neg_inf()};          // running max of raw scores (unscaled)
    float row_sum[2] = {0.f, 0.f};                      // running sum of exp, partial over the lane
    auto softmax = [&](int n_block, float (&corr)[2]) {
        // Mask only tiles that reach past the ragged key end or (CAUSAL) past the first key hidden from
        // this warpgroup's first row.
        const int key_end = n_block * BLOCK_N + BLOCK_N;
        if (key_end > seqlen_k || (CAUSAL && key_end - 1 > m_start + wg * 64 + diag)) {
            const int key0 = n_block * BLOCK_N + 2 * t;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int row = row0 + (e >> 1) * 8;
                    const int col = key0 + nt * 8 + (e & 1);
                    if (col >= seqlen_k || (CAUSAL && col > row + diag)) acc_s[4 * nt + e] = neg_inf();
                }
        }
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = row_max[r];
#pragma unroll
            for (int nt = 0; nt < NT; ++nt) mx = fmaxf(mx, fmaxf(acc_s[4 * nt + 2 * r], acc_s[4 * nt + 2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            // A row with no admissible key yet keeps max = -inf; use 0 so -inf - -inf never occurs.
            const float mx_scaled = mx == neg_inf() ? 0.f : mx * scale_log2;
            corr[r] = fast_exp2(row_max[r] * scale_log2 - mx_scaled);
            row_max[r] = mx;
            float sum = 0.f;
#pragma unroll
            for (int nt = 0; nt < NT; ++nt)
#pragma unroll
                for (int e = 2 * r; e < 2 * r + 2; ++e) {
                    const float pe = fast_exp2(fmaf(acc_s[4 * nt + e], scale_log2, -mx_scaled));
                    acc_s[4 * nt + e] = pe;
                    sum += pe;
                }
            row_sum[r] = row_sum[r] * corr[r] + sum;
        }
    };

    // P rounded to 16 bits as the A fragments of P V: n8 blocks 2 kn and 2 kn + 1 form k16 step kn.
    auto pack_p = [&]() {
#pragma unroll
        for (int kn = 0; kn < KN; ++kn)
#pragma unroll
            for (int i = 0; i < 4; ++i) p[kn][i] = pack2<T>(acc_s[8 * kn + 2 * i], acc_s[8 * kn + 2 * i + 1]);
    };

#pragma unroll
    for (int i = 0; i < BLOCK_N / 2; ++i) acc_s[i] = 0.f;
#pragma unroll
    for (int i = 0; i < HEAD_DIM / 2; ++i) acc_o[i] = 0.f;
#pragma unroll
    for (int kn = 0; kn < KN; ++kn)
#pragma unroll
        for (int i = 0; i < 4; ++i) p[kn][i] = 0u;

    // Prologue: Q and the last key tile (visited first) as one cp.async group.
    load_tile_sw128<BLOCK_M, HEAD_DIM, NTHREADS>(sQ, q_ptr, q_stride_s, m_start, seqlen_q, tid);
    load_tile_sw128<BLOCK_N, HEAD_DIM, NTHREADS>(sK, k_ptr, k_stride_s, (n_blocks - 1) * BLOCK_N, seqlen_k, tid);
    cp_async_commit();

    // Top of iteration `it`: K tile `it` (and V tile it - 1) have landed for every thread and are
    // visible to wgmma, and every warpgroup is done with K tile it - 1 and V tile it - 2. Registers
    // written by ordinary instructions are complete before the wgmmas that read them.
    auto begin_tile = [&]() {
        cp_async_wait<0>();
        fence_proxy_async();
        __syncthreads();
        reg_fence(acc_s);
        reg_fence(acc_o);
#pragma unroll
        for (int kn = 0; kn < KN; ++kn) reg_fence(p[kn]);
        wgmma_fence();
    };

    // Refill the buffers freed at the top of iteration `it` with K tile it + 1 and V tile it; issued
    // behind the wgmmas of the iteration (which read the other buffers) so the tensor cores start first.
    auto load_next = [&](int it) {
        const int n_block = n_blocks - 1 - it;
        if (n_block > 0)
            load_tile_sw128<BLOCK_N, HEAD_DIM, NTHREADS>(sK + ((it + 1) & 1) * KV_BYTES, k_ptr, k_stride_s,
                                                         (n_block - 1) * BLOCK_N, seqlen_k, tid);
        load_tile_sw128<BLOCK_N, HEAD_DIM, NTHREADS>(sV + (it & 1) * KV_BYTES, v_ptr, v_stride_s, n_block * BLOCK_N,
                                                     seqlen_k, tid);
        cp_async_commit();
    };

    // First tile: nothing to accumulate into O yet.
    float corr[2];
    begin_tile();
    issue_qk(0);
    wgmma_commit();
    load_next(0);
    wgmma_wait<0>();
    reg_fence(acc_s);
    softmax(n_blocks - 1, corr);
    pack_p();

    for (int it = 1; it < n_blocks; ++it) {
        begin_tile();
        issue_qk(it & 1);
        wgmma_commit();
        issue_pv((it - 1) & 1);
        wgmma_commit();
        load_next(it);
        wgmma_wait<1>();  // S done; P_prev V_prev may still run under the softmax
        reg_fence(acc_s);
        softmax(n_blocks - 1 - it, corr);
        wgmma_wait<0>();  // P_prev V_prev done: O and the P registers are free again
        reg_fence(acc_o);
#pragma unroll
        for (int kn = 0; kn < KN; ++kn) reg_fence(p[kn]);
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
#pragma unroll
            for (int e = 0; e < 4; ++e) acc_o[4 * dt + e] *= corr[e >> 1];
        pack_p();
    }

    // The last tile's P V, once its V tile has landed.
    begin_tile();
    issue_pv((n_blocks - 1) & 1);
    wgmma_commit();
    wgmma_wait<0>();
    reg_fence(acc_o);

    // Epilogue: finish the row sums over the quad, write lse, normalise O and stage it in this warp's
    // own Q rows (no other warp reads them, and this warpgroup's wgmmas are complete) so the global
    // stores are 16-byte and row-contiguous. The staging writes are conflict-free: the 8 rows of a
    // quad column hit 8 distinct swizzled chunks.
    constexpr float LN2 = 0.693147180559945309f;
    unsigned char* q_tile = smem_raw + (sQ - smem_u32(smem_raw));
    const int warp_row = wg * 64 + warp * 16;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        float sum = row_sum[r];
        sum += __shfl_xor_sync(0xffffffffu, sum, 1);
        sum += __shfl_xor_sync(0xffffffffu, sum, 2);
        const float inv = sum > 0.f ? fast_rcp(sum) : 0.f;
        const int row_local = warp_row + g + r * 8;
        const int row = m_start + row_local;
        if (t == 0 && row < seqlen_q)
            lse_ptr[row] = sum > 0.f ? (row_max[r] * scale_log2 + fast_log2(sum)) * LN2 : neg_inf();
#pragma unroll
        for (int dt = 0; dt < DT; ++dt)
            *reinterpret_cast<unsigned*>(q_tile + sw128_offset<BLOCK_M>(row_local, dt) + 4 * t) =
                pack2<T>(acc_o[4 * dt + 2 * r] * inv, acc_o[4 * dt + 2 * r + 1] * inv);
    }
    __syncwarp();
#pragma unroll
    for (int i = 0; i < 16 * DT / 32; ++i) {
        const int idx = lane + i * 32;
        const int row_local = warp_row + idx / DT;
        const int c = idx % DT;
        const int row = m_start + row_local;
        if (row < seqlen_q)
            *reinterpret_cast<uint4*>(o_ptr + row * o_stride_s + c * 8) =
                *reinterpret_cast<const uint4*>(q_tile + sw128_offset<BLOCK_M>(row_local, c));
    }
}
