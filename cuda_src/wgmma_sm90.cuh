// Device helpers for sm_90a warpgroup tensor-core kernels: PTX wrappers for wgmma.mma_async and its
// fences, the shared-memory matrix descriptor of the 128-byte swizzle, the swizzled tile offset and
// cp.async tile loader, and the async-proxy fence; the warp-specialisation primitives (mbarriers,
// setmaxnreg, named barriers) of the producer/consumer kernels; the fp8 (e4m3) wgmma wrappers.
// Header-only and free of standard-library includes so that NVRTC can compile it.
//
// Conventions (PTX ISA, "Asynchronous Warpgroup Level Matrix Multiply-Accumulate"). A warpgroup is
// 4 consecutive warps (128 threads). For m64nNk16 with fp32 accumulators, thread t = 32 w + lane of
// the warpgroup holds d[4 j + e] = D[16 w + lane / 4 + 8 (e / 2)][8 j + 2 (lane % 4) + e % 2] for
// j < N / 8, e < 4: per n8 column block, the same layout as the C fragment of mma.sync m16n8k16,
// warp w owning rows 16 w .. 16 w + 15. A register A fragment (4 x 32-bit, two 16-bit values each)
// is the m16n8k16 A fragment of the warp's 16 rows, so the accumulators of n8 blocks 2k and 2k + 1,
// rounded pairwise to 16 bits, are the A fragment of k16 step k.
#pragma once

#include "mma_sm80.cuh"

namespace adaattn {

// Orders this thread's earlier register (and shared-memory) accesses before the next wgmma.mma_async.
__device__ __forceinline__ void wgmma_fence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }

// Closes the group of wgmma.mma_async issued by this warpgroup since the previous commit.
__device__ __forceinline__ void wgmma_commit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }

// Waits until at most N committed wgmma groups of this warpgroup are still in flight.
template <int N>
__device__ __forceinline__ void wgmma_wait() {
    asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Makes this thread's completed generic-proxy writes to shared memory (cp.async included) visible to
// the async proxy, through which wgmma reads its shared-memory operands.
__device__ __forceinline__ void fence_proxy_async() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

// Compiler-only fence on registers used by in-flight wgmma: the empty asm redefines each value, so
// no read or write of them moves across the surrounding volatile issue / wait statements.
template <int N>
__device__ __forceinline__ void reg_fence(float (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+f"(r[i])::"memory");
}

template <int N>
__device__ __forceinline__ void reg_fence(unsigned (&r)[N]) {
#pragma unroll
    for (int i = 0; i < N; ++i) asm volatile("" : "+r"(r[i])::"memory");
}

// Shared-memory matrix descriptor of an operand stored with the 128-byte swizzle (16-byte chunk c of
// each 128-byte line l is stored at chunk c ^ (l % 8); atoms of 8 lines = 1024 bytes, 1024-aligned):
// start address >> 4 in bits 0-13, leading-dimension byte offset >> 4 in bits 16-29, stride-dimension
// byte offset >> 4 in bits 32-45, base offset 0, layout type 1 (128-byte swizzle) in bits 62-63.
// K-major: lines are rows of 64 K-elements, `sbo` = bytes between 8-row groups, `lbo` unused.
// MN-major: lines are 64 MN-elements of one K index, `lbo` = bytes between 64-wide MN blocks,
// `sbo` = bytes between groups of 8 K indices. Adding (bytes >> 4) advances the start address.
__device__ __forceinline__ unsigned long long wgmma_desc_sw128(unsigned smem_addr, unsigned lbo, unsigned sbo) {
    return (unsigned long long)((smem_addr & 0x3ffffu) >> 4) | (unsigned long long)((lbo >> 4) & 0x3fffu) << 16 |
           (unsigned long long)((sbo >> 4) & 0x3fffu) << 32 | 1ull << 62;
}

// Byte offset of 16-byte chunk `chunk` of row `row` in a [ROWS][D] tile of 16-bit elements stored as
// D / 64 column blocks of [ROWS][64]: each row of a block is one 128-byte line whose chunk c sits at
// position c ^ (row % 8) (the 128-byte swizzle, given a 1024-byte-aligned tile).
template <int ROWS>
__device__ __forceinline__ int sw128_offset(int row, int chunk) {
    return (chunk >> 3) * (ROWS * 128) + row * 128 + ((chunk ^ row) & 7) * 16;
}

// Issue cp.async copies of a [ROWS][D] tile whose first global row is row0 into the swizzled tile at
// shared address `smem`; rows at or past row_end are zero-filled (src-size 0, source clamped to the
// base pointer). Lane tid keeps chunk tid % (D / 8) and steps by a multiple of 8 rows, so consecutive
// lanes read consecutive global chunks, its swizzled shared offsets are compile-time steps, and 8
// lanes writing one 128-byte line hit 8 distinct 4-bank groups.
template <int ROWS, int D, int NTHREADS, typename T>
__device__ __forceinline__ void load_tile_sw128(unsigned smem, const T* gmem, long long row_stride, int row0,
                                                int row_end, int tid) {
    constexpr int CHUNKS = D / 8;
    constexpr int ROW_STEP = NTHREADS / CHUNKS;
    static_assert(NTHREADS % CHUNKS == 0 && ROW_STEP % 8 == 0, "unsupported thread count for this head dim");
    const int r0 = tid / CHUNKS;
    const int c = tid % CHUNKS;
    const int rows_left = row_end - row0 - r0;  // rows of this lane's column still in range
    const T* src = gmem + (long long)(row0 + r0) * row_stride + c * 8;
    const unsigned dst = smem + sw128_offset<ROWS>(r0, c);
#pragma unroll
    for (int i = 0; i < (ROWS + ROW_STEP - 1) / ROW_STEP; ++i) {
        if (ROWS % ROW_STEP == 0 || r0 + i * ROW_STEP < ROWS) {
            const bool in_range = i * ROW_STEP < rows_left;
            cp_async_16(dst + i * ROW_STEP * 128, in_range ? src : gmem, in_range ? 16 : 0);
        }
        src += ROW_STEP * row_stride;
    }
}

template <typename T>
struct IsBf16 {
    static constexpr bool value = false;
};
template <>
struct IsBf16<__nv_bfloat16> {
    static constexpr bool value = true;
};

// wgmma.mma_async m64nNk16, fp32 accumulators d[N / 2] in the layout above, T = __half / __nv_bfloat16:
//   ss: d = (scale_d ? d : 0) + A B^T with A [64][16] and B [N][16] both K-major in shared memory;
//   rs: d = (scale_d ? d : 0) + A B with A from registers and B [16][N] N-major in shared memory.
//   ss_mn: d = (scale_d ? d : 0) + A B with A (64 x 16) stored M-major, as A^T [16][64], and B [16][N]
//      N-major, both in shared memory (imm-trans-a = imm-trans-b = 1, legal for 16-bit types only).
template <int N>
struct Wgmma;

// "+f" operand lists for accumulators d[i .. i + 8) and d[i .. i + 32).
#define ADAATTN_ACC8(i)                                                                                          \
    "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
        "+f"(d[i + 7])
#define ADAATTN_ACC32(i) ADAATTN_ACC8(i), ADAATTN_ACC8(i + 8), ADAATTN_ACC8(i + 16), ADAATTN_ACC8(i + 24)

// PTX operand lists "%0, ..., %(N/2 - 1)" of the accumulators.
#define ADAATTN_WGMMA_DREGS_64 \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"

#define ADAATTN_WGMMA_DREGS_80 \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
    "%32, %33, %34, %35, %36, %37, %38, %39"

#define ADAATTN_WGMMA_DREGS_128 \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"

#define ADAATTN_WGMMA_DREGS_176 \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
    "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
    "%80, %81, %82, %83, %84, %85, %86, %87"

#define ADAATTN_WGMMA_DREGS_256 \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63, " \
    "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
    "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95, " \
    "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111, " \
    "%112, %113, %114, %115, %116, %117, %118, %119, %120, %121, %122, %123, %124, %125, %126, %127"

// One Wgmma<N> specialisation. The operand numbers of the inputs follow the N / 2 accumulators:
// SS_A, SS_B, SS_P = A descriptor, B descriptor, scale_d; RS_A, RS_B, RS_P = A registers, B, scale_d.
#define ADAATTN_WGMMA_SHAPE(N, DREGS, SS_A, SS_B, SS_P, RS_A, RS_B, RS_P, ...)                                  \
    template <>                                                                                                \
    struct Wgmma<N> {                                                                                          \
        template <typename T>                                                                                  \
        static __device__ __forceinline__ void ss(float (&d)[N / 2], unsigned long long a_desc,                \
                                                  unsigned long long b_desc, int scale_d) {                    \
            if constexpr (IsBf16<T>::value)                                                                    \
                asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SS_P ", 0;\n"                                 \
                             "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32.bf16.bf16 {" DREGS "}, " SS_A    \
                             ", " SS_B ", p, 1, 1, 0, 0;\n}\n"                                                 \
                             : __VA_ARGS__                                                                     \
                             : "l"(a_desc), "l"(b_desc), "r"(scale_d));                                        \
            else                                                                                               \
                asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SS_P ", 0;\n"                                 \
                             "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32.f16.f16 {" DREGS "}, " SS_A      \
                             ", " SS_B ", p, 1, 1, 0, 0;\n}\n"                                                 \
                             : __VA_ARGS__                                                                     \
                             : "l"(a_desc), "l"(b_desc), "r"(scale_d));                                        \
        }                                                                                                      \
        template <typename T>                                                                                  \
        static __device__ __forceinline__ void rs(float (&d)[N / 2], const unsigned (&a)[4],                   \
                                                  unsigned long long b_desc, int scale_d) {                    \
            if constexpr (IsBf16<T>::value)                                                                    \
                asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " RS_P ", 0;\n"                                 \
                             "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32.bf16.bf16 {" DREGS "}, " RS_A    \
                             ", " RS_B ", p, 1, 1, 1;\n}\n"                                                    \
                             : __VA_ARGS__                                                                     \
                             : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "r"(scale_d));         \
            else                                                                                               \
                asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " RS_P ", 0;\n"                                 \
                             "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32.f16.f16 {" DREGS "}, " RS_A      \
                             ", " RS_B ", p, 1, 1, 1;\n}\n"                                                    \
                             : __VA_ARGS__                                                                     \
                             : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "r"(scale_d));         \
        }                                                                                                      \
        template <typename T>                                                                                  \
        static __device__ __forceinline__ void ss_mn(float (&d)[N / 2], unsigned long long a_desc,             \
                                                     unsigned long long b_desc, int scale_d) {                 \
            if constexpr (IsBf16<T>::value)                                                                    \
                asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SS_P ", 0;\n"                                 \
                             "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32.bf16.bf16 {" DREGS "}, " SS_A    \
                             ", " SS_B ", p, 1, 1, 1, 1;\n}\n"                                                 \
                             : __VA_ARGS__                                                                     \
                             : "l"(a_desc), "l"(b_desc), "r"(scale_d));                                        \
            else                                                                                               \
                asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SS_P ", 0;\n"                                 \
                             "wgmma.mma_async.sync.aligned.m64n" #N "k16.f32.f16.f16 {" DREGS "}, " SS_A      \
                             ", " SS_B ", p, 1, 1, 1, 1;\n}\n"                                                 \
                             : __VA_ARGS__                                                                     \
                             : "l"(a_desc), "l"(b_desc), "r"(scale_d));                                        \
        }                                                                                                      \
    };

ADAATTN_WGMMA_SHAPE(64, ADAATTN_WGMMA_DREGS_64, "%32", "%33", "%34", "{%32, %33, %34, %35}", "%36", "%37",
                    ADAATTN_ACC32(0))
ADAATTN_WGMMA_SHAPE(80, ADAATTN_WGMMA_DREGS_80, "%40", "%41", "%42", "{%40, %41, %42, %43}", "%44", "%45",
                    ADAATTN_ACC32(0), ADAATTN_ACC8(32))
ADAATTN_WGMMA_SHAPE(128, ADAATTN_WGMMA_DREGS_128, "%64", "%65", "%66", "{%64, %65, %66, %67}", "%68", "%69",
                    ADAATTN_ACC32(0), ADAATTN_ACC32(32))
ADAATTN_WGMMA_SHAPE(176, ADAATTN_WGMMA_DREGS_176, "%88", "%89", "%90", "{%88, %89, %90, %91}", "%92", "%93",
                    ADAATTN_ACC32(0), ADAATTN_ACC32(32), ADAATTN_ACC8(64), ADAATTN_ACC8(72), ADAATTN_ACC8(80))
ADAATTN_WGMMA_SHAPE(256, ADAATTN_WGMMA_DREGS_256, "%128", "%129", "%130", "{%128, %129, %130, %131}", "%132", "%133",
                    ADAATTN_ACC32(0), ADAATTN_ACC32(32), ADAATTN_ACC32(64), ADAATTN_ACC32(96))

#undef ADAATTN_WGMMA_SHAPE
#undef ADAATTN_WGMMA_DREGS_64
#undef ADAATTN_WGMMA_DREGS_80
#undef ADAATTN_WGMMA_DREGS_128
#undef ADAATTN_WGMMA_DREGS_176
#undef ADAATTN_WGMMA_DREGS_256
#undef ADAATTN_ACC32
#undef ADAATTN_ACC8

}  // namespace adaattn

// ---- Warp specialisation: mbarriers, setmaxnreg, named barriers (attention_fwd_sm90_ws.cu,
// attention_fwd_fp8_sm90.cu) ---------------------------------------------------------------------------

namespace adaattn {

__device__ __forceinline__ void mbar_init(unsigned bar, unsigned count) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}

__device__ __forceinline__ void mbar_arrive(unsigned bar) {
    asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}

// Arrives on `bar` (one of its expected arrivals) and adds `bytes` to the transaction count its phase waits
// for: the phase completes once the TMA copies signalling `bar` have written that many bytes.
__device__ __forceinline__ void mbar_arrive_expect_tx(unsigned bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;\n" ::"r"(bar), "r"(bytes) : "memory");
}

// Blocks until the phase of `bar` with parity `parity` has completed.
__device__ __forceinline__ void mbar_wait(unsigned bar, unsigned parity) {
    unsigned done;
    do {
        asm volatile(
            "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
            : "=r"(done)
            : "r"(bar), "r"(parity)
            : "memory");
    } while (!done);
}

template <int REGS>
__device__ __forceinline__ void setmaxnreg_inc() {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(REGS));
}

template <int REGS>
__device__ __forceinline__ void setmaxnreg_dec() {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(REGS));
}

__device__ __forceinline__ void named_bar_sync(int id, int count) {
    asm volatile("bar.sync %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

__device__ __forceinline__ void named_bar_arrive(int id, int count) {
    asm volatile("bar.arrive %0, %1;\n" ::"r"(id), "r"(count) : "memory");
}

// Roles of a warp-specialised block: warpgroup 0 the producer, warpgroups 1 .. CONSUMERS the consumers.
// Registers: the launch gives each thread 65536 / THREADS (rounded down to 8: 168 with two consumers, 128
// with three); the producer drops to PRODUCER_REGS (setmaxnreg.dec) and the consumers rise to CONSUMER_REGS
// (setmaxnreg.inc): 128 * 40 + 256 * 232 = 64512 <= 384 * 168 and 128 * 32 + 384 * 160 = 65536 = 512 * 128,
// so the increase never waits for registers.
// Ping-pong, round robin: consumer c waits on named barrier 1 + c (256 threads: its own 128 plus the previous
// consumer's 128 bar.arrive) before issuing its GEMMs and hands the turn to the next consumer right after.
// The order runs on across work tiles: the last consumer's final turn of a tile opens consumer 0's first turn
// of the next, so consumer 0 starts the next tile's Q K^T while the others finish their P V and epilogue.
// The last consumer opens the very first turn (open) and consumer 0 takes the last hand-over before it
// exits (close), so every named barrier ends balanced. That needs every consumer to take the same number of
// turns per work tile (today n_blocks + 1 each, none for a fully masked tile): a consumer that skipped a turn
// of its own (say, for rows all past seqlen_q) would deadlock the others.
// Without PINGPONG the turns are no-ops: every consumer issues its GEMMs as soon as its operands are ready.
template <int CONSUMERS, bool PINGPONG>
struct WarpRoles {
    static_assert(CONSUMERS == 2 || CONSUMERS == 3, "two or three consumer warpgroups");
    static constexpr int THREADS = 128 * (1 + CONSUMERS);
    static constexpr int PRODUCER_REGS = CONSUMERS == 2 ? 40 : 32;
    static constexpr int CONSUMER_REGS =
        ((65536 / THREADS / 8 * 8) * THREADS - 128 * PRODUCER_REGS) / (128 * CONSUMERS) / 8 * 8;

    static __device__ __forceinline__ void open(int consumer) {
        if (PINGPONG && consumer == CONSUMERS - 1) named_bar_arrive(1, 256);
    }
    static __device__ __forceinline__ void close(int consumer) {
        if (PINGPONG && consumer == 0) named_bar_sync(1, 256);
    }
    static __device__ __forceinline__ void turn_begin(int consumer) {
        if (PINGPONG) named_bar_sync(1 + consumer, 256);
    }
    static __device__ __forceinline__ void turn_end(int consumer) {
        if (PINGPONG) named_bar_arrive(1 + (consumer + 1) % CONSUMERS, 256);
    }
};

// Online-softmax pieces on an m64nN fp32 accumulator s[N / 2] (layout at the top of this file): this thread
// holds rows row0 (elements 4 nt + {0, 1}) and row0 + 8 (4 nt + {2, 3}) of every n8 block nt, at columns
// key0 + 8 nt + {0, 1} with key0 = the tile's first key + 2 (lane % 4).

// Sets to -inf the scores of the key tile starting at tile_key0 (2 N keys; t = lane % 4) that lie past seqlen_k
// or (CAUSAL, bottom-right aligned) past key row + diag. Only a tile that reaches past the ragged key end or,
// causal, past the first key hidden from `first_row` (the warpgroup's first row) has any: others return at once.
template <bool CAUSAL, int N>
__device__ __forceinline__ void mask_scores(float (&s)[N], int tile_key0, int t, int first_row, int row0,
                                            int seqlen_k, int diag) {
    const int key_end = tile_key0 + 2 * N;
    if (key_end <= seqlen_k && !(CAUSAL && key_end - 1 > first_row + diag)) return;
    const int key0 = tile_key0 + 2 * t;
#pragma unroll
    for (int nt = 0; nt < N / 4; ++nt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
            const int row = row0 + (e >> 1) * 8;
            const int col = key0 + nt * 8 + (e & 1);
            if (col >= seqlen_k || (CAUSAL && col > row + diag)) s[4 * nt + e] = neg_inf();
        }
}

// The max of row r's scores over the 4 lanes of the quad that holds the row.
template <int N>
__device__ __forceinline__ float quad_row_max(const float (&s)[N], int r) {
    float mx = neg_inf();
#pragma unroll
    for (int nt = 0; nt < N / 4; ++nt) mx = fmaxf(mx, fmaxf(s[4 * nt + 2 * r], s[4 * nt + 2 * r + 1]));
    return quad_max(mx);
}

// Row r's scores x -> 2^(x * factor - m) in place (one FFMA and one ex2 each), factor[p] for the p-th of PARTS
// equal ranges of the tile's n8 blocks; returns this lane's sum of them.
template <int N, int PARTS>
__device__ __forceinline__ float exp2_row(float (&s)[N], int r, const float (&factor)[PARTS], float m) {
    constexpr int BLOCKS = N / 4 / PARTS;  // n8 column blocks per range
    static_assert(BLOCKS * PARTS * 4 == N, "whole n8 blocks per range");
    float sum = 0.f;
#pragma unroll
    for (int nt = 0; nt < N / 4; ++nt)
#pragma unroll
        for (int e = 2 * r; e < 2 * r + 2; ++e) {
            const float pe = fast_exp2(fmaf(s[4 * nt + e], factor[nt / BLOCKS], -m));
            s[4 * nt + e] = pe;
            sum += pe;
        }
    return sum;
}

// Moves the reference max m (row_max, log2 domain) to the tile's max mx only when mx exceeds it by more than
// rescale_log2 (lazy rescaling, FlashAttention-4); returns corr = 2^(m_old - m_new), 1 when m stays.
__device__ __forceinline__ float move_reference_max(float mx, float rescale_log2, float& row_max) {
    float corr = 1.f;
    if (mx > row_max + rescale_log2) {  // never for a tile with no admissible key (mx = -inf)
        corr = fast_exp2(row_max - mx);  // 0 on the first admissible tile (O and l are 0)
        row_max = mx;
    }
    return corr;
}

// One tile's online-softmax step for row r, with lazy rescaling (move_reference_max), so the caller's O
// rescale can be skipped whenever the returned corr is 1. The scores become 2^(s * factor - m + shift) in place
// (shift: a constant scale of P; the bf16 kernel passes 0) and their sum is added to row_sum (this lane's part
// of the row). factor > 0. The fp8 kernel uses the overload below, one factor per K scale block.
template <int N>
__device__ __forceinline__ float online_softmax_row(float (&s)[N], int r, float factor, float rescale_log2,
                                                    float shift, float& row_max, float& row_sum) {
    // -inf stays -inf under the scaling; the quad agrees on mx, so on the branch
    const float corr = move_reference_max(quad_row_max(s, r) * factor, rescale_log2, row_max);
    // A row with no admissible key yet keeps m = -inf; use 0 so -inf - -inf never occurs.
    const float m = row_max == neg_inf() ? 0.f : row_max;
    const float factors[1] = {factor};
    row_sum = row_sum * corr + exp2_row(s, r, factors, m - shift);
    return corr;
}

// online_softmax_row with its own factor for each of PARTS equal ranges of the tile's columns (the fp8 kernel's
// K scales, one per BLOCK_N / PARTS keys): the lane's max of each range is scaled before the quad's reduction
// (the factors are > 0, so the scaled max is the max of the scaled scores, bit for bit).
template <int N, int PARTS>
__device__ __forceinline__ float online_softmax_row(float (&s)[N], int r, const float (&factor)[PARTS],
                                                    float rescale_log2, float shift, float& row_max,
                                                    float& row_sum) {
    constexpr int BLOCKS = N / 4 / PARTS;  // n8 column blocks per range
    static_assert(BLOCKS * PARTS * 4 == N, "whole n8 blocks per range");
    float mx = neg_inf();
#pragma unroll
    for (int p = 0; p < PARTS; ++p) {
        float part = neg_inf();
#pragma unroll
        for (int nt = p * BLOCKS; nt < (p + 1) * BLOCKS; ++nt)
            part = fmaxf(part, fmaxf(s[4 * nt + 2 * r], s[4 * nt + 2 * r + 1]));
        mx = fmaxf(mx, part * factor[p]);
    }
    mx = quad_max(mx);
    const float corr = move_reference_max(mx, rescale_log2, row_max);
    const float m = row_max == neg_inf() ? 0.f : row_max;
    row_sum = row_sum * corr + exp2_row(s, r, factor, m - shift);
    return corr;
}

// Transposes a 4 x 4 block of 32-bit words over the 4 lanes of a quad (lane t = lane % 4): word c of lane t
// becomes word t of lane c. Two xor exchanges (lanes t ^ 1, then t ^ 2), each swapping one bit of the lane
// with one bit of the word; 4 shuffles. An m64nN accumulator holds columns 2t, 2t + 1 of each n8 block in lane t:
// after the transpose, packed in 16-bit pairs, lane t holds all 8 columns of n8 block 4j + t, a 16-byte store.
__device__ __forceinline__ void quad_transpose(unsigned (&x)[4], int t) {
#pragma unroll
    for (int bit = 0; bit < 2; ++bit) {
        const bool upper = (t >> bit) & 1;
#pragma unroll
        for (int i = 0; i < 2; ++i) {
            // the pair of words (differing in `bit`) at position i of the other bits
            const int lo = bit == 0 ? 2 * i : i, hi = lo + (1 << bit);
            const unsigned got = __shfl_xor_sync(0xffffffffu, upper ? x[lo] : x[hi], 1 << bit);
            if (upper) x[lo] = got;
            else x[hi] = got;
        }
    }
}

// The mbarriers of a STAGES-deep K/V pipeline (8 bytes each, in 128 bytes at `base`): Q full, Q empty, then per
// stage K full, V full, K empty, V empty; after them the 4-byte slot where a persistent kernel's producer posts
// the next work tile. "full" expects the TMA producer thread's one arrival (plus the tile's bytes), "empty" one
// arrival per consumer warp. `init` is for one thread, before a CTA-wide barrier.
template <int STAGES>
struct StageBarriers {
    static_assert(16 + 32 * STAGES + 4 <= 128, "mbarriers overflow their 128 bytes");
    unsigned base;
    __device__ __forceinline__ unsigned q_full() const { return base; }
    __device__ __forceinline__ unsigned q_empty() const { return base + 8; }
    __device__ __forceinline__ unsigned k_full(int s) const { return base + 16 + 32 * s; }
    __device__ __forceinline__ unsigned v_full(int s) const { return base + 24 + 32 * s; }
    __device__ __forceinline__ unsigned k_empty(int s) const { return base + 32 + 32 * s; }
    __device__ __forceinline__ unsigned v_empty(int s) const { return base + 40 + 32 * s; }
    __device__ __forceinline__ unsigned tile_slot() const { return base + 16 + 32 * STAGES; }
    __device__ __forceinline__ void init(int consumers) const {
        mbar_init(q_full(), 1);
        mbar_init(q_empty(), 4 * consumers);
        for (int s = 0; s < STAGES; ++s) {
            mbar_init(k_full(s), 1);
            mbar_init(v_full(s), 1);
            mbar_init(k_empty(s), 4 * consumers);
            mbar_init(v_empty(s), 4 * consumers);
        }
    }
};

// The consumers' side of a K/V stage: wait until the producer's TMA writes to it have landed (they are in the
// async proxy, like the wgmma reads: no proxy fence) ...
__device__ __forceinline__ void consumer_wait_full(unsigned bar, unsigned parity) { mbar_wait(bar, parity); }

// ... and, once this warp's wgmmas reading the stage have completed, hand it back (one arrival per warp).
__device__ __forceinline__ void consumer_release(unsigned bar, int lane) {
    __syncwarp();
    if (lane == 0) mbar_arrive(bar);
}

// Registers written by ordinary instructions (S, O, P fragments) are complete before the wgmmas that read them.
template <int NS, int NO, int KN>
__device__ __forceinline__ void fence_operands(float (&s)[NS], float (&o)[NO], unsigned (&p)[KN][4]) {
    reg_fence(s);
    reg_fence(o);
#pragma unroll
    for (int kn = 0; kn < KN; ++kn) reg_fence(p[kn]);
    wgmma_fence();
}

// After the softmax of the main loop's iteration `it`: waits for the previous tile's P V (wait_group 0: O and the P
// registers are free again). As one plain wgmma_wait<0> after the softmax, ptxas scheduled the wait at the top of
// the softmax's basic block, ahead of every exp2 (SASS of both forward kernels), so P V no longer ran under the
// softmax. Here the wait sits in both arms of a branch on the parity of `it`, which ends that block; the condition is
// the same for every thread of the warpgroup, as wait_group's .aligned requires, and the arms' asm differ by a PTX
// comment so that the compiler cannot merge them back above the branch. scripts/compile_kernels.py --sass checks
// where the wait lands.
__device__ __forceinline__ void wgmma_wait_after_softmax(int it) {
    if (it & 1)
        asm volatile("wgmma.wait_group.sync.aligned 0;  // odd iteration\n" ::: "memory");
    else
        wgmma_wait<0>();
}

// Whether a row of the warp moved its max on this tile (corr != 1): rescale_o's warp-uniform condition. Voted
// before finish_previous_pv's wait for P V, where ptxas schedules the vote among the softmax's exponentials; voted
// inside rescale_o, after the wait, its latency sat exposed between the wait and the branch (ncu stall samples,
// notes/forward-tuning.md, session 14).
__device__ __forceinline__ bool warp_max_moved(const float (&corr)[2]) {
    return __any_sync(0xffffffffu, corr[0] != 1.f || corr[1] != 1.f);
}

// O *= corr per row after the wait for P V (corr = 2^(m_old - m_new), 1 where the row max did not move), the one
// copy both sm90 forwards call. `moved` (warp_max_moved) is uniform per warp, so the branch is too (legal: no wgmma
// in it): a warp whose rows all kept their max skips the multiplies; multiplying an unchanged row by 1 is exact.
// (Measured level with a per-thread branch: notes/forward-tuning.md, session 13.)
template <int NO>
__device__ __forceinline__ void rescale_o(float (&o)[NO], const float (&corr)[2], bool moved) {
    if (moved) {
#pragma unroll
        for (int i = 0; i < NO; ++i) o[i] *= corr[(i & 3) >> 1];  // accumulator layout: rows r, r + 8 per n8 block
    }
}

// The main loop's step after the softmax of iteration `it`, in both sm90 forwards: wait for the previous tile's
// P V, fence O and the P fragments (their registers are free again), hand that tile's V stage back (`v_empty`) and
// rescale O by the new tile's corr.
template <int NO, int KN>
__device__ __forceinline__ void finish_previous_pv(int it, float (&o)[NO], unsigned (&p)[KN][4], unsigned v_empty,
                                                   int lane, const float (&corr)[2]) {
    const bool moved = warp_max_moved(corr);  // before the wait: see warp_max_moved
    wgmma_wait_after_softmax(it);
    reg_fence(o);
#pragma unroll
    for (int kn = 0; kn < KN; ++kn) reg_fence(p[kn]);
    consumer_release(v_empty, lane);
    rescale_o(o, corr, moved);
}

// One consumer warpgroup's turn on the tensor cores (WarpRoles: waits for it under ping-pong): the register
// operands are fenced, `issue` issues and commits the turn's wgmma groups, and the turn passes on.
template <typename Roles, int NS, int NO, int KN, typename Issue>
__device__ __forceinline__ void gemm_turn(int consumer, float (&s)[NS], float (&o)[NO], unsigned (&p)[KN][4],
                                          Issue&& issue) {
    Roles::turn_begin(consumer);
    fence_operands(s, o, p);
    issue();
    Roles::turn_end(consumer);
}

}  // namespace adaattn

// ---- TMA: tile loads through a tensor map (cp.async.bulk.tensor) ---------------------------------------

namespace adaattn {

// The driver's CUtensorMap (cuda.h, which NVRTC does not ship) as an opaque 128-byte, 64-byte-aligned
// value. adaattn_core/tma.py encodes it on the host with cuTensorMapEncodeTiled; kernels take it by value as a
// `const __grid_constant__` parameter, so the TMA unit reads it straight from parameter space.
struct alignas(64) TmaMap {
    unsigned long long words[16];
};

// Pulls a tensor map into the TMA unit's descriptor cache ahead of its first copy.
__device__ __forceinline__ void tma_prefetch_map(const TmaMap* map) {
    asm volatile("prefetch.tensormap [%0];\n" ::"l"(reinterpret_cast<unsigned long long>(map)) : "memory");
}

// One TMA copy of the box at coordinates (c0, c1, c2, c3) of a 4-D tensor map into `smem`, completing on `bar`.
__device__ __forceinline__ void tma_copy_4d(unsigned smem, const TmaMap* map, unsigned bar, int c0, int c1, int c2,
                                            int c3) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%2, %3, %4, %5}], [%6];\n" ::"r"(smem),
        "l"(reinterpret_cast<unsigned long long>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(bar)
        : "memory");
}

// Copies the [ROWS][ROW_BYTES] tile at rows row0 .. row0 + ROWS - 1, columns from col0 (elements), of head
// `head`, batch `batch` of a [B][H][S][columns] tensor of ELEM_BYTES-byte elements into the K-major swizzled
// layout the wgmma descriptors read at `smem` (1024-byte aligned): lines of LINE = min(ROW_BYTES, 128) bytes
// with the LINE-byte swizzle (16-byte chunk c of row r at c ^ (r % 8) for 128 bytes, c ^ (r / 2 % 4) for 64),
// rows longer than LINE split in column blocks of [ROWS][LINE] (sw128_offset). `map` is 4-D (columns, S, H, B,
// innermost first) with a box of LINE bytes by ROWS rows and that swizzle (adaattn_core/tma.py), so each of the
// ROW_BYTES / LINE copies writes one column block; rows past S are zero-filled by the TMA unit. One thread
// issues it; the copies complete on `bar`, which this call arms (one arrival plus the tile's bytes).
template <int ROWS, int ROW_BYTES, int ELEM_BYTES>
__device__ __forceinline__ void tma_load_tile(unsigned smem, const TmaMap* map, unsigned bar, int col0, int row0,
                                              int head, int batch) {
    constexpr int LINE = ROW_BYTES < 128 ? ROW_BYTES : 128;
    static_assert(LINE == 64 || LINE == 128, "the kernels' tiles use the 64- or 128-byte swizzle");
    mbar_arrive_expect_tx(bar, ROWS * ROW_BYTES);
#pragma unroll
    for (int cb = 0; cb < ROW_BYTES / LINE; ++cb)
        tma_copy_4d(smem + cb * ROWS * LINE, map, bar, col0 + cb * LINE / ELEM_BYTES, row0, head, batch);
}

// Copies CHUNKS consecutive [ROWS][32]-byte blocks, rows row0 .. row0 + CHUNKS * ROWS - 1 of head `head`, batch
// `batch` of a [B][H][S][32] byte tensor, to [CHUNKS][ROWS][32] at `smem` (256-byte aligned) with the 32-byte
// swizzle (16-byte half c of row r at c ^ (r / 4 % 2)): CHUNKS K-major wgmma operands of one 32-byte line per
// row (the fp8 kernel's V^T, a chunk per k32 step). `map`: a box of 32 bytes by ROWS rows, 32-byte swizzle.
// Arms `bar` as tma_load_tile does.
template <int CHUNKS, int ROWS>
__device__ __forceinline__ void tma_load_chunks(unsigned smem, const TmaMap* map, unsigned bar, int row0, int head,
                                                int batch) {
    mbar_arrive_expect_tx(bar, CHUNKS * ROWS * 32);
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) tma_copy_4d(smem + c * ROWS * 32, map, bar, 0, row0 + c * ROWS, head, batch);
}

}  // namespace adaattn

// ---- FP8 (e4m3) helpers: attention_fwd_fp8_sm90.cu and quantize_fp8.cu ---------------------------------

namespace adaattn {

// Four fp32 values rounded (nearest even, saturating at +-448) to e4m3, element 0 in the low byte.
__device__ __forceinline__ unsigned pack4_e4m3(float x0, float x1, float x2, float x3) {
    unsigned short lo, hi;
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(lo) : "f"(x1), "f"(x0));
    asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;\n" : "=h"(hi) : "f"(x3), "f"(x2));
    return (unsigned)lo | (unsigned)hi << 16;
}

// wgmma.mma_async m64nNk32 e4m3 x e4m3 -> fp32, d[N / 2] in the accumulator layout of wgmma_sm90.cuh:
//   ss: d = (scale_d ? d : 0) + A B^T, A [64][32] and B [N][32] K-major in shared memory;
//   rs: the same with A from registers (4 x 32-bit, 4 e4m3 each: rows g / g + 8, k 4t.. and 16 + 4t..).
template <int N>
struct WgmmaE4m3;

#define ADAATTN_E4M3_ACC8(i)                                                                                          \
    "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3]), "+f"(d[i + 4]), "+f"(d[i + 5]), "+f"(d[i + 6]), \
        "+f"(d[i + 7])
#define ADAATTN_E4M3_ACC32(i) \
    ADAATTN_E4M3_ACC8(i), ADAATTN_E4M3_ACC8(i + 8), ADAATTN_E4M3_ACC8(i + 16), ADAATTN_E4M3_ACC8(i + 24)
#define ADAATTN_E4M3_DREGS_64 \
    "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, " \
    "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define ADAATTN_E4M3_DREGS_128 ADAATTN_E4M3_DREGS_64 ", " \
    "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, " \
    "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
#define ADAATTN_E4M3_DREGS_192 ADAATTN_E4M3_DREGS_128 ", " \
    "%64, %65, %66, %67, %68, %69, %70, %71, %72, %73, %74, %75, %76, %77, %78, %79, " \
    "%80, %81, %82, %83, %84, %85, %86, %87, %88, %89, %90, %91, %92, %93, %94, %95"
#define ADAATTN_E4M3_DREGS_224 ADAATTN_E4M3_DREGS_192 ", " \
    "%96, %97, %98, %99, %100, %101, %102, %103, %104, %105, %106, %107, %108, %109, %110, %111"

#define ADAATTN_WGMMA_E4M3(N, DREGS, SS_A, SS_B, SS_P, RS_A, RS_B, RS_P, ...)                                   \
    template <>                                                                                                \
    struct WgmmaE4m3<N> {                                                                                      \
        static __device__ __forceinline__ void ss(float (&d)[N / 2], unsigned long long a_desc,                \
                                                  unsigned long long b_desc, int scale_d) {                    \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " SS_P ", 0;\n"                                     \
                         "wgmma.mma_async.sync.aligned.m64n" #N "k32.f32.e4m3.e4m3 {" DREGS "}, " SS_A ", " SS_B \
                         ", p, 1, 1;\n}\n"                                                                     \
                         : __VA_ARGS__                                                                         \
                         : "l"(a_desc), "l"(b_desc), "r"(scale_d));                                            \
        }                                                                                                      \
        static __device__ __forceinline__ void rs(float (&d)[N / 2], const unsigned (&a)[4],                   \
                                                  unsigned long long b_desc, int scale_d) {                    \
            asm volatile("{\n.reg .pred p;\nsetp.ne.b32 p, " RS_P ", 0;\n"                                     \
                         "wgmma.mma_async.sync.aligned.m64n" #N "k32.f32.e4m3.e4m3 {" DREGS "}, " RS_A ", " RS_B \
                         ", p, 1, 1;\n}\n"                                                                     \
                         : __VA_ARGS__                                                                         \
                         : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b_desc), "r"(scale_d));             \
        }                                                                                                      \
    };

ADAATTN_WGMMA_E4M3(64, ADAATTN_E4M3_DREGS_64, "%32", "%33", "%34", "{%32, %33, %34, %35}", "%36", "%37",
                   ADAATTN_E4M3_ACC32(0))
ADAATTN_WGMMA_E4M3(128, ADAATTN_E4M3_DREGS_128, "%64", "%65", "%66", "{%64, %65, %66, %67}", "%68", "%69",
                   ADAATTN_E4M3_ACC32(0), ADAATTN_E4M3_ACC32(32))
ADAATTN_WGMMA_E4M3(192, ADAATTN_E4M3_DREGS_192, "%96", "%97", "%98", "{%96, %97, %98, %99}", "%100", "%101",
                   ADAATTN_E4M3_ACC32(0), ADAATTN_E4M3_ACC32(32), ADAATTN_E4M3_ACC32(64))
ADAATTN_WGMMA_E4M3(224, ADAATTN_E4M3_DREGS_224, "%112", "%113", "%114", "{%112, %113, %114, %115}", "%116", "%117",
                   ADAATTN_E4M3_ACC32(0), ADAATTN_E4M3_ACC32(32), ADAATTN_E4M3_ACC32(64), ADAATTN_E4M3_ACC8(96),
                   ADAATTN_E4M3_ACC8(104))

#undef ADAATTN_WGMMA_E4M3
#undef ADAATTN_E4M3_DREGS_64
#undef ADAATTN_E4M3_DREGS_128
#undef ADAATTN_E4M3_DREGS_192
#undef ADAATTN_E4M3_DREGS_224
#undef ADAATTN_E4M3_ACC32
#undef ADAATTN_E4M3_ACC8

}  // namespace adaattn
// ---- end of FP8 helpers ------------------------------------------------------------------------------
