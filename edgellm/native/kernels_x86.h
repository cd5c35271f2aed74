/* Helpers of the x86 SIMD files (kernels_avx2.c, kernels_avx512.c), included under each file's target pragma. The
 * AVX-512 kernels reduce with these same functions, so their sums are the AVX2 kernels' bit for bit. */
#ifndef EL_KERNELS_X86_H
#define EL_KERNELS_X86_H
#include <immintrin.h>

#define INLINE static inline __attribute__((always_inline))

INLINE float hsum(__m256 v) {
    __m128 x = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_add_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_add_ss(x, _mm_movehdup_ps(x)));
}

/* [sum a, sum b, sum c, sum d] */
INLINE __m128 hsum4(__m256 a, __m256 b, __m256 c, __m256 d) {
    __m256 abcd = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
    return _mm_add_ps(_mm256_castps256_ps128(abcd), _mm256_extractf128_ps(abcd, 1));
}

/* The matmul kernels' shapes (kernels_avx2.c; the AVX-512 kernels take the same, so their sums are the same) */
#define TR 4     /* rows per tile */
#define TC 64    /* tokens per chunk: the chunk's activations stay in L2 while all row tiles pass over them */
#define RG 8     /* blocks per group: their integer dots in one vector's lanes, scaled by one FMA */
#define RS 16    /* rows per slab: the slab's weights stay in L1 while the token chunk passes over them */
#define XACC 4   /* accumulators per row: block b's term into b % XACC, then a tree (as exact as el_repack's rows) */
#define XT 8     /* act rows per GEMM tile: a block's unpacked weights serve 8 tokens (4 and 16 measured slower) */
/* Decode reads each weight once from DRAM: software prefetch this far ahead of the row in use (el_prefetch_bytes, by
 * table). The hardware prefetcher alone left a cold GEMV at ~70% of the same GEMV on L2-resident weights */
#define PF_BYTES el_pf_bytes

#endif
