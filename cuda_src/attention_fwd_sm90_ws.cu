// Fused attention forward on Hopper, warp-specialised (sm_90a only): one producer thread streams Q and K/V
// tiles into shared memory with TMA copies on mbarriers, two or three consumer warpgroups run the wgmma GEMMs
// and the softmax, optionally ping-ponged so one consumer's softmax overlaps the others' GEMMs
// (FlashAttention-3, §3.1).
//
// Computes, for batch b, query head h, query row i (g = num_heads_q / num_heads_kv = group_size):
//     out[b,h,i,:] = sum_j softmax_j(scale * q[b,h,i,:] . k[b,h/g,j,:]) * v[b,h/g,j,:]
//     lse[b,h,i]   = log(sum_j exp(scale * q[b,h,i,:] . k[b,h/g,j,:]))        (natural log, fp32)
// Same semantics as attention_fwd.cu (the mma.sync kernel), with Q, K and V passed as tensor maps instead of
// pointers and strides and a persistent grid (below): GQA/MQA
// read the shared K/V head in place, causal is bottom-right aligned (row i attends keys j <= i + Sk - Sq),
// rows with no admissible key get out = 0 and lse = -inf, K/V rows past seqlen_k are zero-filled and
// their scores -inf, Q rows past seqlen_q are computed on zeros and never stored.
//
// Launch (persistent).
//   grid.x  = min(work tiles, SMs): each block loops over work tiles (one m-block of BLOCK_M query rows of one
//             (batch, head) pair, pairs batch-major) that a dynamic scheduler hands out in order. Non-causal:
//             tile t is m-block t % num_m_blocks of pair t / num_m_blocks. CAUSAL: longest first, in sections
//             of `section_heads` pairs (whose K/V fit in L2 together, causal_section_heads in
//             launch_config.py): a section hands out the last m-block of each of its pairs, then the one
//             before, and so on, so every SM's last tiles are short ones and the SMs finish together (one
//             pair per section, m-blocks in reverse per pair, left SMs idle behind long tiles at the end).
//   block.x = 128 + 2 * BLOCK_M: warpgroup 0 is the producer, warpgroup 1 + c the consumer of query rows
//             [64 c, 64 c + 64) (BLOCK_M = 128: two consumers; 192: three).
//   tile_counter = int32[2], zero before the first launch: the next tile to hand out, and the blocks that have
//             taken their last one; the last such block zeroes both, so consecutive launches on one stream
//             can share it (concurrent launches cannot).
//   head_index = int32[num_heads_launch] query heads to compute, or nullptr for all heads in order.
//   dynamic shared memory bytes = (BLOCK_M + 2 * STAGES * BLOCK_N) * HEAD_DIM * 2 + 1024 + 128
//             (Q tile, STAGES K and STAGES V tiles of 16-bit elements, 1024 bytes to round the base up to
//             the 1024-byte alignment of the swizzle, 128 bytes of mbarriers and the scheduler's tile slot; no
//             static shared memory).
//   q_map, k_map, v_map = tensor maps (TmaMap, wgmma_sm90.cuh; encoded by adaattn_core/tma.py) of the
//             [B][Hq][Sq][D], [B][Hkv][Sk][D] and [B][Hkv][Sk][D] inputs with any strides the TMA unit takes
//             (multiples of 16 bytes; head-dim stride 1), boxes of 64 columns by BLOCK_M (Q) and BLOCK_N (K, V)
//             rows, 128-byte swizzle. Out strides are in elements, head-dim stride 1, 16-byte aligned rows.
//
// Roles (WarpRoles in wgmma_sm90.cuh): the producer gives registers back with setmaxnreg.dec (40; 32 with
// three consumers) and the consumers take them (232; 160), which is what lets the consumers hold S
// (BLOCK_N / 2 fp32), O (HEAD_DIM / 2 fp32) and P (BLOCK_N / 4) at once. ptxas allocates each role within
// its limit (without the setmaxnreg pair the consumers spill at 168); with two consumers they need at most
// 216 (D = 256 causal spills at 200), the producer 32. Three consumers fit D = 64 only (D = 128 spills at
// 160).
//
// Producer: one thread takes work tiles (atomicAdd on tile_counter), posts each in the shared tile slot and issues
// its TMA copies (tma_load_tile: D / 64 per tile), which write the 128-byte swizzle that wgmma reads and
// zero-fill rows past the sequence end, in order Q, K_0, V_0, K_1, V_1, ... (key tiles from last to first, as
// the consumers visit them). Before refilling stage s it waits on the stage's "empty" mbarrier, before the next
// work tile's Q on "Q empty" (all consumers past the tile's last Q K^T); each tile arms its "full" mbarrier
// with its byte count (expected count 1 arrival), which completes once the bytes have landed, so the producer
// never blocks on its own loads. The K/V ring runs on across work tiles, so the next tile's Q and first K/V
// tiles load while the consumers finish the last P V and the epilogue of the previous one. A fully masked
// tile or the end (slot -1) is posted by a plain arrival on "Q full". The other 127 producer threads leave
// after setmaxnreg: the address arithmetic and issue of 128-thread cp.async are gone from the consumers'
// schedulers.
// Tiling. Consumer warpgroup w owns query rows [64 w, 64 w + 64) and all HEAD_DIM output columns, so every
// MMA is one m64 wgmma. Shared tiles ([rows][HEAD_DIM]) are stored as HEAD_DIM / 64 column blocks of
// [rows][64] with the 128-byte swizzle, the canonical layout wgmma reads through a matrix descriptor:
// K-major for Q and K (operands of Q K^T), N-major for V (B operand of P V, transposed by the instruction),
// so the TMA copies rows as they are in memory. Key tiles are visited from last to first (the masked
// tiles come first). Per tile and consumer, software-pipelined so that P V of the previous tile overlaps
// this tile's softmax:
//   S = Q K^T           HEAD_DIM / 16 wgmma m64n{BLOCK_N}k16, A and B from shared memory;
//   O += P_prev V_prev  BLOCK_N / 16 wgmma m64n{HEAD_DIM}k16 issued right behind, A = P from registers;
//   softmax             once S has landed (wait_group 1): online, in registers, row max/sum reduced over
//                       the 4 lanes of a quad, the scale folded into exp2 (one FFMA + ex2 per score);
//   rescale O           once P_prev V_prev has landed (wait_group 0), by 2^(m_old - m_new) if m moved; then P is
//                       rounded to 16 bits in place of the A fragments (the m64nN accumulator layout of
//                       n8 blocks 2k, 2k+1 is the register A layout of k16 step k).
// Consumers wait on a tile's "full" mbarrier before its GEMMs and, once the wgmma reading a stage has
// completed, arrive once per warp on its "empty" mbarrier (expected count 4 per consumer warpgroup).
// PINGPONG: the consumers take turns, round robin, to issue their GEMMs (WarpRoles' named barriers), so
// while one consumer does its softmax the others' GEMMs own the tensor cores. The turns run on across work
// tiles: consumer 0 issues the next tile's first Q K^T while the last consumer's final P V and epilogue run.
// Epilogue: O / l stored straight from the accumulators, since the Q tile already holds the next work tile's
// rows: each quad transposes its 4 x 4 words of four n8 blocks (quad_transpose) so that every lane stores 16
// bytes and the quad 64 contiguous bytes of the row.

#include "wgmma_sm90.cuh"

template <typename T, int HEAD_DIM, int BLOCK_M, int BLOCK_N, int STAGES, bool CAUSAL, bool PINGPONG>
__global__ void __launch_bounds__(128 * (1 + BLOCK_M / 64), 1) attention_fwd_sm90_ws(
    const __grid_constant__ adaattn::TmaMap q_map, const __grid_constant__ adaattn::TmaMap k_map,
    const __grid_constant__ adaattn::TmaMap v_map, T* __restrict__ out, float* __restrict__ lse,
    long long o_stride_b, long long o_stride_h, long long o_stride_s,
    const int* __restrict__ head_index, int num_heads_launch, int batch, int section_heads,
    int num_heads_q, int group_size, int seqlen_q, int seqlen_k, float scale_log2, int* __restrict__ tile_counter) {
    using namespace adaattn;
    constexpr int CONSUMERS = BLOCK_M / 64;  // consumer warpgroups, 64 query rows each
    using Roles = WarpRoles<CONSUMERS, PINGPONG>;
    constexpr int NTHREADS = Roles::THREADS;
    constexpr int DT = HEAD_DIM / 8;    // n8 column blocks of O = 16-byte chunks per row
    constexpr int KD = HEAD_DIM / 16;   // k16 steps of Q K^T
    constexpr int KN = BLOCK_N / 16;    // k16 steps of P V
    constexpr unsigned KV_BYTES = BLOCK_N * HEAD_DIM * 2;
    static_assert(sizeof(T) == 2, "16-bit inputs only");
    static_assert(BLOCK_N == 64 || BLOCK_N == 80 || BLOCK_N == 128 || BLOCK_N == 176 || BLOCK_N == 256,
                  "no wgmma wrapper for BLOCK_N");
    static_assert(HEAD_DIM == 64 || HEAD_DIM == 128 || HEAD_DIM == 256, "unsupported head dim");
    static_assert(STAGES >= 2, "K tile j + 1 must stream while tile j is read");

    extern __shared__ __align__(1024) unsigned char smem_raw[];
    const unsigned smem_base = (smem_u32(smem_raw) + 1023u) & ~1023u;
    const unsigned sQ = smem_base;
    const unsigned sK = sQ + BLOCK_M * HEAD_DIM * 2;  // STAGES buffers of [BLOCK_N][HEAD_DIM]
    const unsigned sV = sK + STAGES * KV_BYTES;       // STAGES buffers of [BLOCK_N][HEAD_DIM]
    const StageBarriers<STAGES> bars{sV + STAGES * KV_BYTES};

    const int tid = threadIdx.x;
    const int diag = seqlen_k - seqlen_q;  // row i may attend keys j <= i + diag
    const int num_m_blocks = (seqlen_q + BLOCK_M - 1) / BLOCK_M;
    const int num_tiles = num_m_blocks * num_heads_launch * batch;

    // Work tile t: batch, query head, first row and key tiles (0 when every row is masked).
    struct WorkTile {
        int b, h, m_start, n_blocks;
    };
    auto work_tile = [&](int tile) {
        int bh = tile / num_m_blocks, m_block = tile % num_m_blocks;
        if (CAUSAL) {  // longest first within a section of section_heads pairs (the last one may be short)
            const int first = tile / (section_heads * num_m_blocks) * section_heads;
            const int pairs = min(section_heads, num_heads_launch * batch - first);
            const int rank = tile - first * num_m_blocks;  // within the section
            bh = first + rank % pairs;
            m_block = num_m_blocks - 1 - rank / pairs;
        }
        WorkTile w;
        w.b = bh / num_heads_launch;
        w.h = head_index ? head_index[bh % num_heads_launch] : bh % num_heads_launch;
        w.m_start = m_block * BLOCK_M;
        const int last_key = min(w.m_start + BLOCK_M, seqlen_q) - 1 + diag;
        w.n_blocks = (seqlen_k + BLOCK_N - 1) / BLOCK_N;
        if (CAUSAL) w.n_blocks = last_key < 0 ? 0 : min(w.n_blocks, last_key / BLOCK_N + 1);
        return w;
    };
    volatile int* tile_slot = reinterpret_cast<volatile int*>(smem_raw + (bars.tile_slot() - smem_u32(smem_raw)));

    if (tid == 0) {
        bars.init(CONSUMERS);
        tma_prefetch_map(&q_map);
        tma_prefetch_map(&k_map);
        tma_prefetch_map(&v_map);
    }
    __syncthreads();  // the last CTA-wide barrier: the roles never meet again

    if (tid < 128) {
        // ---- producer warpgroup ----
        setmaxnreg_dec<Roles::PRODUCER_REGS>();
        if (tid != 0) return;
        int kv = 0;  // K/V tiles loaded so far, over this block's work tiles: ring stage kv % STAGES
        for (int local = 0;; ++local) {
            const int tile = atomicAdd(tile_counter, 1);
            if (local > 0) mbar_wait(bars.q_empty(), (local - 1) & 1);  // consumers done with the slot and Q
            if (tile >= num_tiles) {
                *tile_slot = -1;
                mbar_arrive(bars.q_full());  // the end: nothing to load
                break;
            }
            *tile_slot = tile;
            const WorkTile w = work_tile(tile);
            if (w.n_blocks == 0) {
                mbar_arrive(bars.q_full());  // a masked tile: nothing to load
                continue;
            }
            const int h_kv = w.h / group_size;
            tma_load_tile<BLOCK_M, HEAD_DIM * 2, 2>(sQ, &q_map, bars.q_full(), 0, w.m_start, w.h, w.b);
            for (int it = 0; it < w.n_blocks; ++it, ++kv) {
                const int s = kv % STAGES;
                const unsigned parity = ((kv / STAGES) & 1) ^ 1;  // the consumers' release of use kv / STAGES - 1
                const int key0 = (w.n_blocks - 1 - it) * BLOCK_N;
                if (kv >= STAGES) mbar_wait(bars.k_empty(s), parity);
                tma_load_tile<BLOCK_N, HEAD_DIM * 2, 2>(sK + s * KV_BYTES, &k_map, bars.k_full(s), 0, key0, h_kv, w.b);
                if (kv >= STAGES) mbar_wait(bars.v_empty(s), parity);
                tma_load_tile<BLOCK_N, HEAD_DIM * 2, 2>(sV + s * KV_BYTES, &v_map, bars.v_full(s), 0, key0, h_kv, w.b);
            }
        }
        // Every block takes one tile past the end; the last to do so zeroes the scheduler for the next launch.
        __threadfence();
        if (atomicAdd(tile_counter + 1, 1) == (int)gridDim.x - 1) {
            tile_counter[0] = 0;
            tile_counter[1] = 0;
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

    // Matrix descriptors (stage 0, k16 step 0); k_step advances one k16 step: 32 bytes inside a 64-column
    // block, a whole [rows][64] block every 4 steps.
    const unsigned long long q_desc = wgmma_desc_sw128(sQ + wg * 64 * 128, 16, 1024);
    const unsigned long long k_desc = wgmma_desc_sw128(sK, 16, 1024);
    const unsigned long long v_desc = wgmma_desc_sw128(sV, BLOCK_N * 128, 1024);
    auto k_step = [](int kk, int rows) { return (unsigned)((kk / 4) * rows * 128 + (kk % 4) * 32) >> 4; };

    float acc_s[BLOCK_N / 2];
    auto issue_qk = [&](int s) {
#pragma unroll
        for (int kk = 0; kk < KD; ++kk)
            Wgmma<BLOCK_N>::template ss<T>(acc_s, q_desc + k_step(kk, BLOCK_M),
                                           k_desc + ((s * KV_BYTES) >> 4) + k_step(kk, BLOCK_N), kk > 0);
    };
    float acc_o[HEAD_DIM / 2];
    unsigned p[KN][4];
    auto issue_pv = [&](int s) {
#pragma unroll
        for (int kn = 0; kn < KN; ++kn)
            Wgmma<HEAD_DIM>::template rs<T>(acc_o, p[kn], v_desc + ((s * KV_BYTES + kn * 16 * 128) >> 4), 1);
    };

    // Online softmax of key tile n_block on acc_s (scores -> unnormalised probabilities). Row r of the
    // thread (= g + 8 r of its warp) holds elements {4 nt + 2 r, 4 nt + 2 r + 1} of every n8 block and
    // is spread over the 4 lanes of a quad. p = 2^(s * scale_log2 - m) with m the row's reference max
    // (log2 domain). Lazy rescaling (FlashAttention-4): m moves only when a tile's max exceeds it by more
    // than RESCALE_LOG2, so p <= 2^RESCALE_LOG2 (exact in fp32, no overflow in 16 bits) and the rescale of
    // O, a multiply per accumulator, is skipped on most tiles once the first few have set m; the result is
    // the same softmax, since O and l share m. corr[r] = 2^(m_old - m_new), 1 when m stayed.
    constexpr float RESCALE_LOG2 = 8.f;
    // The skip (rescale_o's warp-uniform branch; as a per-thread branch it measured -1% to +6% at D = 64 and 256
    // but -2.5% at D = 128 with cp.async loads, and -2% to +7% at D = 128 with TMA loads:
    // benchmarks/results/tuning/2026-12-03-H200-fwd-d128-*).
    int m_start = 0;  // the current work tile's first query row
    int row0 = 0;     // the thread's rows row0 and row0 + 8 of the current work tile
    float row_max[2];  // reference max m of scale_log2 * score
    float row_sum[2];  // running sum of exp, partial over the lane
    auto softmax = [&](int n_block, float (&corr)[2]) {
        mask_scores<CAUSAL>(acc_s, n_block * BLOCK_N, t, m_start + wg * 64, row0, seqlen_k, diag);
#pragma unroll
        for (int r = 0; r < 2; ++r)
            corr[r] = online_softmax_row(acc_s, r, scale_log2, RESCALE_LOG2, 0.f, row_max[r], row_sum[r]);
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
    for (int kn = 0; kn < KN; ++kn)
#pragma unroll
        for (int i = 0; i < 4; ++i) p[kn][i] = 0u;

    constexpr float LN2 = 0.693147180559945309f;
    int kv = 0;  // K/V tiles consumed so far, over this block's work tiles (the producer's count)
    Roles::open(wg);  // consumer 0 takes the first turn; the turns then run on across work tiles
    for (int local = 0;; ++local) {
        consumer_wait_full(bars.q_full(), local & 1);
        // Lane 0 reads the slot for its warp: it is the lane whose "Q empty" arrival later hands the slot back.
        const int tile = __shfl_sync(0xffffffffu, lane == 0 ? *tile_slot : 0, 0);
        if (tile < 0) {
            Roles::close(wg);
            return;
        }
        const WorkTile w = work_tile(tile);
        T* o_ptr = out + w.b * o_stride_b + w.h * o_stride_h;
        float* lse_ptr = lse + ((long long)w.b * num_heads_q + w.h) * seqlen_q;
        if (w.n_blocks == 0) {
            // Every row of the tile is fully masked: out = 0, lse = -inf.
            write_masked_rows<BLOCK_M, HEAD_DIM, NTHREADS - 128>(o_ptr, o_stride_s, lse_ptr, w.m_start, seqlen_q,
                                                                 tid - 128);
            consumer_release(bars.q_empty(), lane);
            continue;
        }
        const int n_blocks = w.n_blocks;
        m_start = w.m_start;
        row0 = m_start + wg * 64 + warp * 16 + g;
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            row_max[r] = neg_inf();
            row_sum[r] = 0.f;
        }
#pragma unroll
        for (int i = 0; i < HEAD_DIM / 2; ++i) acc_o[i] = 0.f;

        // First key tile: nothing to accumulate into O yet.
        float corr[2];
        int s = kv % STAGES;
        consumer_wait_full(bars.k_full(s), (kv / STAGES) & 1);
        gemm_turn<Roles>(wg, acc_s, acc_o, p, [&] {
            issue_qk(s);
            wgmma_commit();
        });
        wgmma_wait<0>();
        reg_fence(acc_s);
        consumer_release(bars.k_empty(s), lane);
        if (n_blocks == 1) consumer_release(bars.q_empty(), lane);
        softmax(n_blocks - 1, corr);
        pack_p();

        for (int it = 1; it < n_blocks; ++it) {
            const int s_prev = s;
            s = (kv + it) % STAGES;
            consumer_wait_full(bars.k_full(s), ((kv + it) / STAGES) & 1);
            consumer_wait_full(bars.v_full(s_prev), ((kv + it - 1) / STAGES) & 1);
            gemm_turn<Roles>(wg, acc_s, acc_o, p, [&] {
                issue_qk(s);
                wgmma_commit();
                issue_pv(s_prev);
                wgmma_commit();
            });
            wgmma_wait<1>();  // S done; P_prev V_prev may still run under the softmax
            reg_fence(acc_s);
            consumer_release(bars.k_empty(s), lane);
            if (it == n_blocks - 1) consumer_release(bars.q_empty(), lane);  // the tile's last read of Q
            softmax(n_blocks - 1 - it, corr);
            finish_previous_pv(it, acc_o, p, bars.v_empty(s_prev), lane, corr);  // P_prev V_prev done
            pack_p();
        }

        // The last key tile's P V.
        consumer_wait_full(bars.v_full(s), ((kv + n_blocks - 1) / STAGES) & 1);
        gemm_turn<Roles>(wg, acc_s, acc_o, p, [&] {
            issue_pv(s);
            wgmma_commit();
        });
        wgmma_wait<0>();
        reg_fence(acc_o);
        consumer_release(bars.v_empty(s), lane);
        kv += n_blocks;

        // Epilogue: lse and O / l, straight from the accumulators.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            const float sum = quad_sum(row_sum[r]);
            const float inv = sum > 0.f ? fast_rcp(sum) : 0.f;
            const int row = row0 + r * 8;
            const bool in_range = row < seqlen_q;  // only the stores may depend on it: the quad shuffles
            if (t == 0 && in_range) lse_ptr[row] = sum > 0.f ? (row_max[r] + fast_log2(sum)) * LN2 : neg_inf();
            T* o_row = o_ptr + row * o_stride_s + 8 * t;
#pragma unroll
            for (int j = 0; j < DT / 4; ++j) {  // n8 blocks 4j .. 4j + 3: lane t stores block 4j + t
                unsigned x[4];
#pragma unroll
                for (int c = 0; c < 4; ++c)
                    x[c] = pack2<T>(acc_o[4 * (4 * j + c) + 2 * r] * inv, acc_o[4 * (4 * j + c) + 2 * r + 1] * inv);
                quad_transpose(x, t);
                if (in_range) *reinterpret_cast<uint4*>(o_row + 32 * j) = make_uint4(x[0], x[1], x[2], x[3]);
            }
        }
    }
}
