// FP8 (e4m3) attention forward on Hopper warpgroup tensor cores (wgmma.mma_async ...k32.e4m3), sm_90a only.
//
// Inputs are the outputs of the quantisation kernels (quantize_fp8.cu), for query heads h in `heads`:
//     qq[b,h,i,:] * sq[b,h,i / BLOCK_M]        ~ q[b,h,i,:]
//     kq[b,hk,j,:] * sk[b,hk,j / KB]           ~ k[b,hk,j,:] - kbar[b,hk,:]   (softmax-invariant shift)
//     vt[b,hk,j'/32,d,j'%32] * sv[b,hk,d]      ~ v[b,hk,j,d] - v_mean[b,hk,d], j' = pos(j)
//                                              (transposed in 32-key chunks, keys permuted, see below)
// with hk = h / group_size, e4m3 bytes, rows padded with zeros to whole tiles (qq: Sq' = Sq rounded up to
// BLOCK_M rows, kq and vt: Sk' = Sk rounded up to BLOCK_N keys), KB = BLOCK_N / K_PARTS keys per K scale (a
// block of more than 128 keys would not fit the quantiser's registers). Computes
//     s[i,j]     = scale * sq * sk * (qq[i,:] . kq[j,:])
//     out[b,h,i] = v_mean + sum_j softmax_j(s[i,j]) (v[j] - v_mean)   (P rounded to e4m3, scaled to at most 448)
//     lse[b,h,i] = log(sum_j exp(s[i,j])) + scale * row_bias[b,h,i]   (natural log, fp32)
// where kbar = the mean of every 8th key and row_bias = q . kbar (from the Q quantiser) restores what the K
// smoothing took out of lse.
// V smoothing (v_mean = mean_j v, from quantize_fp8_stats) keeps the P V accumulators small and of either
// sign: Hopper's e4m3 wgmma adds its products to the fp32 accumulator with only ~13-14 bits kept below the
// largest operand (truncated), so a channel mean that makes every product positive grows the accumulator
// and biases each later tile low (3e-2 relative error for v = 2 + N(0, 1)). The mean term is added exactly
// in fp32, and with it the rounded P's normalisation error no longer scales the mean.
// Causal is bottom-right aligned (key j visible to row i iff j <= i + Sk - Sq); rows with no visible key
// get out = 0 and lse = -inf. out has the caller's 16-bit dtype and any row/head/batch strides.
//
// Launch.
//   grid.x  = ceil(Sq / BLOCK_M) * num_heads_list * batch, m-block fastest; CAUSAL visits m-blocks in reverse.
//   block.x = 384: warpgroup 0 is the producer, warpgroups 1 and 2 the consumers of query rows [0, 64) and
//             [64, 128) of the block (BLOCK_M = 128).
//   dynamic shared memory = (3 * BLOCK_M + 2 * STAGES * BLOCK_N) * HEAD_DIM + 1024 + 128 bytes: the Q tile and
//   STAGES K and V^T tiles of one byte per element (BLOCK_N = 64, 128, 192 or 224, the WgmmaE4m3 shapes: the
//   S, O and P registers of 224 keys, 112 + 64 + 28, fit the consumers' 232), a [BLOCK_M][HEAD_DIM] 16-bit tile
//   that stages the output (its own buffer: one consumer may still read K/V stages while the other stores),
//   1024 to align the base for the swizzle pattern, 128 bytes of mbarriers.
//
// Warp specialisation, as attention_fwd_sm90_ws.cu (FlashAttention-3 §3.1), whose header explains the roles
// in full; WarpRoles<2> (wgmma_sm90.cuh) gives the producer 40 registers and the consumers 232, and the
// ping-pong turns. (Three consumers of 160 registers, as the bf16 kernel runs at D = 64, spill 128-148 bytes
// here at D = 128 with 128-key tiles: S 64 + O 64 + P 16 fp32/packed registers.) One producer thread copies Q,
// then K_j and V^T_j for j from the last key tile to the first, with TMA (tma_load_tile for Q and K,
// tma_load_chunks for the V^T chunks) into a STAGES-deep ring of
// stages, each guarded by a "full" mbarrier (armed with the tile's bytes: fires when the copies have landed)
// and an "empty" one (8 arrivals: one per consumer warp once its wgmmas reading the stage have completed).
// The consumers run the schedule below per warpgroup with mbarrier waits for the __syncthreads, and (PINGPONG)
// take turns to issue their GEMMs, so one's softmax overlaps the other's wgmmas.
// qq_map, kq_map, vt_map: tensor maps (adaattn_core/tma.py) of qq [B][Hq][Sq'][D], kq [B][Hkv][Sk'][D] and
// vt [B][Hkv][Sk' / 32 * D][32] (bytes, contiguous), boxes of min(D, 128) bytes by BLOCK_M / BLOCK_N rows and
// of 32 key bytes by D rows, with the swizzle of their lines. The quantiser pads every tensor to whole tiles.
// The K scales are read by the consumers from global memory (K_PARTS floats per tile, issued ahead of
// the mbarrier waits so that the loads are off the critical path).
//
// e4m3 helpers (pack4_e4m3, the WgmmaE4m3 wrappers) live in wgmma_sm90.cuh's FP8 section.
//
// Consumer schedule: attention_fwd_sm90_ws.cu (the bf16 wgmma forward) with bytes for elements. A k32 step of e4m3 is
// 32 bytes, like a k16 step of bf16, so the Q and K layouts are the same byte for byte: K-major lines of
// min(HEAD_DIM, 128) bytes with the 128-byte swizzle (64-byte swizzle for HEAD_DIM = 64). V^T (fp8 wgmma has
// no transpose: both operands are K-major) is BLOCK_N / 32 chunks of [HEAD_DIM][32 keys], one per k32 step,
// each with the 32-byte swizzle: a tile of any multiple of 32 keys needs no wider swizzle line.
//   S = Q K^T     HEAD_DIM / 32 wgmma m64n{BLOCK_N}k32, A and B from shared memory;
//   O += P V      BLOCK_N / 32 wgmma m64n{HEAD_DIM}k32, A = P from registers, issued behind the next S.
// P from registers without shuffles: for k32 step kk the thread holds, per row, the fp32 scores of keys
// 32 kk + {2t, 2t+1, 8+2t, 9+2t, 16+2t, 17+2t, 24+2t, 25+2t} (n8 blocks 4kk..4kk+3 of the accumulator),
// while the e4m3 A fragment wants k indices {4t..4t+3} (register 0/1) and {16+4t..16+4t+3} (2/3).
// The quantiser writes V^T with keys permuted inside each 32-key chunk so that k index 4t+i holds key
// {2t, 2t+1, 8+2t, 9+2t}[i] (and +16 for the second half): the product sums the same pairs.
// Softmax is online in the log2 domain: x = acc * (scale * log2 e * sq * sk_block) with one FFMA per score
// (online_softmax_row with a factor per K scale block).
// Lazy rescaling, as in the bf16 kernel: the reference max m moves only when a tile's max exceeds it by more
// than RESCALE_LOG2, so the O rescale (a multiply per accumulator) is skipped on most tiles. P is computed
// already scaled for e4m3, P = 2^(x - m + P_SHIFT) with P_SHIFT = log2(448) - RESCALE_LOG2, so that x <= m +
// RESCALE_LOG2 gives P <= 448 (the e4m3 maximum; satfinite clamps the rounding excess) with no multiply of
// its own, and P is a normal e4m3 number (relative precision 2^-4) down to 2^-11.8 of 2^m: 2^-14.8 to 2^-11.8
// of the row's true max. The row sum l uses the unrounded P, so O / l and
// lse = m + log2(l) - P_SHIFT need no further correction; the epilogue multiplies column d by sv[d] and adds
// v_mean[d].

#include "wgmma_sm90.cuh"

namespace adaattn {

// Shared-memory matrix descriptor of a K-major operand with the LINE-byte swizzle: start address >> 4,
// stride byte offset = 8 rows (one swizzle atom), layout type 1 (128-byte), 2 (64-byte) or 3 (32-byte).
template <int LINE>
__device__ __forceinline__ unsigned long long wgmma_desc_kmajor(unsigned smem_addr) {
    static_assert(LINE == 32 || LINE == 64 || LINE == 128, "wgmma swizzles of 32, 64 or 128 bytes");
    return (unsigned long long)((smem_addr & 0x3ffffu) >> 4) | 1ull << 16 |
           (unsigned long long)((8 * LINE) >> 4) << 32 | (LINE == 128 ? 1ull : LINE == 64 ? 2ull : 3ull) << 62;
}

}  // namespace adaattn

template <typename T, int HEAD_DIM, int BLOCK_M, int BLOCK_N, int K_PARTS, int STAGES, bool CAUSAL, bool PINGPONG>
__global__ void __launch_bounds__(384, 1) attention_fwd_fp8_sm90(
    const __grid_constant__ adaattn::TmaMap qq_map, const __grid_constant__ adaattn::TmaMap kq_map,
    const __grid_constant__ adaattn::TmaMap vt_map,
    const float* __restrict__ sq, const float* __restrict__ sk, const float* __restrict__ sv,
    const float* __restrict__ v_mean, const float* __restrict__ row_bias, const int* __restrict__ heads,
    T* __restrict__ out, float* __restrict__ lse,
    long long o_stride_b, long long o_stride_h, long long o_stride_s,
    int num_heads_list, int num_heads_q, int num_heads_kv, int seqlen_q, int seqlen_k, float scale_log2) {
    using namespace adaattn;
    using Roles = WarpRoles<2, PINGPONG>;
    constexpr int NTHREADS = Roles::THREADS;
    constexpr int DT = HEAD_DIM / 8;      // n8 column blocks of O = 16-byte chunks of a 16-bit output row
    constexpr int KD = HEAD_DIM / 32;     // k32 steps of Q K^T
    constexpr int KN = BLOCK_N / 32;      // k32 steps of P V
    constexpr int LINE = HEAD_DIM < 128 ? HEAD_DIM : 128;  // swizzle line of the Q and K tiles
    constexpr unsigned KV_BYTES = BLOCK_N * HEAD_DIM;      // one K or V^T stage
    static_assert(sizeof(T) == 2, "16-bit outputs only");
    static_assert(HEAD_DIM == 64 || HEAD_DIM == 128, "unsupported head dim");
    static_assert(BLOCK_M == 128, "two consumer warpgroups of 64 rows");
    static_assert(BLOCK_N == 64 || BLOCK_N == 128 || BLOCK_N == 192 || BLOCK_N == 224,
                  "a WgmmaE4m3<BLOCK_N> wrapper, whole V^T chunks; S, O and P of more keys would spill");
    static_assert(STAGES >= 2, "K tile j + 1 must stream while tile j is read");

    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const unsigned smem_base = (smem_u32(smem_raw) + 1023u) & ~1023u;
    const unsigned sQ = smem_base;                    // [BLOCK_M][HEAD_DIM]
    const unsigned sK = sQ + BLOCK_M * HEAD_DIM;      // STAGES x [BLOCK_N][HEAD_DIM]
    const unsigned sV = sK + STAGES * KV_BYTES;       // STAGES x KN x [HEAD_DIM][32] (V^T chunks)
    const unsigned sO = sV + STAGES * KV_BYTES;       // [BLOCK_M][HEAD_DIM] of T: output staging
    const StageBarriers<STAGES> bars{sO + BLOCK_M * HEAD_DIM * 2};

    const int tid = threadIdx.x;

    const int num_m_blocks = (seqlen_q + BLOCK_M - 1) / BLOCK_M;
    const int bh = blockIdx.x / num_m_blocks;
    const int h = heads[bh % num_heads_list];
    const int b = bh / num_heads_list;
    int m_block = blockIdx.x % num_m_blocks;
    if (CAUSAL) m_block = num_m_blocks - 1 - m_block;
    const int m_start = m_block * BLOCK_M;
    const int diag = seqlen_k - seqlen_q;
    const int seqlen_q_pad = num_m_blocks * BLOCK_M;
    const int num_k_blocks = (seqlen_k + BLOCK_N - 1) / BLOCK_N;

    const int h_kv = h / (num_heads_q / num_heads_kv);
    const long long bhq = (long long)b * num_heads_q + h;
    const long long bhk = (long long)b * num_heads_kv + h_kv;
    T* o_ptr = out + b * o_stride_b + h * o_stride_h;
    float* lse_ptr = lse + bhq * seqlen_q;

    int n_blocks = num_k_blocks;
    const int last_key = min(m_start + BLOCK_M, seqlen_q) - 1 + diag;
    if (CAUSAL) n_blocks = min(n_blocks, last_key / BLOCK_N + 1);
    if (n_blocks <= 0 || (CAUSAL && last_key < 0)) {
        // Every row of the block is fully masked: out = 0, lse = -inf (uniform per block: no barrier yet).
        write_masked_rows<BLOCK_M, HEAD_DIM, NTHREADS>(o_ptr, o_stride_s, lse_ptr, m_start, seqlen_q, tid);
        return;
    }

    if (tid == 0) {
        bars.init(2);
        tma_prefetch_map(&qq_map);
        tma_prefetch_map(&kq_map);
        tma_prefetch_map(&vt_map);
    }
    __syncthreads();  // the last CTA-wide barrier: the roles never meet again

    if (tid < 128) {
        // ---- producer warpgroup ----
        setmaxnreg_dec<Roles::PRODUCER_REGS>();
        if (tid != 0) return;
        tma_load_tile<BLOCK_M, HEAD_DIM, 1>(sQ, &qq_map, bars.q_full(), 0, m_start, h, b);
        for (int it = 0; it < n_blocks; ++it) {
            const int s = it % STAGES;
            const unsigned parity = ((it / STAGES) & 1) ^ 1;  // the consumers' release of use it / STAGES - 1
            const int n_block = n_blocks - 1 - it;
            if (it >= STAGES) mbar_wait(bars.k_empty(s), parity);
            tma_load_tile<BLOCK_N, HEAD_DIM, 1>(sK + s * KV_BYTES, &kq_map, bars.k_full(s), 0, n_block * BLOCK_N,
                                                h_kv, b);
            if (it >= STAGES) mbar_wait(bars.v_empty(s), parity);
            // V^T chunks n_block * KN .. + KN - 1 (rows of HEAD_DIM lines each).
            tma_load_chunks<KN, HEAD_DIM>(sV + s * KV_BYTES, &vt_map, bars.v_full(s), n_block * KN * HEAD_DIM, h_kv,
                                          b);
        }
        return;
    }

    // ---- consumer warpgroups ----
    setmaxnreg_inc<Roles::CONSUMER_REGS>();
    const int wg = tid / 128 - 1;     // consumer: query rows [64 wg, 64 wg + 64) of the block
    const int warp = (tid / 32) % 4;  // warp within the warpgroup: its rows 16 warp .. 16 warp + 15
    const int lane = tid % 32;
    const int g = lane / 4;  // accumulator rows g and g + 8 of the warp
    const int t = lane % 4;  // accumulator column pair 2t, 2t + 1 of every n8 block

    const float* sk_ptr = sk + bhk * num_k_blocks * K_PARTS;
    // Per-tile factor from raw fp8 dot products to log2-domain scores: scale * log2(e) * sq * sk_block.
    const float q_factor = scale_log2 * sq[bhq * num_m_blocks + m_block];

    // Descriptors at k32 step 0 of stage 0. A k32 step is 32 bytes further inside a line (HEAD_DIM <= 128:
    // one line per row).
    const unsigned long long q_desc = wgmma_desc_kmajor<LINE>(sQ + wg * 64 * LINE);
    const unsigned long long k_desc = wgmma_desc_kmajor<LINE>(sK);
    const unsigned long long v_desc = wgmma_desc_kmajor<32>(sV);

    float acc_s[BLOCK_N / 2];
    auto issue_qk = [&](int s) {
#pragma unroll
        for (int kk = 0; kk < KD; ++kk)
            WgmmaE4m3<BLOCK_N>::ss(acc_s, q_desc + ((kk * 32) >> 4), k_desc + ((s * KV_BYTES + kk * 32) >> 4),
                                   kk > 0);
    };
    float acc_o[HEAD_DIM / 2];
    unsigned p[KN][4];
    auto issue_pv = [&](int s) {
#pragma unroll
        for (int kn = 0; kn < KN; ++kn)
            WgmmaE4m3<HEAD_DIM>::rs(acc_o, p[kn], v_desc + ((s * KV_BYTES + kn * 32 * HEAD_DIM) >> 4), 1);
    };

    const int row0 = m_start + wg * 64 + warp * 16 + g;
    // A smaller threshold than the bf16 kernel's 8: each unit of it costs a factor 2 of P's normal e4m3 range at
    // the low end. adaattn_core/precision.py (the emulation) holds the same two constants.
    constexpr float RESCALE_LOG2 = 3.f;
    constexpr float P_SHIFT = 8.807354922057604f - RESCALE_LOG2;  // log2(448) - RESCALE_LOG2
    float row_max[2] = {neg_inf(), neg_inf()};  // reference max m of the log2-domain scores
    float row_sum[2] = {0.f, 0.f};
    // k_scale = the K_PARTS scales of tile n_block (one per BLOCK_N / K_PARTS keys), loaded by the caller
    // ahead of the waits (their "memory" clobbers would otherwise keep the loads behind them, on the critical
    // path).
    float k_scale[K_PARTS];
    auto load_k_scales = [&](int n_block) {
#pragma unroll
        for (int part = 0; part < K_PARTS; ++part) k_scale[part] = sk_ptr[n_block * K_PARTS + part];
    };
    auto softmax = [&](int n_block, float (&corr)[2]) {
        mask_scores<CAUSAL>(acc_s, n_block * BLOCK_N, t, m_start + wg * 64, row0, seqlen_k, diag);
        float factor[K_PARTS];
#pragma unroll
        for (int part = 0; part < K_PARTS; ++part) factor[part] = q_factor * k_scale[part];
#pragma unroll
        for (int r = 0; r < 2; ++r)
            corr[r] = online_softmax_row(acc_s, r, factor, RESCALE_LOG2, P_SHIFT, row_max[r], row_sum[r]);
    };

    // P rounded to e4m3 as the A fragments of P V (key order permuted in V^T to match, see header).
    auto pack_p = [&]() {
#pragma unroll
        for (int kn = 0; kn < KN; ++kn)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                const float* s = acc_s + 16 * kn + 8 * (i >> 1) + 2 * (i & 1);  // blocks 4kn + 2(i/2), +1
                p[kn][i] = pack4_e4m3(s[0], s[1], s[4], s[5]);
            }
    };

#pragma unroll
    for (int i = 0; i < BLOCK_N / 2; ++i) acc_s[i] = 0.f;
#pragma unroll
    for (int i = 0; i < HEAD_DIM / 2; ++i) acc_o[i] = 0.f;
#pragma unroll
    for (int kn = 0; kn < KN; ++kn)
#pragma unroll
        for (int i = 0; i < 4; ++i) p[kn][i] = 0u;

    Roles::open(wg);  // consumer 0 takes the first turn

    // First tile: nothing to accumulate into O yet.
    float corr[2];
    load_k_scales(n_blocks - 1);
    consumer_wait_full(bars.q_full(), 0);
    consumer_wait_full(bars.k_full(0), 0);
    gemm_turn<Roles>(wg, acc_s, acc_o, p, [&] {
        issue_qk(0);
        wgmma_commit();
    });
    wgmma_wait<0>();
    reg_fence(acc_s);
    consumer_release(bars.k_empty(0), lane);
    softmax(n_blocks - 1, corr);
    pack_p();

    for (int it = 1; it < n_blocks; ++it) {
        const int s = it % STAGES, s_prev = (it - 1) % STAGES;
        load_k_scales(n_blocks - 1 - it);
        consumer_wait_full(bars.k_full(s), (it / STAGES) & 1);
        consumer_wait_full(bars.v_full(s_prev), ((it - 1) / STAGES) & 1);
        gemm_turn<Roles>(wg, acc_s, acc_o, p, [&] {
            issue_qk(s);
            wgmma_commit();
            issue_pv(s_prev);
            wgmma_commit();
        });
        wgmma_wait<1>();  // S done; P_prev V_prev may still run under the softmax
        reg_fence(acc_s);
        consumer_release(bars.k_empty(s), lane);
        softmax(n_blocks - 1 - it, corr);
        finish_previous_pv(it, acc_o, p, bars.v_empty(s_prev), lane, corr);  // P_prev V_prev done
        pack_p();
    }

    // The last tile's P V. Its V stage is not released: the producer has no tile left to put there.
    consumer_wait_full(bars.v_full((n_blocks - 1) % STAGES), ((n_blocks - 1) / STAGES) & 1);
    gemm_turn<Roles>(wg, acc_s, acc_o, p, [&] {
        issue_pv((n_blocks - 1) % STAGES);
        wgmma_commit();
    });
    wgmma_wait<0>();
    reg_fence(acc_o);

    // Epilogue: O * sv[d] / l + v_mean[d] (0 for rows that see no key), staged as 16-bit rows in this
    // consumer's half of sO (64 rows of HEAD_DIM * 2 bytes, in [64][128-byte] column blocks) for 16-byte
    // row-contiguous global stores. Only this warp touches its 16 rows: __syncwarp suffices.
    constexpr float LN2 = 0.693147180559945309f;
    const float* sv_ptr = sv + bhk * HEAD_DIM + 2 * t;
    const float* vm_ptr = v_mean + bhk * HEAD_DIM + 2 * t;
    const float* bias_ptr = row_bias + bhq * seqlen_q_pad + m_start;
    unsigned char* o_tile = smem_raw + (sO - smem_u32(smem_raw)) + wg * 64 * HEAD_DIM * 2;
    const int warp_row = warp * 16;  // within the consumer's 64 rows
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const float sum = quad_sum(row_sum[r]);
        const float inv = sum > 0.f ? fast_rcp(sum) : 0.f;
        const float seen = sum > 0.f ? 1.f : 0.f;
        const int row_wg = warp_row + g + r * 8;
        const int row_local = wg * 64 + row_wg;
        const int row = m_start + row_local;
        if (t == 0 && row < seqlen_q)
            lse_ptr[row] = sum > 0.f ? (row_max[r] + fast_log2(sum) - P_SHIFT + scale_log2 * bias_ptr[row_local]) * LN2
                                     : neg_inf();
#pragma unroll
        for (int dt = 0; dt < DT; ++dt) {
            const float2 s = *reinterpret_cast<const float2*>(sv_ptr + 8 * dt);
            const float2 m = *reinterpret_cast<const float2*>(vm_ptr + 8 * dt);
            *reinterpret_cast<unsigned*>(o_tile + sw128_offset<64>(row_wg, dt) + 4 * t) =
                pack2<T>(fmaf(acc_o[4 * dt + 2 * r] * inv, s.x, seen * m.x),
                         fmaf(acc_o[4 * dt + 2 * r + 1] * inv, s.y, seen * m.y));
        }
    }
    __syncwarp();
#pragma unroll
    for (int i = 0; i < 16 * DT / 32; ++i) {
        const int idx = lane + i * 32;
        const int row_wg = warp_row + idx / DT;
        const int c = idx % DT;
        const int row = m_start + wg * 64 + row_wg;
        if (row < seqlen_q)
            *reinterpret_cast<uint4*>(o_ptr + row * o_stride_s + c * 8) =
                *reinterpret_cast<const uint4*>(o_tile + sw128_offset<64>(row_wg, c));
    }
    Roles::close(wg);  // consumer 0 takes the last consumer's final hand-over
}
