/* AVX2 + FMA + F16C kernels. The library is compiled for baseline x86-64; only this file's functions are
 * compiled for AVX2 (pragma below) and they are reached solely through el_kernels_avx2 after a cpuid check. */
#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include "kernels.h"

#include <immintrin.h>
#include <math.h>
#include <stdlib.h>

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

INLINE float f16(uint16_t h) { return _cvtsh_ss(h); }

/* ---------------- activation quantization ---------------- */

static void quant_act_avx2(const float *x, el_block_q8a *y, int nb) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    for (int b = 0; b < nb; b++, x += EL_QK, y++) {
        __m256 v[4], mx = _mm256_setzero_ps();
        for (int k = 0; k < 4; k++) {
            v[k] = _mm256_loadu_ps(x + 8 * k);
            mx = _mm256_max_ps(mx, _mm256_andnot_ps(sign, v[k]));
        }
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        float amax = _mm_cvtss_f32(_mm_max_ss(m4, _mm_movehdup_ps(m4)));
        float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        __m256 vid = _mm256_set1_ps(id);
        __m256i q[4];
        for (int k = 0; k < 4; k++) q[k] = _mm256_cvtps_epi32(_mm256_mul_ps(v[k], vid));   /* half to even */
        __m256i s = _mm256_add_epi32(_mm256_add_epi32(q[0], q[1]), _mm256_add_epi32(q[2], q[3]));
        __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
        s4 = _mm_hadd_epi32(s4, s4);
        s4 = _mm_hadd_epi32(s4, s4);
        /* i32 -> i8 keeping order: packs interleave 128-bit lanes, the permute undoes it */
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i *)y->qs, p);
        y->d = d;
        y->s = d * (float)_mm_cvtsi128_si32(s4);
    }
}

/* ---------------- quantized dot products ---------------- */

/* 32 weights of one block as bytes: unsigned nibbles for Q4_0/Q4_1, signed for Q8_0 */
INLINE __m256i load_w(int type, const uint8_t *blk) {
    if (type == EL_Q8_0) return _mm256_loadu_si256((const __m256i *)(blk + 2));
    __m128i x = _mm_loadu_si128((const __m128i *)(blk + (type == EL_Q4_1 ? 4 : 2)));
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(x, 4), x), _mm256_set1_epi8(0x0F));
}

/* 8 partial sums of w.a as floats; maddubs needs an unsigned left operand, so Q8_0 moves w's sign onto a */
INLINE __m256 dot_block(int type, __m256i w, __m256i a) {
    __m256i p = type == EL_Q8_0 ? _mm256_maddubs_epi16(_mm256_sign_epi8(w, w), _mm256_sign_epi8(a, w))
                                : _mm256_maddubs_epi16(w, a);
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(p, _mm256_set1_epi16(1)));
}

INLINE size_t block_bytes(int type) {
    return type == EL_Q8_0 ? sizeof(el_block_q8_0) : type == EL_Q4_1 ? sizeof(el_block_q4_1) : sizeof(el_block_q4_0);
}

/* block value = d_w d_a (w.a) + c s_a, with c = m (Q4_1), -8 d_w (Q4_0), 0 (Q8_0) */
INLINE float block_c(int type, const uint8_t *blk) {
    uint16_t h0 = *(const uint16_t *)blk;
    return type == EL_Q4_1 ? f16(*(const uint16_t *)(blk + 2)) : type == EL_Q4_0 ? -8.0f * f16(h0) : 0.0f;
}

INLINE float qdot(int type, const uint8_t *row, const el_block_q8a *a, int nb) {
    const size_t bb = block_bytes(type);
    __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
    float cs = 0;
    int b = 0;
    for (; b + 2 <= nb; b += 2) {   /* two chains hide the FMA latency */
        const uint8_t *w0 = row + b * bb, *w1 = w0 + bb;
        __m256 s0 = dot_block(type, load_w(type, w0), _mm256_loadu_si256((const __m256i *)a[b].qs));
        __m256 s1 = dot_block(type, load_w(type, w1), _mm256_loadu_si256((const __m256i *)a[b + 1].qs));
        acc0 = _mm256_fmadd_ps(s0, _mm256_set1_ps(f16(*(const uint16_t *)w0) * a[b].d), acc0);
        acc1 = _mm256_fmadd_ps(s1, _mm256_set1_ps(f16(*(const uint16_t *)w1) * a[b + 1].d), acc1);
        if (type != EL_Q8_0) cs += block_c(type, w0) * a[b].s + block_c(type, w1) * a[b + 1].s;
    }
    if (b < nb) {
        const uint8_t *w0 = row + b * bb;
        __m256 s0 = dot_block(type, load_w(type, w0), _mm256_loadu_si256((const __m256i *)a[b].qs));
        acc0 = _mm256_fmadd_ps(s0, _mm256_set1_ps(f16(*(const uint16_t *)w0) * a[b].d), acc0);
        if (type != EL_Q8_0) cs += block_c(type, w0) * a[b].s;
    }
    return hsum(_mm256_add_ps(acc0, acc1)) + cs;
}

INLINE __m256 load8(int type, const void *p, int c) {
    return type == EL_F16 ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)((const uint16_t *)p + c)))
                          : _mm256_loadu_ps((const float *)p + c);
}

INLINE float fdot(int type, const void *row, const float *x, int cols) {
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    int c = 0;
    for (; c + 32 <= cols; c += 32)
        for (int k = 0; k < 4; k++) acc[k] = _mm256_fmadd_ps(load8(type, row, c + 8 * k), _mm256_loadu_ps(x + c + 8 * k), acc[k]);
    for (; c + 8 <= cols; c += 8) acc[0] = _mm256_fmadd_ps(load8(type, row, c), _mm256_loadu_ps(x + c), acc[0]);
    float s = hsum(_mm256_add_ps(_mm256_add_ps(acc[0], acc[1]), _mm256_add_ps(acc[2], acc[3])));
    for (; c < cols; c++) s += (type == EL_F16 ? f16(((const uint16_t *)row)[c]) : ((const float *)row)[c]) * x[c];
    return s;
}

static float dot_avx2(int type, const void *row, const void *act, int cols) {
    switch (type) {
    case EL_Q4_0: return qdot(EL_Q4_0, row, act, cols / EL_QK);
    case EL_Q4_1: return qdot(EL_Q4_1, row, act, cols / EL_QK);
    case EL_Q8_0: return qdot(EL_Q8_0, row, act, cols / EL_QK);
    case EL_F16: return fdot(EL_F16, row, act, cols);
    default: return fdot(EL_F32, row, act, cols);
    }
}

/* ---------------- matmul ---------------- */

#define TR 4    /* rows per tile */
#define TT 2    /* tokens per tile */
#define TC 64   /* tokens per chunk: the chunk's activations stay in L2 while all row tiles pass over them */

/* Per-block scales of NR rows, converted once per (row tile, token chunk): sc[b*NR + r] = d, sc[(nb + b)*NR + r] = c */
INLINE void tile_scales(int type, const el_mm *m, int r, int NR, int nb, float *sc) {
    const size_t bb = block_bytes(type);
    for (int i = 0; i < NR; i++) {
        const uint8_t *row = m->W + (size_t)(r + i) * m->row_bytes;
        for (int b = 0; b < nb; b++) {
            sc[b * NR + i] = f16(*(const uint16_t *)(row + b * bb));
            sc[(nb + b) * NR + i] = block_c(type, row + b * bb);
        }
    }
}

/* Y for rows r..r+NR-1 x tokens t..t+NT-1: each unpacked weight block feeds NT tokens, each activation block NR rows */
INLINE void tile(int type, const el_mm *m, int r, int t, int NR, int NT, int nb, const float *sc) {
    const size_t bb = block_bytes(type);
    const el_block_q8a *act = (const el_block_q8a *)m->act + (size_t)t * nb;
    const uint8_t *row = m->W + (size_t)r * m->row_bytes;
    __m256 acc[TR][TT];
    __m128 cacc[TT];   /* sum_b c[r] s_a, 4 rows per vector (NR == 4) */
    float cs[TR][TT];  /* same, scalar (NR < 4) */
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < NT; j++) acc[i][j] = _mm256_setzero_ps(), cs[i][j] = 0;
    for (int j = 0; j < NT; j++) cacc[j] = _mm_setzero_ps();
    for (int b = 0; b < nb; b++) {
        __m256i a[TT];
        __m256 da[TT];
        for (int j = 0; j < NT; j++) {
            a[j] = _mm256_loadu_si256((const __m256i *)act[(size_t)j * nb + b].qs);
            da[j] = _mm256_broadcast_ss(&act[(size_t)j * nb + b].d);
        }
        for (int i = 0; i < NR; i++) {
            __m256i w = load_w(type, row + i * m->row_bytes + b * bb);
            __m256 dw = _mm256_broadcast_ss(sc + b * NR + i);
            for (int j = 0; j < NT; j++) acc[i][j] = _mm256_fmadd_ps(dot_block(type, w, a[j]), _mm256_mul_ps(dw, da[j]), acc[i][j]);
        }
        if (type == EL_Q8_0) continue;
        for (int j = 0; j < NT; j++) {
            float s = act[(size_t)j * nb + b].s;
            if (NR == TR) cacc[j] = _mm_fmadd_ps(_mm_loadu_ps(sc + (nb + b) * NR), _mm_set1_ps(s), cacc[j]);
            else
                for (int i = 0; i < NR; i++) cs[i][j] += sc[(nb + b) * NR + i] * s;
        }
    }
    for (int j = 0; j < NT; j++) {
        float *y = m->Y + (size_t)(t + j) * m->ldy + r;
        if (NR == TR) _mm_storeu_ps(y, _mm_add_ps(hsum4(acc[0][j], acc[1][j], acc[2][j], acc[3][j]), cacc[j]));
        else
            for (int i = 0; i < NR; i++) y[i] = hsum(acc[i][j]) + cs[i][j];
    }
}

INLINE void qmm_rows(int type, const el_mm *m, int r0, int r1, float *sc) {
    const int nb = m->cols / EL_QK;
    for (int t0 = 0; t0 < m->n; t0 += TC) {
        int t1 = t0 + TC < m->n ? t0 + TC : m->n;
        int r = r0;
        for (; r + TR <= r1; r += TR) {
            tile_scales(type, m, r, TR, nb, sc);
            int t = t0;
            for (; t + TT <= t1; t += TT) tile(type, m, r, t, TR, TT, nb, sc);
            if (t < t1) tile(type, m, r, t, TR, 1, nb, sc);
        }
        for (; r < r1; r++) {
            tile_scales(type, m, r, 1, nb, sc);
            int t = t0;
            for (; t + TT <= t1; t += TT) tile(type, m, r, t, 1, TT, nb, sc);
            if (t < t1) tile(type, m, r, t, 1, 1, nb, sc);
        }
    }
}

static void mm_rows_avx2(const el_mm *m, int r0, int r1) {
    static _Thread_local float *sc;   /* per-thread tile scales, grown as needed */
    static _Thread_local int sc_blocks;
    int nb = m->cols / EL_QK;
    if (el_is_quant(m->wtype) && nb > sc_blocks) {
        free(sc);
        sc = malloc(sizeof(float) * 2 * TR * nb);
        sc_blocks = sc ? nb : 0;
    }
    if (el_is_quant(m->wtype) && !sc) {
        el_kernels_scalar.mm_rows(m, r0, r1);
        return;
    }
    switch (m->wtype) {
    case EL_Q4_0: qmm_rows(EL_Q4_0, m, r0, r1, sc); return;
    case EL_Q4_1: qmm_rows(EL_Q4_1, m, r0, r1, sc); return;
    case EL_Q8_0: qmm_rows(EL_Q8_0, m, r0, r1, sc); return;
    }
    for (int r = r0; r < r1; r++)
        for (int t = 0; t < m->n; t++)
            m->Y[(size_t)t * m->ldy + r] = dot_avx2(m->wtype, m->W + (size_t)r * m->row_bytes, (const float *)m->act + (size_t)t * m->cols, m->cols);
}

/* ---------------- attention V accumulation ---------------- */

/* 8 dequantized values of a block, k-th group of 8 */
INLINE __m256 deq8(int type, const uint8_t *blk, int k) {
    __m128i q;
    if (type == EL_Q8_0) {
        q = _mm_loadl_epi64((const __m128i *)(blk + 2 + 8 * k));
    } else {   /* Q4_0: group k < 2 are low nibbles of bytes 8k.., k >= 2 the high nibbles of bytes 8(k-2).. */
        __m128i x = _mm_loadl_epi64((const __m128i *)(blk + 2 + 8 * (k & 1)));
        if (k >= 2) x = _mm_srli_epi16(x, 4);
        q = _mm_sub_epi8(_mm_and_si128(x, _mm_set1_epi8(0x0F)), _mm_set1_epi8(8));
    }
    return _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q)), _mm256_set1_ps(f16(*(const uint16_t *)blk)));
}

INLINE void axpy8(__m256 v, const float *p, int np, float *o, int cols) {
    for (int h = 0; h < np; h++) {
        float *oh = o + (size_t)h * cols;
        _mm256_storeu_ps(oh, _mm256_fmadd_ps(_mm256_set1_ps(p[h]), v, _mm256_loadu_ps(oh)));
    }
}

static void axpy_rows_avx2(int type, const void *row, const float *p, int np, float *o, int cols) {
    if (type == EL_Q8_0 || type == EL_Q4_0) {
        size_t bb = block_bytes(type);
        for (int c = 0; c < cols; c += EL_QK)
            for (int k = 0; k < 4; k++)
                axpy8(type == EL_Q8_0 ? deq8(EL_Q8_0, (const uint8_t *)row + c / EL_QK * bb, k)
                                      : deq8(EL_Q4_0, (const uint8_t *)row + c / EL_QK * bb, k),
                      p, np, o + c + 8 * k, cols);
        return;
    }
    if (type != EL_F16 && type != EL_F32) {
        el_axpy_rows_scalar(type, row, p, np, o, cols);
        return;
    }
    int c = 0;
    for (; c + 8 <= cols; c += 8) axpy8(type == EL_F16 ? load8(EL_F16, row, c) : load8(EL_F32, row, c), p, np, o + c, cols);
    for (; c < cols; c++) {
        float v = type == EL_F16 ? f16(((const uint16_t *)row)[c]) : ((const float *)row)[c];
        for (int h = 0; h < np; h++) o[(size_t)h * cols + c] += p[h] * v;
    }
}

/* ---------------- exp ---------------- */

/* e^x = 2^n e^r, |r| <= ln2/2, Cephes expf polynomial (~1 ulp); inputs clamped so 2^n stays a normal float */
INLINE __m256 exp8(__m256 x) {
    x = _mm256_min_ps(_mm256_max_ps(x, _mm256_set1_ps(-87.33654f)), _mm256_set1_ps(88.3762626647949f));
    __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
    r = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), r);
    __m256 p = _mm256_set1_ps(1.9875691500E-4f);
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.3981999507E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(8.3334519073E-3f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(4.1665795894E-2f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(1.6666665459E-1f));
    p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(5.0000001201E-1f));
    p = _mm256_fmadd_ps(p, _mm256_mul_ps(r, r), _mm256_add_ps(r, _mm256_set1_ps(1.0f)));
    __m256i e = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
    return _mm256_mul_ps(p, _mm256_castsi256_ps(e));
}

static float exp_sum_avx2(float *x, int n, float sub) {
    __m256 vs = _mm256_set1_ps(sub), acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(x + i), vs));
        _mm256_storeu_ps(x + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    float s = hsum(acc);
    for (; i < n; i++) s += x[i] = expf(x[i] - sub);
    return s;
}

static void silu_mul_avx2(float *g, const float *u, long n) {
    const __m256 one = _mm256_set1_ps(1.0f), sign = _mm256_set1_ps(-0.0f);
    long i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 x = _mm256_loadu_ps(g + i);
        __m256 den = _mm256_add_ps(one, exp8(_mm256_xor_ps(x, sign)));
        _mm256_storeu_ps(g + i, _mm256_mul_ps(_mm256_div_ps(x, den), _mm256_loadu_ps(u + i)));
    }
    for (; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

const el_kernels el_kernels_avx2 = {
    quant_act_avx2, mm_rows_avx2, dot_avx2, axpy_rows_avx2, exp_sum_avx2, silu_mul_avx2,
};

#pragma GCC pop_options
#endif
