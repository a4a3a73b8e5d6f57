// Device helpers for sm_80+ tensor-core kernels: PTX wrappers for cp.async, ldmatrix and
// mma.sync m16n8k16, fast exp2/log2, fp32 -> 16-bit packing, and the shared-memory swizzle.
// Header-only and free of standard-library includes so that NVRTC can compile it.
#pragma once

#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace adaattn {

// -inf without <cmath>'s INFINITY.
__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000u); }

// 32-bit shared-state-space address of a generic pointer into shared memory.
__device__ __forceinline__ unsigned smem_u32(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

// 16-byte async global->shared copy; bytes [src_bytes, 16) of the destination are zero-filled.
__device__ __forceinline__ void cp_async_16(unsigned dst, const void* src, int src_bytes) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes)
                 : "memory");
}

// Close the current group of cp.async copies.
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Wait until at most N committed cp.async groups of this thread are still in flight.
template <int N>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 b16 matrices from shared memory; lanes 8i..8i+7 give the row addresses of matrix i.
__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// Same as ldmatrix_x4 but each 8x8 matrix is transposed on the way into registers.
__device__ __forceinline__ void ldmatrix_x4_trans(unsigned (&r)[4], unsigned addr) {
    asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
                 : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
                 : "r"(addr));
}

// c += a * b on one m16n8k16 tile, 16-bit inputs (T = __half or __nv_bfloat16), fp32 accumulators.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1);

template <>
__device__ __forceinline__ void mma_16816<__half>(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                                  unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

template <>
__device__ __forceinline__ void mma_16816<__nv_bfloat16>(float (&c)[4], const unsigned (&a)[4], unsigned b0,
                                                         unsigned b1) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Two fp32 values rounded to one packed 16-bit pair; `lo` lands in the low half (lower column index).
// Rows [m_start, m_start + BLOCK_M) of one head that see no key: out = 0, lse = -inf, by the block's NTHREADS
// threads (16-byte stores; rows past seqlen_q untouched). The forwards' exit for a fully masked query block.
template <int BLOCK_M, int HEAD_DIM, int NTHREADS, typename T>
__device__ __forceinline__ void write_masked_rows(T* o_ptr, long long o_stride_s, float* lse_ptr, int m_start,
                                                  int seqlen_q, int tid) {
    constexpr int DT = HEAD_DIM / 8;  // 16-byte chunks per row
    for (int idx = tid; idx < BLOCK_M * DT; idx += NTHREADS) {
        const int row = m_start + idx / DT;
        if (row < seqlen_q)
            *reinterpret_cast<uint4*>(o_ptr + row * o_stride_s + (idx % DT) * 8) = make_uint4(0, 0, 0, 0);
    }
    for (int r = tid; r < BLOCK_M; r += NTHREADS)
        if (m_start + r < seqlen_q) lse_ptr[m_start + r] = neg_inf();
}

template <typename T>
__device__ __forceinline__ unsigned pack2(float lo, float hi);

template <>
__device__ __forceinline__ unsigned pack2<__half>(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

template <>
__device__ __forceinline__ unsigned pack2<__nv_bfloat16>(float lo, float hi) {
    unsigned r;
    asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
    return r;
}

// Total and max of a row spread over the 4 lanes of an mma quad (each lane holds two columns of every n8 block).
__device__ __forceinline__ float quad_sum(float x) {
    x += __shfl_xor_sync(0xffffffffu, x, 1);
    return x + __shfl_xor_sync(0xffffffffu, x, 2);
}
__device__ __forceinline__ float quad_max(float x) {
    x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
    return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

// 2^x on the SFU (ex2.approx.ftz); 2^-inf = +0.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// 1/x on the SFU (rcp.approx.ftz, ~1 ulp).
__device__ __forceinline__ float fast_rcp(float x) {
    float y;
    asm("rcp.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// log2(x) on the SFU (lg2.approx.ftz).
__device__ __forceinline__ float fast_log2(float x) {
    float y;
    asm("lg2.approx.ftz.f32 %0, %1;\n" : "=f"(y) : "f"(x));
    return y;
}

// XOR swizzle of 16-byte chunks in a row-major [rows][D] shared tile of 16-bit elements: the chunk
// index is XORed with a per-row key so that the 8 rows read by one ldmatrix phase (or the 128 bytes
// written by 8 consecutive cp.async lanes) fall into 8 distinct 4-bank groups. D % 64 == 0: rows are
// whole 128-byte lines, key = row % 8. D % 64 == 32: row parity already selects the bank half, so
// the key is (row / 2) % 4 and only XORs within aligned groups of 4 chunks (stays inside the row).
template <int D>
struct Swizzle {
    static_assert(D % 32 == 0, "head dim must be a multiple of 32");
    static constexpr int SHIFT = D % 64 == 0 ? 0 : 1;
    static constexpr int MASK = D % 64 == 0 ? 7 : 3;

    // Swizzle key of a row; it depends only on row % 16.
    static __device__ __forceinline__ int key(int row) { return (row >> SHIFT) & MASK; }

    // Element offset of chunk `chunk` in row `row`.
    static __device__ __forceinline__ int offset(int row, int chunk) { return row * D + (chunk ^ key(row)) * 8; }

    // Shared address of an ldmatrix row for one lane. `lane_addr` = tile base + 2 * offset(r, c0) for
    // the lane's own row r < 16 and chunk c0 in {0, 1}; `row` (a multiple of 16) and `chunk` (even)
    // are displacements that become immediates once loops are unrolled: XORing the low chunk bits
    // into lane_addr equals re-swizzling (the tile base is 128-byte aligned and row % 16 keeps the
    // key), and the remaining bits fold into the instruction's offset field.
    static __device__ __forceinline__ unsigned ldsm_addr(unsigned lane_addr, int row, int chunk) {
        return (lane_addr ^ ((chunk & MASK) * 16)) + (chunk & ~MASK) * 16 + row * D * 2;
    }
};

// Copy a [ROWS][D] tile of 16-bit elements whose first global row is row0 into swizzled shared memory
// with cp.async; rows at or past row_end are zero-filled (src-size 0, source clamped to the base).
// Lane tid copies 16-byte chunks tid, tid + NTHREADS, ... in row-major order, so consecutive lanes read
// consecutive global chunks. When NTHREADS is a multiple of the chunks per row, each lane keeps one
// column and steps by a fixed number of rows: one 64-bit pointer advanced by one stride increment, and
// compile-time shared offsets (few registers in kernels that prefetch inside their main loop).
template <int ROWS, int D, int NTHREADS, typename T>
__device__ __forceinline__ void copy_tile_async(T* smem, const T* gmem, long long row_stride, int row0,
                                                int row_end, int tid) {
    constexpr int CHUNKS = D / 8;
    constexpr int ITERS = ROWS * CHUNKS / NTHREADS;
    static_assert(ROWS * CHUNKS % NTHREADS == 0, "tile must split evenly over the threads");
    if constexpr (NTHREADS % CHUNKS == 0) {
        constexpr int ROW_STEP = NTHREADS / CHUNKS;
        const int r0 = tid / CHUNKS;
        const int c = tid % CHUNKS;
        const int rows_left = row_end - row0 - r0;  // rows of this lane's column still in range
        const T* src = gmem + (long long)(row0 + r0) * row_stride + c * 8;
#pragma unroll
        for (int i = 0; i < ITERS; ++i) {
            const bool in_range = i * ROW_STEP < rows_left;
            cp_async_16(smem_u32(smem + Swizzle<D>::offset(r0 + i * ROW_STEP, c)), in_range ? src : gmem,
                        in_range ? 16 : 0);
            src += ROW_STEP * row_stride;
        }
    } else {
#pragma unroll
        for (int i = 0; i < ITERS; ++i) {
            const int idx = tid + i * NTHREADS;
            const int r = idx / CHUNKS;
            const int c = idx % CHUNKS;
            const bool in_range = row0 + r < row_end;
            const T* src = gmem + (in_range ? (long long)(row0 + r) * row_stride + c * 8 : 0);
            cp_async_16(smem_u32(smem + Swizzle<D>::offset(r, c)), src, in_range ? 16 : 0);
        }
    }
}

// Inverse of pack2: the packed 16-bit pair as fp32 (x = low half, the lower column index).
template <typename T>
__device__ __forceinline__ float2 unpack2(unsigned packed);

template <>
__device__ __forceinline__ float2 unpack2<__half>(unsigned packed) {
    return __half22float2(*reinterpret_cast<const __half2*>(&packed));
}

template <>
__device__ __forceinline__ float2 unpack2<__nv_bfloat16>(unsigned packed) {
    return make_float2(__uint_as_float(packed << 16), __uint_as_float(packed & 0xffff0000u));
}

// p[0] += a, p[1] += b in global memory without returning the old values (one vector red on sm_90+).
__device__ __forceinline__ void red_add_f32x2(float* p, float a, float b) {
#if __CUDA_ARCH__ >= 900
    asm volatile("red.global.add.v2.f32 [%0], {%1, %2};\n" ::"l"(p), "f"(a), "f"(b) : "memory");
#else
    atomicAdd(p, a);
    atomicAdd(p + 1, b);
#endif
}

}  // namespace adaattn
