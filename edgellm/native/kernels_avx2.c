/* AVX2 + FMA + F16C kernels. The library is compiled for baseline x86-64; only this file's functions are
 * compiled for AVX2 (pragma below) and they are reached solely through el_kernels_avx2 after a cpuid check. */
#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#include "kernels.h"
#include "kernels_x86.h"

#include <immintrin.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

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

/* 16 bytes of nibbles in GGUF's order (byte j: elements j and j + 16) -> 32 unsigned bytes in element order */
INLINE __m256i nibbles16(const uint8_t *q) {
    __m128i x = _mm_loadu_si128((const __m128i *)q);
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(x, 4), x), _mm256_set1_epi8(0x0F));
}

/* 32 weights of one block as bytes: unsigned nibbles for Q4_0/Q4_1, signed for Q8_0 */
INLINE __m256i load_w(int type, const uint8_t *blk) {
    if (type == EL_Q8_0) return _mm256_loadu_si256((const __m256i *)(blk + 2));
    return nibbles16(blk + (type == EL_Q4_1 ? 4 : 2));
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

/* ---------------- matmul ---------------- */

#define TT 2    /* tokens per tile */

/* Y rows r..r+NR-1 of act rows t..t+NT-1 = lane sums of acc, plus the block terms c4 (4 rows per vector, NR == 4)
 * or cs (NR < 4) unless NULL; planes == 2: the two act rows are the high and residual planes of token t/2 */
INLINE void tile_store(const el_mm *m, int r, int t, int NR, int NT, __m256 (*acc)[TT], __m128 *c4, float (*cs)[TT]) {
    if (NT == 2 && m->planes == 2) {
        for (int i = 0; i < NR; i++) {
            acc[i][0] = _mm256_add_ps(acc[i][0], acc[i][1]);
            if (cs) cs[i][0] += cs[i][1];
        }
        if (c4) c4[0] = _mm_add_ps(c4[0], c4[1]);
        t /= 2, NT = 1;
    }
    for (int j = 0; j < NT; j++) {
        float *y = m->Y + (size_t)(t + j) * m->ldy + r;
        if (NR == TR) {
            __m128 v = hsum4(acc[0][j], acc[1][j], acc[2][j], acc[3][j]);
            _mm_storeu_ps(y, c4 ? _mm_add_ps(v, c4[j]) : v);
        } else {
            for (int i = 0; i < NR; i++) y[i] = cs ? hsum(acc[i][j]) + cs[i][j] : hsum(acc[i][j]);
        }
    }
}

/* ---------------- matmul, repacked weights (el_repack's layout, kernels.h) ---------------- */

/* a: dots of blocks 0..3 over elements 0..15 (low half) and 16..31 (high half), b: same for blocks 4..7
 * -> lane k: block k's dot */
INLINE __m256i join_halves(__m256i a, __m256i b) {
    return _mm256_add_epi32(_mm256_blend_epi32(a, b, 0xF0), _mm256_permute2x128_si256(a, b, 0x21));
}

INLINE __m256i act_qs(const el_block_q8a *a) { return _mm256_loadu_si256((const __m256i *)a->qs); }

/* Integer dots of cnt <= RG blocks with NT activation rows a[j]: out[j] lane k = block k (0 past cnt). Blocks come in
 * pairs: pair p's weights at qs + p * ws, its activation blocks a[j] + p * as and the one after (a row's consecutive
 * blocks: ws = 2 blocks' bytes, as = 2; the same pair of several rows: ws = row bytes, as = 0).
 * Q4: two blocks per 32-byte load; the int16 sums of <= 8 products (<= 8 * 15 * 127) cannot overflow before madd
 * widens them. Q8: |w| . (a with w's sign), whose int16 pair sums (<= 2 * 128 * 127) are widened at once. */
INLINE void group_dots(int type, const uint8_t *qs, size_t ws, const el_block_q8a *const *a, int as, int NT, int cnt,
                       __m256i *out) {
    const __m256i ones = _mm256_set1_epi16(1), z = _mm256_setzero_si256(), m4 = _mm256_set1_epi8(0x0F);
    __m256i h[TT][RG / 2];
    for (int p = 0; p < RG / 2; p++) {
        if (type == EL_Q8_0R) {
            __m256i v[TT][2];
            for (int k = 0; k < 2; k++) {
                const int b = 2 * p + k;
                __m256i w = b < cnt ? _mm256_loadu_si256((const __m256i *)(qs + p * ws + 32 * k)) : z, aw = _mm256_abs_epi8(w);
                for (int j = 0; j < NT; j++) {
                    __m256i p16 = _mm256_maddubs_epi16(aw, _mm256_sign_epi8(act_qs(a[j] + p * as + k), w));
                    v[j][k] = b < cnt ? _mm256_madd_epi16(p16, ones) : z;
                }
            }
            for (int j = 0; j < NT; j++) h[j][p] = _mm256_hadd_epi32(v[j][0], v[j][1]);
        } else if (2 * p + 1 < cnt) {
            __m256i x = _mm256_loadu_si256((const __m256i *)(qs + p * ws));
            __m256i w0 = _mm256_and_si256(x, m4), w1 = _mm256_and_si256(_mm256_srli_epi16(x, 4), m4);
            for (int j = 0; j < NT; j++)
                h[j][p] = _mm256_hadd_epi16(_mm256_maddubs_epi16(w0, act_qs(a[j] + p * as)),
                                            _mm256_maddubs_epi16(w1, act_qs(a[j] + p * as + 1)));
        } else if (2 * p < cnt) {   /* odd last block of the row, in GGUF's nibble order */
            __m256i w = nibbles16(qs + p * ws);
            for (int j = 0; j < NT; j++) h[j][p] = _mm256_hadd_epi16(_mm256_maddubs_epi16(w, act_qs(a[j] + p * as)), z);
        } else {
            for (int j = 0; j < NT; j++) h[j][p] = z;
        }
    }
    for (int j = 0; j < NT; j++)
        out[j] = type == EL_Q8_0R
                     ? join_halves(_mm256_hadd_epi32(h[j][0], h[j][1]), _mm256_hadd_epi32(h[j][2], h[j][3]))
                     : join_halves(_mm256_madd_epi16(_mm256_hadd_epi16(h[j][0], h[j][1]), ones),
                                   _mm256_madd_epi16(_mm256_hadd_epi16(h[j][2], h[j][3]), ones));
}

/* pshufb controls: from byte 2 * (RG - cnt) on, move a row's last RG f16 down by RG - cnt lanes, zeros above */
static const uint8_t shift_down[32] = {0,   1,   2,   3,   4,   5,   6,   7,   8,   9,   10,  11,  12,  13,  14,  15,
                                       128, 128, 128, 128, 128, 128, 128, 128, 128, 128, 128, 128, 128, 128, 128, 128};

/* f16 v[b..b+cnt-1] of a row's nb as floats, 0 past cnt: a tail group (cnt < RG) must not read past the row, so it
 * shifts the row's last RG values down */
INLINE __m256 f16x8(const uint16_t *v, int b, int cnt, int nb) {
    if (cnt == RG) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + b)));
    if (nb >= RG)
        return _mm256_cvtph_ps(_mm_shuffle_epi8(_mm_loadu_si128((const __m128i *)(v + nb - RG)),
                                                _mm_loadu_si128((const __m128i *)(shift_down + 2 * (RG - cnt)))));
    uint16_t tmp[RG] = {0};
    for (int k = 0; k < cnt; k++) tmp[k] = v[b + k];
    return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)tmp));
}

/* Lane by lane the bound on |w| that a block's scales give (el_mm.bound): 127|d| (Q8_0), 8|d| (Q4_0), 15|d| + |m|
 * (Q4_1, m = c); type: any layout of those */
INLINE __m256 scale_wmax(int type, __m256 dw, __m256 c) {
    const int base = el_base_type(type);
    const __m256 abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff));
    const float k = base == EL_Q8_0 ? 127 : base == EL_Q4_0 ? 8 : 15;
    const __m256 wmax = _mm256_mul_ps(_mm256_and_ps(dw, abs), _mm256_set1_ps(k));
    return base == EL_Q4_1 ? _mm256_add_ps(wmax, _mm256_and_ps(c, abs)) : wmax;
}

/* acc[j] += blocks b..b+cnt-1 of one row (nb blocks) with act rows j, lane k for block b+k:
 * d_w d_a (w.a) + c s_a, c = m (Q4_1), -8 d_w (Q4_0), 0 (Q8_0); scales of 8 blocks per vector.
 * BOUND: also *bacc += wmax bv lane by lane (el_mm.bound: wmax = 127|d|, 8|d|, 15|d| + |m|) */
INLINE void rgroup(int type, const uint8_t *row, int nb, int b, int cnt, const el_block_q8a *const *a,
                   const float *const *ds, int NT, __m256 *acc, int BOUND, const float *bv, __m256 *bacc) {
    const size_t qb = type == EL_Q8_0R ? 32 : 16;
    const uint16_t *d16 = (const uint16_t *)(row + nb * qb);
    const el_block_q8a *ab[TT];
    __m256i dots[TT];
    for (int j = 0; j < NT; j++) ab[j] = a[j] + b;
    group_dots(type, row + b * qb, 2 * qb, ab, 2, NT, cnt, dots);
    __m256 dw = f16x8(d16, b, cnt, nb);
    __m256 c = type == EL_Q4_1R ? f16x8(d16 + nb, b, cnt, nb) : _mm256_mul_ps(dw, _mm256_set1_ps(-8.0f));
    for (int j = 0; j < NT; j++) {   /* the c-term first: on the model's weights marginally closer to the exact sum */
        if (type != EL_Q8_0R) acc[j] = _mm256_fmadd_ps(c, _mm256_loadu_ps(ds[j] + el_ds_blocks(nb) + b), acc[j]);
        acc[j] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[j]), _mm256_mul_ps(dw, _mm256_loadu_ps(ds[j] + b)), acc[j]);
    }
    if (BOUND) {
        *bacc = _mm256_fmadd_ps(scale_wmax(type, dw, c), _mm256_loadu_ps(bv + b), *bacc);
    }
}

#define TAIL(c) \
    case c: rgroup(type, row, nb, b, c, a, ds, NT, acc, BOUND, bv, bacc); break;

/* acc[j] += one row's blocks with act rows j (its full groups only when full_only); the tail group's size is a
 * constant of its case, so its loads and reductions unroll like a full group's instead of branching per pair */
INLINE void rrow(int type, const uint8_t *row, int nb, const el_block_q8a *const *a, const float *const *ds, int NT,
                 __m256 *acc, int BOUND, const float *bv, __m256 *bacc, int full_only) {
    int b = 0;
    for (; b + RG <= nb; b += RG) rgroup(type, row, nb, b, RG, a, ds, NT, acc, BOUND, bv, bacc);
    if (!full_only) switch (nb - b) { TAIL(1) TAIL(2) TAIL(3) TAIL(4) TAIL(5) TAIL(6) TAIL(7) }
}
#undef TAIL

/* [a0, a1, b0, b1, c0, c1, d0, d1]: lanes 0 and 1 of four vectors */
INLINE __m256 lanes01(__m256 a, __m256 b, __m256 c, __m256 d) {
    const __m256 ab = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(a), _mm256_castps_pd(b)));
    const __m256 cd = _mm256_castpd_ps(_mm256_unpacklo_pd(_mm256_castps_pd(c), _mm256_castps_pd(d)));
    return _mm256_permute2f128_ps(ab, cd, 0x20);
}

/* lanes01's inverse: lanes 2i, 2i + 1 of g back into lanes 0, 1 of x[i] */
INLINE void put_lanes01(__m256 g, __m256 *x0, __m256 *x1, __m256 *x2, __m256 *x3) {
    const __m256 hi = _mm256_permute2f128_ps(g, g, 0x01);
    *x0 = _mm256_blend_ps(*x0, g, 0x03);
    *x1 = _mm256_blend_ps(*x1, _mm256_permute_ps(g, _MM_SHUFFLE(1, 0, 3, 2)), 0x03);
    *x2 = _mm256_blend_ps(*x2, hi, 0x03);
    *x3 = _mm256_blend_ps(*x3, _mm256_permute_ps(hi, _MM_SHUFFLE(1, 0, 3, 2)), 0x03);
}

/* The last two blocks of 4 rows (nb % RG == 2, e.g. 576 columns) as one group instead of a mostly empty tail group
 * per row: lane 2i + u holds block nb - 2 + u of row i, and lanes 0, 1 of row i's accumulators (acc[i][j], bacc[i])
 * take part in its FMAs and come back. Every value is what the row's own tail group gives (the same FMAs on the same
 * lanes), so the result does not depend on how rows are grouped. */
INLINE void tail_pairs(int type, const uint8_t *row0, size_t rb, int nb, const el_block_q8a *const *a,
                       const float *const *ds, int NT, __m256 (*acc)[TT], int BOUND, const float *bv, __m256 *bacc) {
    const size_t qb = type == EL_Q8_0R ? 32 : 16;
    const el_block_q8a *ab[TT];
    __m256i dots[TT];
    for (int j = 0; j < NT; j++) ab[j] = a[j] + nb - 2;
    group_dots(type, row0 + (nb - 2) * qb, rb, ab, 0, NT, RG, dots);
    const uint8_t *d16 = row0 + nb * qb + 2 * (nb - 2);   /* row 0's last two scales; their mins follow 2 nb bytes on */
    const __m256 dw = _mm256_cvtph_ps(_mm_setr_epi32(*(const int *)d16, *(const int *)(d16 + rb), *(const int *)(d16 + 2 * rb),
                                                     *(const int *)(d16 + 3 * rb)));
    __m256 c = _mm256_mul_ps(dw, _mm256_set1_ps(-8.0f));
    if (type == EL_Q4_1R)
        c = _mm256_cvtph_ps(_mm_setr_epi32(*(const int *)(d16 + 2 * nb), *(const int *)(d16 + 2 * nb + rb),
                                           *(const int *)(d16 + 2 * nb + 2 * rb), *(const int *)(d16 + 2 * nb + 3 * rb)));
    for (int j = 0; j < NT; j++) {   /* the last two blocks' act scales (and sums), once per row */
        __m256 g = lanes01(acc[0][j], acc[1][j], acc[2][j], acc[3][j]);
        if (type != EL_Q8_0R)
            g = _mm256_fmadd_ps(c, _mm256_castpd_ps(_mm256_broadcast_sd((const double *)(ds[j] + el_ds_blocks(nb) + nb - 2))), g);
        const __m256 da = _mm256_castpd_ps(_mm256_broadcast_sd((const double *)(ds[j] + nb - 2)));
        g = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots[j]), _mm256_mul_ps(dw, da), g);
        put_lanes01(g, &acc[0][j], &acc[1][j], &acc[2][j], &acc[3][j]);
    }
    if (BOUND) {
        const __m256 bv2 = _mm256_castpd_ps(_mm256_broadcast_sd((const double *)(bv + nb - 2)));
        const __m256 g = _mm256_fmadd_ps(scale_wmax(type, dw, c), bv2, lanes01(bacc[0], bacc[1], bacc[2], bacc[3]));
        put_lanes01(g, &bacc[0], &bacc[1], &bacc[2], &bacc[3]);
    }
}


/* Y rows r0..r1-1 of act rows t..t+NT-1 for repacked W, rows in fours (one hsum4 each). Each unpacked weight pair
 * feeds the NT act rows; activations are memory operands, read from L1 for every row (holding them in registers
 * would save no instruction). */
INLINE void rrows(int type, const el_mm *m, int r0, int r1, int t, int NT, int BOUND) {
    const int nb = m->cols / EL_QK;
    const size_t rb = m->row_bytes;
    const el_block_q8a *a[TT];
    const float *ds[TT];
    for (int j = 0; j < NT; j++) {
        a[j] = (const el_block_q8a *)m->act + (size_t)(t + j) * nb;
        ds[j] = m->act_ds + (size_t)(t + j) * 2 * el_ds_blocks(nb);
    }
    const uint8_t *row = m->W + (size_t)r0 * rb;
    const int pairs = nb % RG == 2;   /* whole 4-row tiles take their rows' last two blocks together */
    __m256 acc[TR][TT], bacc[TR];
    for (int r = r0; r < r1;) {
        const int nr = r1 - r < TR ? 1 : TR, tail_pairs_here = pairs && nr == TR;
        for (int i = 0; i < nr; i++, row += rb) {
            if (NT == 1)   /* lines in pairs: half the loop overhead; the odd line past a row belongs to the next one */
                for (const char *p = (const char *)row + PF_BYTES, *e = p + rb; p < e; p += 128) {
                    _mm_prefetch(p, _MM_HINT_T0);
                    _mm_prefetch(p + 64, _MM_HINT_T0);
                }
            for (int j = 0; j < NT; j++) acc[i][j] = _mm256_setzero_ps();
            bacc[i] = _mm256_setzero_ps();
            rrow(type, row, nb, a, ds, NT, acc[i], BOUND, m->bound_v, bacc + i, tail_pairs_here);
        }
        if (tail_pairs_here) tail_pairs(type, row - TR * rb, rb, nb, a, ds, NT, acc, BOUND, m->bound_v, bacc);
        if (BOUND && t == 0)
            for (int i = 0; i < nr; i++) m->bound[r + i] = hsum(bacc[i]);
        tile_store(m, r, t, nr == TR ? TR : 1, NT, acc, NULL, NULL);
        r += nr;
    }
}

INLINE void rmm_rows(int type, const el_mm *m, int r0, int r1, int BOUND) {
    for (int t0 = 0; t0 < m->n; t0 += TC) {
        int t1 = t0 + TC < m->n ? t0 + TC : m->n;
        for (int rs = r0; rs < r1; rs += RS) {
            int re = rs + RS < r1 ? rs + RS : r1, t = t0;
            for (; t + TT <= t1; t += TT) rrows(type, m, rs, re, t, TT, BOUND);
            if (t < t1) rrows(type, m, rs, re, t, 1, BOUND);
        }
    }
}

/* ---------------- matmul, 8-row interleaved Q4 weights (EL_Q4_0X / EL_Q4_1X, layout: el_repack) ---------------- */

/* One block of the group's 8 rows: lo[c] / hi[c] lane i = row i's weights 4c..4c+3 / 16+4c..16+4c+3, one per byte */
INLINE void x_unpack(const uint8_t *q, __m256i *lo, __m256i *hi) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    for (int c = 0; c < 4; c++) {
        const __m256i x = _mm256_loadu_si256((const __m256i *)(q + 32 * c));
        lo[c] = _mm256_and_si256(x, m4), hi[c] = _mm256_and_si256(_mm256_srli_epi16(x, 4), m4);
    }
}

INLINE __m256i bcast4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return _mm256_set1_epi32(v);
}

/* lane i: row i's integer dot with act block a. Rows sit in lanes, so nothing is summed across lanes: 16 products per
 * int16 lane (<= 16 * 15 * 127) cannot overflow before madd widens them */
INLINE __m256 x_dot(const __m256i *lo, const __m256i *hi, const el_block_q8a *a) {
    __m256i s = _mm256_setzero_si256();
    for (int c = 0; c < 4; c++) {
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(lo[c], bcast4(a->qs + 4 * c)));
        s = _mm256_add_epi16(s, _mm256_maddubs_epi16(hi[c], bcast4(a->qs + 16 + 4 * c)));
    }
    return _mm256_cvtepi32_ps(_mm256_madd_epi16(s, _mm256_set1_epi16(1)));
}

/* Lanes of v for rows g..g+7 into y, those in [r0, r1) only (a refined tile may be half a group) */
INLINE void x_store(float *y, int g, int r0, int r1, __m256 v) {
    if (g >= r0 && g + 8 <= r1) {
        _mm256_storeu_ps(y + g, v);
        return;
    }
    float l[8];
    _mm256_storeu_ps(l, v);
    for (int i = 0; i < 8; i++)
        if (g + i >= r0 && g + i < r1) y[g + i] = l[i];
}


/* Y rows g..g+7 (one group) of act rows t..t+NT-1, rows in [r0, r1) stored: per row and block the term
 * d_w d_a (w.a) + c s_a (c = m for Q4_1, -8 d for Q4_0), summed in the same order whatever NT, so one token's
 * product equals its row of a many-token one bit for bit. BOUND: also wmax bv per block (el_mm.bound) */
INLINE void x_group(int type, const el_mm *m, int g, int r0, int r1, int t, int NT, int BOUND) {
    const int nb = m->cols / EL_QK;
    const size_t bb = 8 * m->row_bytes / nb;   /* one block of 8 rows: 128 bytes of weights, 8 d, (Q4_1) 8 m */
    const uint8_t *q = m->W + (size_t)g * m->row_bytes;
    const el_block_q8a *a[XT];
    __m256 acc[XT][XACC], bacc = _mm256_setzero_ps();
    for (int j = 0; j < NT; j++) {
        a[j] = (const el_block_q8a *)m->act + (size_t)(t + j) * nb;
        for (int k = 0; k < XACC; k++) acc[j][k] = _mm256_setzero_ps();
    }
    const char *pf = (const char *)q + PF_BYTES;
    for (int b = 0; b < nb; b++) {
        if (NT == 1) {   /* the group's bytes in order, PF_BYTES ahead: 3 lines cover a block's bb <= 192 bytes */
            for (int k = 0; k < 3; k++) _mm_prefetch(pf + 64 * k, _MM_HINT_T0);
            pf += bb;
        }
        const uint8_t *blk = q + bb * b;
        __m256i lo[4], hi[4];
        x_unpack(blk, lo, hi);
        const __m256 dw = _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 128)));
        const __m256 c = type == EL_Q4_1X ? _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(blk + 144)))
                                          : _mm256_mul_ps(dw, _mm256_set1_ps(-8.0f));
        for (int j = 0; j < NT; j++) {
            const __m256 dd = _mm256_mul_ps(dw, _mm256_broadcast_ss(&a[j][b].d));
            const __m256 v = _mm256_fmadd_ps(x_dot(lo, hi, a[j] + b), dd, _mm256_mul_ps(c, _mm256_broadcast_ss(&a[j][b].s)));
            acc[j][b % XACC] = _mm256_add_ps(acc[j][b % XACC], v);
        }
        if (BOUND) bacc = _mm256_fmadd_ps(scale_wmax(type, dw, c), _mm256_broadcast_ss(m->bound_v + b), bacc);
    }
    __m256 y[XT];
    for (int j = 0; j < NT; j++) {
        for (int w = XACC / 2; w; w /= 2)
            for (int k = 0; k < w; k++) acc[j][k] = _mm256_add_ps(acc[j][k], acc[j][k + w]);
        y[j] = acc[j][0];
    }
    if (m->planes == 2) {   /* act rows 2i, 2i + 1: the two planes of token t / 2 + i (NT even) */
        for (int j = 0; j < NT / 2; j++) y[j] = _mm256_add_ps(y[2 * j], y[2 * j + 1]);
        t /= 2, NT /= 2;
    }
    for (int j = 0; j < NT; j++) x_store(m->Y + (size_t)(t + j) * m->ldy, g, r0, r1, y[j]);
    if (BOUND && t == 0) x_store(m->bound, g, r0, r1, bacc);
}

/* As rmm_rows: token chunks, slabs of RS rows (whole groups) in L1 while the chunk's tiles of XT tokens pass (then
 * pairs, then one: a decode GEMV is a single token) */
INLINE void xmm_rows(int type, const el_mm *m, int r0, int r1, int BOUND) {
    for (int t0 = 0; t0 < m->n; t0 += TC) {
        const int t1 = t0 + TC < m->n ? t0 + TC : m->n;
        for (int rs = r0 & ~7; rs < r1; rs += RS) {
            const int re = rs + RS < r1 ? rs + RS : r1;
            int t = t0;
            for (; t + XT <= t1; t += XT)
                for (int g = rs; g < re; g += 8) x_group(type, m, g, r0, r1, t, XT, BOUND);
            for (; t + 2 <= t1; t += 2)
                for (int g = rs; g < re; g += 8) x_group(type, m, g, r0, r1, t, 2, BOUND);
            if (t < t1)
                for (int g = rs; g < re; g += 8) x_group(type, m, g, r0, r1, t, 1, BOUND);
        }
    }
}

/* ---------------- matmul, GGUF blocks ---------------- */

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
    tile_store(m, r, t, NR, NT, acc, cacc, cs);
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
    const int bound = m->bound != NULL;   /* a compile-time case each, so the plain product pays nothing for it */
    switch (m->wtype) {
    case EL_Q4_0R: bound ? rmm_rows(EL_Q4_0R, m, r0, r1, 1) : rmm_rows(EL_Q4_0R, m, r0, r1, 0); return;
    case EL_Q4_1R: bound ? rmm_rows(EL_Q4_1R, m, r0, r1, 1) : rmm_rows(EL_Q4_1R, m, r0, r1, 0); return;
    case EL_Q8_0R: bound ? rmm_rows(EL_Q8_0R, m, r0, r1, 1) : rmm_rows(EL_Q8_0R, m, r0, r1, 0); return;
    case EL_Q4_0X: bound ? xmm_rows(EL_Q4_0X, m, r0, r1, 1) : xmm_rows(EL_Q4_0X, m, r0, r1, 0); return;
    case EL_Q4_1X: bound ? xmm_rows(EL_Q4_1X, m, r0, r1, 1) : xmm_rows(EL_Q4_1X, m, r0, r1, 0); return;
    }
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
    case EL_Q4_0: qmm_rows(EL_Q4_0, m, r0, r1, sc); break;
    case EL_Q4_1: qmm_rows(EL_Q4_1, m, r0, r1, sc); break;
    case EL_Q8_0: qmm_rows(EL_Q8_0, m, r0, r1, sc); break;
    }
    if (el_is_quant(m->wtype)) {
        if (bound) el_row_bounds(m, r0, r1, m->bound_v, m->bound);
        return;
    }
    for (int r = r0; r < r1; r++)   /* F16/F32 weights: not on the model's hot path, one dot per output */
        for (int t = 0; t < m->n; t++) {
            const uint8_t *row = m->W + (size_t)r * m->row_bytes;
            const float *x = (const float *)m->act + (size_t)t * m->cols;
            m->Y[(size_t)t * m->ldy + r] = m->wtype == EL_F16 ? fdot(EL_F16, row, x, m->cols) : fdot(EL_F32, row, x, m->cols);
        }
}

/* ---------------- attention tiles ---------------- */

/* values 8k..8k+7 of a quantized block as floats, before its scale */
INLINE __m256 qvals8(int type, const uint8_t *blk, int k) {
    __m128i q;
    if (type == EL_Q8_0) {
        q = _mm_loadl_epi64((const __m128i *)(blk + 2 + 8 * k));
    } else {   /* Q4_0: groups 0,1 are low nibbles of bytes 0..15, groups 2,3 the high nibbles */
        __m128i x = _mm_loadl_epi64((const __m128i *)(blk + 2 + 8 * (k & 1)));
        if (k >= 2) x = _mm_srli_epi16(x, 4);
        q = _mm_sub_epi8(_mm_and_si128(x, _mm_set1_epi8(0x0F)), _mm_set1_epi8(8));
    }
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(q));
}

/* [sum a[0], ..., sum a[7]] */
INLINE __m256 hsum8(const __m256 *a) {
    __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* acc[r * NK + j] += q_r[c..c+7] * kv[j] (query rows hd floats apart); first: acc = the products (no zeroed
 * accumulators to add to, nor the register copies an FMA into a zero costs) */
INLINE void kq_dims(const float *q, int hd, int c, const __m256 *kv, int NR, int NK, __m256 *acc, int first) {
    for (int r = 0; r < NR; r++) {
        __m256 qv = _mm256_loadu_ps(q + (size_t)r * hd + c);
        for (int j = 0; j < NK; j++)
            acc[r * NK + j] = first ? _mm256_mul_ps(qv, kv[j]) : _mm256_fmadd_ps(qv, kv[j], acc[r * NK + j]);
    }
}

/* Scores of NR query rows x NK keys (compile-time, NR * NK <= 8, NK <= 4): every key vector loaded serves NR rows and
 * every query vector NK keys. acc[r * NK + k] gets 8 lanes whose sum is q_r . k_k. */
INLINE void kq_block(int type, const char *k, size_t rb, const int *idx, const float *q, int hd, int NR, int NK,
                     __m256 *acc) {
    const uint8_t *kr[4];
    for (int j = 0; j < NK; j++) kr[j] = (const uint8_t *)k + idx[j] * rb;
    for (int c = 0; c < hd; c += 8) {
        __m256 kv[4];
        for (int j = 0; j < NK; j++) kv[j] = load8(type, kr[j], c);
        kq_dims(q, hd, c, kv, NR, NK, acc, c == 0);
    }
}

/* s[r * EL_KT + t] = scale * (q_r . k_t) for rows r0.. (NR of them) and keys t0.. (NK of them) */
INLINE void kq_store(int type, const char *k, size_t rb, const int *idx, const float *q, int hd, float scale, float *s,
                     int r0, int t0, int NR, int NK) {
    __m256 acc[8];
    kq_block(type, k, rb, idx + t0, q + (size_t)r0 * hd, hd, NR, NK, acc);
    for (int i = NR * NK; i < 8; i++) acc[i] = _mm256_setzero_ps();
    const __m256 dots = _mm256_mul_ps(hsum8(acc), _mm256_set1_ps(scale));   /* one transpose-add for 8 dots */
    if (NK == 2) {   /* a row's pair of scores: one 64-bit store from its lanes */
        const __m128 lo = _mm256_castps256_ps128(dots), hi = _mm256_extractf128_ps(dots, 1);
        for (int r = 0; r < NR; r++) {
            const __m128 h = r < 2 ? lo : hi;
            if (r % 2) _mm_storeh_pi((__m64 *)(s + (r0 + r) * EL_KT + t0), h);
            else _mm_storel_pi((__m64 *)(s + (r0 + r) * EL_KT + t0), h);
        }
        return;
    }
    float out[8];
    _mm256_storeu_ps(out, dots);
    for (int r = 0; r < NR; r++)
        for (int j = 0; j < NK; j++) s[(r0 + r) * EL_KT + t0 + j] = out[r * NK + j];
}

#define KQ_ROWS(NK)                                                        \
    switch (gs - r < 4 ? gs - r : 4) {                                     \
    case 4: kq_store(type, k, rb, idx, q, hd, scale, s, r, t, 4, NK); break; \
    case 3: kq_store(type, k, rb, idx, q, hd, scale, s, r, t, 3, NK); break; \
    case 2: kq_store(type, k, rb, idx, q, hd, scale, s, r, t, 2, NK); break; \
    default: kq_store(type, k, rb, idx, q, hd, scale, s, r, t, 1, NK); break; \
    }

/* Rows in groups of 4 x keys in pairs: 8 accumulators, 4 + 2 vector loads per 8 FMAs */
INLINE void kq_tile(int type, const char *k, size_t rb, const int *idx, int cnt, const float *q, int gs, int hd,
                    float scale, float *s) {
    for (int r = 0; r < gs; r += 4) {
        int t = 0;
        for (; t + 2 <= cnt; t += 2) KQ_ROWS(2)
        if (t < cnt) KQ_ROWS(1)
    }
}
#undef KQ_ROWS

static void kq_avx2(int type, const char *k, size_t rb, const int *idx, int cnt, const float *q, int gs, int hd, float scale,
                    float *s) {
    if (hd % 8) {
        el_kernels_scalar.kq(type, k, rb, idx, cnt, q, gs, hd, scale, s);
        return;
    }
    switch (type) {
    case EL_F16: kq_tile(EL_F16, k, rb, idx, cnt, q, gs, hd, scale, s); break;
    case EL_F32: kq_tile(EL_F32, k, rb, idx, cnt, q, gs, hd, scale, s); break;
    }
}

/* NH heads x NC*8 output dims (both compile-time, NH * NC <= 12) stay in registers across the key tile: NH*NC
 * independent FMA chains hide the FMA latency, and each V row is dequantized once per NC*8 dims. Head i's weight of
 * key t is p[i * ph + t * pt] */
INLINE void pv_heads(int type, const char *v, size_t rb, const int *idx, int cnt, const float *p, int ph, int pt, int hd,
                     float *o, int c, int NH, int NC) {
    __m256 acc[4][4];
    const int g0 = NC == 4 ? 0 : c % EL_QK / 8;   /* first 8-value group of the block (c is a multiple of NC * 8) */
    for (int i = 0; i < NH; i++)
        for (int k = 0; k < NC; k++) acc[i][k] = _mm256_loadu_ps(o + (size_t)i * hd + c + 8 * k);
    const int quant = type != EL_F16 && type != EL_F32;
    for (int t = 0; t < cnt; t++) {   /* a vector of V at a time: NH * NC + NH + 2 registers */
        const uint8_t *row = (const uint8_t *)v + (idx ? idx[t] : t) * rb;
        const uint8_t *blk = row + c / EL_QK * block_bytes(type);   /* quantized: the NC groups lie in one block */
        const __m256 d = quant ? _mm256_set1_ps(f16(*(const uint16_t *)blk)) : _mm256_setzero_ps();
        __m256 pi[4];
        for (int i = 0; i < NH; i++) pi[i] = _mm256_broadcast_ss(p + i * ph + t * pt);
        for (int k = 0; k < NC; k++) {
            const __m256 xk = quant ? _mm256_mul_ps(qvals8(type, blk, g0 + k), d) : load8(type, row, c + 8 * k);
            for (int i = 0; i < NH; i++) acc[i][k] = _mm256_fmadd_ps(pi[i], xk, acc[i][k]);
        }
    }
    for (int i = 0; i < NH; i++)
        for (int k = 0; k < NC; k++) _mm256_storeu_ps(o + (size_t)i * hd + c + 8 * k, acc[i][k]);
}

#define PV(NH, NC) pv_heads(type, v, rb, idx, cnt, ph, EL_KT, 1, hd, oh, c, NH, NC)

/* up to 3 heads take 32 dims at a time (12 accumulators), 4 heads 16 */
INLINE void pv_tile(int type, const char *v, size_t rb, const int *idx, int cnt, const float *p, int gs, int hd, float *o) {
    for (int h = 0; h < gs; h += 4) {
        const float *ph = p + h * EL_KT;
        float *oh = o + (size_t)h * hd;
        const int nh = gs - h < 4 ? gs - h : 4, step = nh < 4 && hd % 32 == 0 ? 32 : hd % 16 == 0 ? 16 : 8;
        for (int c = 0; c < hd; c += step) {
            switch (nh * 100 + step) {   /* compile-time shapes */
            case 432: case 416: PV(4, 2); break;
            case 408: PV(4, 1); break;
            case 332: PV(3, 4); break;
            case 316: PV(3, 2); break;
            case 308: PV(3, 1); break;
            case 232: PV(2, 4); break;
            case 216: PV(2, 2); break;
            case 208: PV(2, 1); break;
            case 132: PV(1, 4); break;
            case 116: PV(1, 2); break;
            default: PV(1, 1); break;
            }
        }
    }
}
#undef PV

static void pv_avx2(int type, const char *v, size_t rb, const int *idx, int cnt, const float *p, int gs, int hd, float *o) {
    if (hd % 8) {
        el_kernels_scalar.pv(type, v, rb, idx, cnt, p, gs, hd, o);
        return;
    }
    switch (type) {
    case EL_F16: pv_tile(EL_F16, v, rb, idx, cnt, p, gs, hd, o); break;
    case EL_F32: pv_tile(EL_F32, v, rb, idx, cnt, p, gs, hd, o); break;
    case EL_Q8_0: pv_tile(EL_Q8_0, v, rb, idx, cnt, p, gs, hd, o); break;
    case EL_Q4_0: pv_tile(EL_Q4_0, v, rb, idx, cnt, p, gs, hd, o); break;
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

/* exp8 that returns 0 where e^x underflows (x = -inf for masked keys) */
INLINE __m256 exp8z(__m256 x) { return _mm256_and_ps(exp8(x), _mm256_cmp_ps(x, _mm256_set1_ps(-87.33654f), _CMP_GE_OQ)); }

/* ---------------- attention with rows in lanes (prefill) ---------------- */

/* st[t][v] = scale * (keys t..t+NK-1) . (row vectors v < NV): per head dimension NK broadcasts and NV loads feed
 * NK*NV FMAs (<= 12 accumulators) */
INLINE void lanes_qk(const el_lanes *L, int t, int NV, int NK) {
    const int hd = L->hd, w = L->w;
    __m256 acc[4][4];
    for (int k = 0; k < NK; k++)
        for (int v = 0; v < NV; v++) acc[k][v] = _mm256_setzero_ps();
    for (int c = 0; c < hd; c++)
        for (int k = 0; k < NK; k++) {
            __m256 b = _mm256_broadcast_ss(L->kf + (size_t)(t + k) * hd + c);
            for (int v = 0; v < NV; v++) acc[k][v] = _mm256_fmadd_ps(b, _mm256_loadu_ps(L->qt + (size_t)c * w + 8 * v), acc[k][v]);
        }
    for (int k = 0; k < NK; k++)
        for (int v = 0; v < NV; v++) _mm256_storeu_ps(L->st + (size_t)(t + k) * w + 8 * v, _mm256_mul_ps(acc[k][v], _mm256_set1_ps(L->scale)));
}

/* ot[c..c+NC-1][v] += sum_t vf[t][c] st[t][v] */
INLINE void lanes_pv(const el_lanes *L, int cnt, int c, int NV, int NC) {
    const int hd = L->hd, w = L->w;
    __m256 acc[4][4];
    for (int i = 0; i < NC; i++)
        for (int v = 0; v < NV; v++) acc[i][v] = _mm256_loadu_ps(L->ot + (size_t)(c + i) * w + 8 * v);
    for (int t = 0; t < cnt; t++)
        for (int i = 0; i < NC; i++) {
            __m256 b = _mm256_broadcast_ss(L->vf + (size_t)t * hd + c + i);
            for (int v = 0; v < NV; v++) acc[i][v] = _mm256_fmadd_ps(b, _mm256_loadu_ps(L->st + (size_t)t * w + 8 * v), acc[i][v]);
        }
    for (int i = 0; i < NC; i++)
        for (int v = 0; v < NV; v++) _mm256_storeu_ps(L->ot + (size_t)(c + i) * w + 8 * v, acc[i][v]);
}

/* cnt F16 / F32 rows of hd values, rb bytes apart -> f32 [cnt][hd] */
INLINE void dequant_rows(int type, const char *x, size_t rb, int cnt, int hd, float *y) {
    for (int t = 0; t < cnt; t++)
        for (int c = 0; c < hd; c += 8) _mm256_storeu_ps(y + (size_t)t * hd + c, load8(type, x + t * rb, c));
}

/* The online softmax of a tile's scores st[t][lanes], 8 rows at a time, then what ot accumulated under the old maxima
 * rescaled (one vector of rows, L->orow, takes rows_softmax instead) */
INLINE void lanes_softmax(const el_lanes *L, const int32_t *pos, int cnt, int partial, int NV) {
    const int hd = L->hd, w = L->w;
    for (int vv = 0; vv < NV; vv++) {
        __m256 mt = _mm256_set1_ps(-INFINITY);
        __m256i qp = _mm256_loadu_si256((const __m256i *)(L->qpos + 8 * vv));
        for (int t = 0; t < cnt; t++) {
            float *s = L->st + (size_t)t * w + 8 * vv;
            __m256 x = _mm256_loadu_ps(s);
            if (partial) {
                __m256i later = _mm256_cmpgt_epi32(_mm256_set1_epi32(pos[t]), qp);
                x = _mm256_blendv_ps(x, _mm256_set1_ps(-INFINITY), _mm256_castsi256_ps(later));
            }
            _mm256_storeu_ps(s, x);
            mt = _mm256_max_ps(mt, x);
        }
        __m256 m_old = _mm256_loadu_ps(L->m + 8 * vv), m_new = _mm256_max_ps(m_old, mt);
        /* rows that have seen no key yet subtract 0: their scores are all -inf and give 0 */
        __m256 m_use = _mm256_blendv_ps(m_new, _mm256_setzero_ps(), _mm256_cmp_ps(m_new, _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ));
        __m256 f = exp8z(_mm256_sub_ps(m_old, m_use)), sum = _mm256_setzero_ps();
        for (int t = 0; t < cnt; t++) {
            float *s = L->st + (size_t)t * w + 8 * vv;
            __m256 p = exp8z(_mm256_sub_ps(_mm256_loadu_ps(s), m_use));
            _mm256_storeu_ps(s, p);
            sum = _mm256_add_ps(sum, p);
        }
        _mm256_storeu_ps(L->l + 8 * vv, _mm256_fmadd_ps(_mm256_loadu_ps(L->l + 8 * vv), f, sum));
        _mm256_storeu_ps(L->m + 8 * vv, m_new);
        for (int c = 0; c < hd; c++) {   /* rescale what was accumulated under the old maxima */
            float *o = L->ot + (size_t)c * w + 8 * vv;
            _mm256_storeu_ps(o, _mm256_mul_ps(_mm256_loadu_ps(o), f));
        }
    }
}

INLINE void lanes_tile(const el_lanes *L, int type, const char *k, const char *v, size_t rb, const int32_t *pos, int cnt,
                       int partial, int NV) {
    const int hd = L->hd, cnt4 = (cnt + 3) & ~3;
    dequant_rows(type, k, rb, cnt, hd, L->kf);
    memset(L->kf + (size_t)cnt * hd, 0, sizeof(float) * (cnt4 - cnt) * hd);   /* key groups of 4: zero rows pad them */
    for (int t = 0; t < cnt4; t += 4) {
        if (NV == 4) lanes_qk(L, t, 4, 2), lanes_qk(L, t + 2, 4, 2);   /* 4 x 4 accumulators would spill */
        else lanes_qk(L, t, NV, 4);
    }
    lanes_softmax(L, pos, cnt, partial, NV);
    dequant_rows(type, v, rb, cnt, hd, L->vf);
    for (int c = 0; c < hd; c += 4) {
        if (NV == 4) lanes_pv(L, cnt, c, 4, 2), lanes_pv(L, cnt, c + 2, 4, 2);
        else lanes_pv(L, cnt, c, NV, 4);
    }
}

/* in place: a[i] lane j <-> a[j] lane i */
INLINE void transpose8(__m256 *a) {
    __m256 t[8], u[8];
    for (int i = 0; i < 8; i += 2) t[i] = _mm256_unpacklo_ps(a[i], a[i + 1]), t[i + 1] = _mm256_unpackhi_ps(a[i], a[i + 1]);
    for (int i = 0; i < 8; i += 4)
        for (int k = 0; k < 2; k++) {
            u[i + 2 * k] = _mm256_shuffle_ps(t[i + k], t[i + k + 2], 0x44);
            u[i + 2 * k + 1] = _mm256_shuffle_ps(t[i + k], t[i + k + 2], 0xEE);
        }
    for (int i = 0; i < 4; i++) {
        a[i] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x20);
        a[i + 4] = _mm256_permute2f128_ps(u[i], u[i + 4], 0x31);
    }
}

/* kt[c0 + i][t0 .. t0 + 7] = f16 keys t0.. (zeros past cnt), dimension c0 + i, i < 16: an 8 x 8 transpose of 16-bit
 * values in each 128-bit half (dimensions c0.. in the low halves, c0 + 8.. in the high), then converted */
INLINE void keys_f16x16(const char *k, size_t rb, int t0, int cnt, int c0, float *kt) {
    const char *src = k + (size_t)t0 * rb + (size_t)c0 * 2;
    float *dst = kt + (size_t)c0 * EL_LANES_KT + t0;
    __m256i r[8], t[8], u[8];
    if (t0 + 8 <= cnt)
        for (int i = 0; i < 8; i++) r[i] = _mm256_loadu_si256((const __m256i *)(src + i * rb));
    else
        for (int i = 0; i < 8; i++) r[i] = t0 + i < cnt ? _mm256_loadu_si256((const __m256i *)(src + i * rb)) : _mm256_setzero_si256();
    for (int i = 0; i < 8; i += 2) t[i] = _mm256_unpacklo_epi16(r[i], r[i + 1]), t[i + 1] = _mm256_unpackhi_epi16(r[i], r[i + 1]);
    for (int i = 0; i < 8; i += 4) {   /* u[i + j]: dimensions 2j, 2j + 1 of keys i .. i + 3 */
        u[i] = _mm256_unpacklo_epi32(t[i], t[i + 2]), u[i + 1] = _mm256_unpackhi_epi32(t[i], t[i + 2]);
        u[i + 2] = _mm256_unpacklo_epi32(t[i + 1], t[i + 3]), u[i + 3] = _mm256_unpackhi_epi32(t[i + 1], t[i + 3]);
    }
    for (int j = 0; j < 4; j++) {   /* dimensions 2j, 2j + 1 (low halves) and 8 + 2j, 9 + 2j (high halves) */
        const __m256i d0 = _mm256_unpacklo_epi64(u[j], u[j + 4]), d1 = _mm256_unpackhi_epi64(u[j], u[j + 4]);
        _mm256_storeu_ps(dst + (2 * j) * EL_LANES_KT, _mm256_cvtph_ps(_mm256_castsi256_si128(d0)));
        _mm256_storeu_ps(dst + (2 * j + 1) * EL_LANES_KT, _mm256_cvtph_ps(_mm256_castsi256_si128(d1)));
        _mm256_storeu_ps(dst + (2 * j + 8) * EL_LANES_KT, _mm256_cvtph_ps(_mm256_extracti128_si256(d0, 1)));
        _mm256_storeu_ps(dst + (2 * j + 9) * EL_LANES_KT, _mm256_cvtph_ps(_mm256_extracti128_si256(d1, 1)));
    }
}

/* acc[g][r] = fma(k[c] of keys 8g.., q_r[c], acc[g][r]) for one head dimension c (kc: its keys, qc: its query values) */
INLINE void rows_qk_dim(const float *kc, const float *qc, int R, int G, __m256 acc[4][8]) {
    for (int r = 0; r < R; r++) {
        const __m256 q = _mm256_broadcast_ss(qc + r);
        for (int g = 0; g < G; g++) acc[g][r] = _mm256_fmadd_ps(_mm256_loadu_ps(kc + 8 * g), q, acc[g][r]);
    }
}

/* sr[r][t] = scale * q_r . k_t (rows of EL_LANES_KT scores) for the G * 8 keys from t0 (kt: keys in lanes) and R rows:
 * G * R independent chains fma(k[c], q[c], .) over c = 0, 1, ..., so their FMA latencies overlap. The first
 * dimensions also prefetch lines pf0..pf1-1 of the next tile, one of K and one of V each: a loop of their own, so the
 * rest runs without the test and the address arithmetic */
INLINE void rows_qk(const el_lanes *L, const float *kt, int t0, int R, int G, float *sr, int pf0, int pf1) {
    __m256 acc[4][8];
    for (int g = 0; g < G; g++)
        for (int r = 0; r < R; r++) acc[g][r] = _mm256_setzero_ps();
    const int hd = L->hd, npf = pf1 - pf0 < 0 ? 0 : pf1 - pf0 < hd ? pf1 - pf0 : hd;
    const float *qc = L->qt, *kc = kt + t0;   /* queries [hd][8], keys [hd][EL_LANES_KT] */
    const char *pk = L->pf_k + 64 * (size_t)pf0, *pv = L->pf_v + 64 * (size_t)pf0;
    int c = 0;
    for (; c < npf; c++, qc += 8, kc += EL_LANES_KT, pk += 64, pv += 64) {
        _mm_prefetch(pk, _MM_HINT_T0), _mm_prefetch(pv, _MM_HINT_T0);
        rows_qk_dim(kc, qc, R, G, acc);
    }
    for (; c < hd; c++, qc += 8, kc += EL_LANES_KT) rows_qk_dim(kc, qc, R, G, acc);
    for (int g = 0; g < G; g++)
        for (int r = 0; r < R; r++) _mm256_storeu_ps(sr + r * EL_LANES_KT + t0 + 8 * g, _mm256_mul_ps(acc[g][r], _mm256_set1_ps(L->scale)));
}

INLINE float hmax(__m256 v) {
    __m128 x = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    x = _mm_max_ps(x, _mm_movehl_ps(x, x));
    return _mm_cvtss_f32(_mm_max_ss(x, _mm_shuffle_ps(x, x, 1)));
}

/* lanes_softmax's online softmax for R rows whose scores are rows sr[r][t]: per row, 8 keys per exp instead of one
 * vector of (mostly idle) row lanes per key. Every value is lanes_softmax's: max is exact in any order, exp8z is
 * lane-wise, each row's sum runs over t = 0, 1, ... as there, and m, l, f are computed on the same row vectors */
INLINE void rows_softmax(const el_lanes *L, const int32_t *pos, int cnt, int partial, int R, float *sr) {
    const int cnt8 = (cnt + 7) & ~7;
    int32_t pp[EL_LANES_KT];   /* positions; keys past cnt pad the last vector and are masked like later keys */
    for (int t = 0; t < cnt8; t++) pp[t] = t < cnt ? pos[t] : INT32_MAX;
    float mt[8], mu[8], sum[8], fr[8];
    for (int r = 0; r < 8; r++) mt[r] = -INFINITY, sum[r] = 0;
    for (int r = 0; r < R; r++) {
        const __m256i qp = _mm256_set1_epi32(L->qpos[r]);
        __m256 m = _mm256_set1_ps(-INFINITY);
        for (int t0 = 0; t0 < cnt8; t0 += 8) {
            __m256 x = _mm256_loadu_ps(sr + r * EL_LANES_KT + t0);
            if (partial || cnt8 != cnt) {
                __m256i later = _mm256_cmpgt_epi32(_mm256_loadu_si256((const __m256i *)(pp + t0)), qp);
                x = _mm256_blendv_ps(x, _mm256_set1_ps(-INFINITY), _mm256_castsi256_ps(later));
                _mm256_storeu_ps(sr + r * EL_LANES_KT + t0, x);
            }
            m = _mm256_max_ps(m, x);
        }
        mt[r] = hmax(m);
    }
    __m256 m_old = _mm256_loadu_ps(L->m), m_new = _mm256_max_ps(m_old, _mm256_loadu_ps(mt));
    __m256 m_use = _mm256_blendv_ps(m_new, _mm256_setzero_ps(), _mm256_cmp_ps(m_new, _mm256_set1_ps(-INFINITY), _CMP_EQ_OQ));
    _mm256_storeu_ps(mu, m_use);
    _mm256_storeu_ps(fr, exp8z(_mm256_sub_ps(m_old, m_use)));
    for (int r = 0; r < R; r++) {
        float *s = sr + r * EL_LANES_KT, acc = 0;
        for (int t0 = 0; t0 < cnt8; t0 += 8) _mm256_storeu_ps(s + t0, exp8z(_mm256_sub_ps(_mm256_loadu_ps(s + t0), _mm256_set1_ps(mu[r]))));
        for (int t = 0; t < cnt; t++) acc += s[t];
        sum[r] = acc;
    }
    _mm256_storeu_ps(L->l, _mm256_fmadd_ps(_mm256_loadu_ps(L->l), _mm256_loadu_ps(fr), _mm256_loadu_ps(sum)));
    _mm256_storeu_ps(L->m, m_new);
    for (int r = 0; r < R; r++)   /* rescale what each row accumulated under its old maximum */
        for (int c = 0; c < L->hd; c += 8) {
            float *o = L->orow + (size_t)r * L->hd + c;
            _mm256_storeu_ps(o, _mm256_mul_ps(_mm256_loadu_ps(o), _mm256_set1_ps(fr[r])));
        }
}

/* One vector of rows (L->orow): each row's score of a key is the chain fma(k[c], q[c], .) over c = 0, 1, ..., and
 * each output value the chain fma(v[t][c], p[t], .) over the keys, as in lanes_qk / lanes_pv, and the softmax gives
 * lanes_softmax's values; only the lanes differ: keys (8 per vector) for K.Q and the softmax, head dimensions for
 * P.V, so no lane idles when there are only a few rows */
INLINE void rows_tile(const el_lanes *L, int type, const char *k, const char *v, size_t rb, const int32_t *pos, int cnt,
                      int partial, int R) {
    const int hd = L->hd, cnt8 = (cnt + 7) & ~7;
    float *kt = L->kf, *sr = L->st;   /* [hd][EL_LANES_KT]: keys in lanes; [R][EL_LANES_KT] scores, then weights */
    for (int t0 = 0; t0 < cnt8; t0 += 8) {
        int c0 = 0;
        if (type == EL_F16)   /* 16 dimensions at a time, transposed as f16 (half the shuffles per value) */
            for (; c0 + 16 <= hd; c0 += 16) keys_f16x16(k, rb, t0, cnt, c0, kt);
        for (; c0 < hd; c0 += 8) {
            __m256 a[8];
            for (int i = 0; i < 8; i++) a[i] = t0 + i < cnt ? load8(type, k + (size_t)(t0 + i) * rb, c0) : _mm256_setzero_ps();
            transpose8(a);
            for (int i = 0; i < 8; i++) _mm256_storeu_ps(kt + (size_t)(c0 + i) * EL_LANES_KT + t0, a[i]);
        }
    }
    int t0 = 0, pf = 0;   /* the next tile's lines: the passes take hd of them each until all are prefetched */
    if (R <= 3)   /* four key vectors per pass: 12 FMA chains, enough to hide the FMA latency */
        for (; t0 + 32 <= cnt8; t0 += 32, pf += hd) rows_qk(L, kt, t0, R, 4, sr, pf, L->pf_lines);
    if (R <= 6)   /* two key vectors per pass (more: spills) */
        for (; t0 + 16 <= cnt8; t0 += 16, pf += hd) rows_qk(L, kt, t0, R, 2, sr, pf, L->pf_lines);
    for (; t0 < cnt8; t0 += 8, pf += hd) rows_qk(L, kt, t0, R, 1, sr, pf, L->pf_lines);
    rows_softmax(L, pos, cnt, partial, R, sr);
    for (int r0 = 0; r0 < R; r0 += 3)   /* up to 3 rows x 32 dimensions: 12 accumulators; p[t] of row r is sr[r][t] */
        for (int c = 0; c < hd; c += hd % 32 ? 8 : 32) {
            float *o = L->orow + (size_t)r0 * hd;
            const float *p = sr + r0 * EL_LANES_KT;
            /* idx NULL: the tile's rows in order */
            if (hd % 32) pv_heads(type, v, rb, NULL, cnt, p, EL_LANES_KT, 1, hd, o, c, R - r0 < 3 ? R - r0 : 3, 1);
            else pv_heads(type, v, rb, NULL, cnt, p, EL_LANES_KT, 1, hd, o, c, R - r0 < 3 ? R - r0 : 3, 4);
        }
}

#define ROWS_R(T)                                                                    \
    switch (L->rows) {                                                               \
    case 1: rows_tile(L, T, k, v, rb, pos, cnt, partial, 1); break;                  \
    case 2: rows_tile(L, T, k, v, rb, pos, cnt, partial, 2); break;                  \
    case 3: rows_tile(L, T, k, v, rb, pos, cnt, partial, 3); break;                  \
    case 4: rows_tile(L, T, k, v, rb, pos, cnt, partial, 4); break;                  \
    case 5: rows_tile(L, T, k, v, rb, pos, cnt, partial, 5); break;                  \
    case 6: rows_tile(L, T, k, v, rb, pos, cnt, partial, 6); break;                  \
    case 7: rows_tile(L, T, k, v, rb, pos, cnt, partial, 7); break;                  \
    default: rows_tile(L, T, k, v, rb, pos, cnt, partial, 8); break;                 \
    }

#define LANES_NV(T)                                                       \
    switch (L->w / 8) {                                                   \
    case 1: lanes_tile(L, T, k, v, rb, pos, cnt, partial, 1); break;      \
    case 2: lanes_tile(L, T, k, v, rb, pos, cnt, partial, 2); break;      \
    case 3: lanes_tile(L, T, k, v, rb, pos, cnt, partial, 3); break;      \
    default: lanes_tile(L, T, k, v, rb, pos, cnt, partial, 4); break;     \
    }

/* needs hd % 8 == 0 and w <= 32 (el_attention checks) */
static void attend_lanes_avx2(const el_lanes *L, int type, const char *k, const char *v, size_t rb, const int32_t *pos,
                              int cnt, int partial) {
    if (L->orow) {   /* the row count a compile-time case */
        if (type == EL_F16) ROWS_R(EL_F16)
        else ROWS_R(EL_F32)
        return;
    }
    if (type == EL_F16) LANES_NV(EL_F16)
    else LANES_NV(EL_F32)
}
#undef LANES_NV
#undef ROWS_R

static float exp_sum_avx2(float *x, int n, float sub) {
    __m256 vs = _mm256_set1_ps(sub), acc = _mm256_setzero_ps();
    int i = 0;
    for (; i + 8 <= n; i += 8) {
        __m256 e = exp8z(_mm256_sub_ps(_mm256_loadu_ps(x + i), vs));
        _mm256_storeu_ps(x + i, e);
        acc = _mm256_add_ps(acc, e);
    }
    if (i < n) {   /* the tail as one vector padded with -inf: every value is exp8z's wherever it lies */
        float t[8];
        for (int j = 0; j < 8; j++) t[j] = i + j < n ? x[i + j] : -INFINITY;
        __m256 e = exp8z(_mm256_sub_ps(_mm256_loadu_ps(t), vs));
        _mm256_storeu_ps(t, e);
        for (int j = 0; i + j < n; j++) x[i + j] = t[j];
        acc = _mm256_add_ps(acc, e);
    }
    return hsum(acc);
}

/* max(m, x[0..n)): max_ps(x, acc) takes x only where x > acc, as the portable loop does */
static float max_avx2(const float *x, int n, float m) {
    __m256 acc = _mm256_set1_ps(m);
    int i = 0;
    for (; i + 8 <= n; i += 8) acc = _mm256_max_ps(_mm256_loadu_ps(x + i), acc);
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    float r = _mm_cvtss_f32(_mm_max_ss(h, _mm_shuffle_ps(h, h, 1)));
    for (; i < n; i++) r = x[i] > r ? x[i] : r;
    return r;
}

/* ---------------- attention over quantized K/V tiles ---------------- */

/* o rows i < NH (hd apart), the 32 dims of V block b, += sum_t pd[i][t] v_t with v_t's values before their scale
 * (pd holds weight times scale): 4 NH accumulators, each V vector converted once for NH rows */
INLINE void quant_pv(int type, const char *v, size_t rb, int cnt, const float *pd, int b, float *o, int hd, int NH,
                     const char *pv, int lines) {
    const size_t bb = block_bytes(type);
    __m256 acc[3][4];
    for (int i = 0; i < NH; i++)
        for (int k = 0; k < 4; k++) acc[i][k] = _mm256_loadu_ps(o + (size_t)i * hd + b * EL_QK + 8 * k);
#pragma GCC unroll 2
    for (int t = 0; t < cnt; t++) {
        const uint8_t *blk = (const uint8_t *)v + t * rb + b * bb;
        if (t < lines) _mm_prefetch(pv + 64 * t, _MM_HINT_T0);   /* the next tile's V, one line a key */
        __m256 w[3];
        for (int i = 0; i < NH; i++) w[i] = _mm256_broadcast_ss(pd + i * EL_ST + t);
        for (int k = 0; k < 4; k++) {
            __m256 x = qvals8(type, blk, k);
            for (int i = 0; i < NH; i++) acc[i][k] = _mm256_fmadd_ps(w[i], x, acc[i][k]);
        }
    }
    for (int i = 0; i < NH; i++)
        for (int k = 0; k < 4; k++) _mm256_storeu_ps(o + (size_t)i * hd + b * EL_QK + 8 * k, acc[i][k]);
}

/* d[t] = the f16 scale at x + t * rb as a float for t < cnt, 0 up to the next multiple of 8 (32-bit gathers: a
 * quantized block has bytes past its scale; the low halves are kept) */
INLINE void block_scales(const char *x, size_t rb, int cnt, float *d) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), off = _mm256_mullo_epi32(lane, _mm256_set1_epi32((int)rb));
    for (int t0 = 0; t0 < cnt; t0 += 8) {
        const __m256i in = _mm256_cmpgt_epi32(_mm256_set1_epi32(cnt - t0), lane);
        __m256i g = _mm256_mask_i32gather_epi32(_mm256_setzero_si256(), (const int *)(x + t0 * rb), off, in, 1);
        g = _mm256_packus_epi32(_mm256_and_si256(g, _mm256_set1_epi32(0xFFFF)), _mm256_setzero_si256());
        g = _mm256_permute4x64_epi64(g, 0x08);   /* the 128-bit lanes' low halves together */
        _mm256_storeu_ps(d + t0, _mm256_cvtph_ps(_mm256_castsi256_si128(g)));
    }
}

/* Value i of a quantized block for a group's EL_KG keys (their 8 bytes at x) as floats, before the keys' scales: Q8_0
 * value i; Q4_0 value i (hi 0: the low nibbles) or i + 16 (hi 1) */
INLINE __m256 group_vals(int type, const uint8_t *x, int hi) {
    __m128i b = _mm_loadl_epi64((const __m128i *)x);
    if (type == EL_Q4_0) {
        if (hi) b = _mm_srli_epi16(b, 4);
        b = _mm_sub_epi8(_mm_and_si128(b, _mm_set1_epi8(0x0F)), _mm_set1_epi8(8));
    }
    return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(b));
}

/* Scores of NR query rows (hd apart) for NG key groups (gb bytes apart from kg), a group's 8 keys in the lanes of one
 * accumulator, so no horizontal sums: s[r * EL_ST + 8 j + lane] = scale * q_r . k. A block's values go against q
 * first, then the 8 keys' scales once. Compile-time NR * NG <= 9. Every other dimension prefetches one of `lines`
 * cache lines from pk (the next tile's K): spread out, so that the misses queue no faster than memory serves them
 * (a burst of prefetches fills the load queue and stalls the arithmetic behind it). */
INLINE void kq_groups(int type, const uint8_t *kg, size_t gb, int hd, const float *q, float scale, float *s, int NR,
                      int NG, const char *pk, int lines) {
    const int nb = hd / EL_QK, qb = type == EL_Q8_0 ? EL_QK : EL_QK / 2, halves = type == EL_Q8_0 ? 1 : 2;
    __m256 acc[9];
    for (int b = 0; b < nb; b++) {
        const uint8_t *x = kg + nb * 16 + (size_t)b * qb * EL_KG;
        for (int k = 0; k < NR * NG; k++) acc[k] = _mm256_setzero_ps();
        for (int i = 0; i < qb; i++, x += EL_KG) {
            const int line = b * qb + i;
            if (!(line & 1) && line / 2 < lines) _mm_prefetch(pk + 32 * line, _MM_HINT_T0);
            for (int h = 0; h < halves; h++) {
                __m256 kv[3];
                for (int j = 0; j < NG; j++) kv[j] = group_vals(type, x + j * gb, h);
                for (int r = 0; r < NR; r++) {
                    const __m256 qv = _mm256_broadcast_ss(q + (size_t)r * hd + b * EL_QK + i + 16 * h);
                    for (int j = 0; j < NG; j++)
                        acc[r * NG + j] = _mm256_fmadd_ps(qv, kv[j], acc[r * NG + j]);
                }
            }
        }
        for (int j = 0; j < NG; j++) {
            const __m256 d = _mm256_mul_ps(_mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(kg + j * gb + b * 16))),
                                           _mm256_set1_ps(scale));
            for (int r = 0; r < NR; r++) {
                float *o = s + r * EL_ST + 8 * j;
                _mm256_storeu_ps(o, b ? _mm256_fmadd_ps(acc[r * NG + j], d, _mm256_loadu_ps(o)) : _mm256_mul_ps(acc[r * NG + j], d));
            }
        }
    }
}

/* P.V of V block b for the tile's rows in threes, pd: weights times the block's scales [rows][EL_ST]; the first rows
 * prefetch the next tile's V, a share per block */
INLINE void pv_rows(const el_qtile *T, int type, int hd, int R, const char *v, size_t rb, int cnt, int b,
                    const float *pdb, const char *nv, size_t nbytes) {
    const int nb = hd / EL_QK;
    const size_t vfrom = nbytes * b / nb, vto = nbytes * (b + 1) / nb;
    for (int r = 0; r < R; r += 3) {
        const float *pd = pdb + r * EL_ST;
        float *o = T->o + (size_t)r * hd;
        const char *pv = nv + vfrom / 64 * 64;
        const int lines = r ? 0 : (int)((vto + 63) / 64 - vfrom / 64);
        switch (R - r < 3 ? R - r : 3) {
        case 3: quant_pv(type, v, rb, cnt, pd, b, o, hd, 3, pv, lines); break;
        case 2: quant_pv(type, v, rb, cnt, pd, b, o, hd, 2, pv, lines); break;
        default: quant_pv(type, v, rb, cnt, pd, b, o, hd, 1, pv, lines); break;
        }
    }
}

/* attention.c's softmax_row for each row of the tile (row r sees the keys at positions <= qpos[r / gs] when partial),
 * fused with the weights times V's scales: T->pd row r gets p[r][t] dv0[t], and T->s row r (in place, from t = 0)
 * p[r][t] dv1[t], or p[r][t] where dv1 is NULL. The same values as softmax_row then the products: max is exact in any
 * order, the exps, lanes and sum order are exp_sum_avx2's (masked keys and the tail -inf), expf gives the rescale. */
INLINE void softmax_pd(const el_qtile *T, int R, int off, const int32_t *pos, int cnt, int partial, const float *dv0,
                       const float *dv1) {
    const int nv = (cnt + 7) / 8;
    int32_t pp[EL_KT];   /* positions, past the tile INT32_MAX: later than any query */
    for (int t = 0; t < 8 * nv; t++) pp[t] = t < cnt ? pos[t] : INT32_MAX;
    for (int r = 0; r < R; r++) {
        float *s = T->s + r * EL_ST, *pd = T->pd + r * EL_ST;
        /* not partial: every key of the tile is visible, only the padding past it is masked */
        const __m256i qp = _mm256_set1_epi32(partial ? T->qpos[r / T->gs] : INT32_MAX - 1);
        __m256 x[EL_KT / 8], mv = _mm256_set1_ps(T->m[r]);
        for (int i = 0; i < nv; i++) {
            const __m256i later = _mm256_cmpgt_epi32(_mm256_loadu_si256((const __m256i *)(pp + 8 * i)), qp);
            x[i] = _mm256_blendv_ps(_mm256_loadu_ps(s + off + 8 * i), _mm256_set1_ps(-INFINITY), _mm256_castsi256_ps(later));
            mv = _mm256_max_ps(x[i], mv);
        }
        const float m_new = hmax(mv);
        if (m_new == -INFINITY) {   /* nothing visible to this row yet: it takes no part in P.V */
            for (int i = 0; i < nv; i++) _mm256_storeu_ps(pd + 8 * i, _mm256_setzero_ps()), _mm256_storeu_ps(s + 8 * i, _mm256_setzero_ps());
            continue;
        }
        if (m_new > T->m[r]) {   /* rescale what was accumulated under the old maximum */
            const float f = expf(T->m[r] - m_new);
            float *o = T->o + (size_t)r * T->hd;
            for (int d = 0; d < T->hd; d++) o[d] *= f;
            T->l[r] *= f;
            T->m[r] = m_new;
        }
        const __m256 mu = _mm256_set1_ps(m_new);
        __m256 acc = _mm256_setzero_ps();
        for (int i = 0; i < nv; i++) {
            const __m256 e = exp8z(_mm256_sub_ps(x[i], mu));
            acc = _mm256_add_ps(acc, e);
            _mm256_storeu_ps(pd + 8 * i, _mm256_mul_ps(e, _mm256_loadu_ps(dv0 + 8 * i)));
            _mm256_storeu_ps(s + 8 * i, dv1 ? _mm256_mul_ps(e, _mm256_loadu_ps(dv1 + 8 * i)) : e);
        }
        T->l[r] += hsum(acc);
    }
}

/* K.Q with rows and key groups in threes (9 accumulators), P.V with rows in threes (a V block's 32 dims of three rows:
 * 12 accumulators). A tile starting inside a group (off keys in) scores the whole group. */
INLINE void quant_tile(const el_qtile *T, int type, int hd, const char *kh, long j, const char *v, size_t rb,
                       const int32_t *pos, int cnt, int partial, const char *nk, const char *nv, size_t nbytes) {
    const int R = T->rows, cnt8 = (cnt + 7) & ~7, off = (int)(j % EL_KG), ng = (off + cnt + EL_KG - 1) / EL_KG;
    const size_t bb = block_bytes(type), gb = EL_KG * rb;
    const uint8_t *kg = (const uint8_t *)kh + (j - off) * rb;
    for (int r = 0; r < R; r += 3) {
        const float *q = T->q + (size_t)r * hd;
        float *s = T->s + r * EL_ST;
        for (int g = 0; g < ng; g += 3) {
            /* the first rows prefetch the next tile's K, a share per group chunk */
            const size_t from = r ? nbytes : g * gb, to = g + 3 >= ng ? nbytes : (g + 3) * gb;
            const int lines = from < to && to <= nbytes ? (int)((to - from + 63) / 64) : 0;
            const char *pk = nk + from;
            switch ((R - r < 3 ? R - r : 3) * 10 + (ng - g < 3 ? ng - g : 3)) {   /* compile-time shapes */
            case 33: kq_groups(type, kg + g * gb, gb, hd, q, T->scale, s + 8 * g, 3, 3, pk, lines); break;
            case 32: kq_groups(type, kg + g * gb, gb, hd, q, T->scale, s + 8 * g, 3, 2, pk, lines); break;
            case 31: kq_groups(type, kg + g * gb, gb, hd, q, T->scale, s + 8 * g, 3, 1, pk, lines); break;
            case 23: kq_groups(type, kg + g * gb, gb, hd, q, T->scale, s + 8 * g, 2, 3, pk, lines); break;
            case 22: kq_groups(type, kg + g * gb, gb, hd, q, T->scale, s + 8 * g, 2, 2, pk, lines); break;
            case 21: kq_groups(type, kg + g * gb, gb, hd, q, T->scale, s + 8 * g, 2, 1, pk, lines); break;
            case 13: kq_groups(type, kg + g * gb, gb, hd, q, T->scale, s + 8 * g, 1, 3, pk, lines); break;
            case 12: kq_groups(type, kg + g * gb, gb, hd, q, T->scale, s + 8 * g, 1, 2, pk, lines); break;
            default: kq_groups(type, kg + g * gb, gb, hd, q, T->scale, s + 8 * g, 1, 1, pk, lines); break;
            }
        }
    }
    /* two blocks (head_dim 64): the softmax writes both blocks' weights; more: the later ones from the p it leaves */
    const int nb = hd / EL_QK;
    float dv[2][EL_KT];
    block_scales(v, rb, cnt, dv[0]);
    if (nb == 2) block_scales(v + bb, rb, cnt, dv[1]);
    softmax_pd(T, R, off, pos, cnt, partial, dv[0], nb == 2 ? dv[1] : NULL);
    pv_rows(T, type, hd, R, v, rb, cnt, 0, T->pd, nv, nbytes);
    if (nb == 2) {
        pv_rows(T, type, hd, R, v, rb, cnt, 1, T->s, nv, nbytes);
        return;
    }
    for (int b = 1; b < nb; b++) {
        block_scales(v + b * bb, rb, cnt, dv[0]);
        for (int r = 0; r < R; r++)
            for (int t = 0; t < cnt8; t += 8)
                _mm256_storeu_ps(T->pd + r * EL_ST + t, _mm256_mul_ps(_mm256_loadu_ps(T->s + r * EL_ST + t), _mm256_loadu_ps(dv[0] + t)));
        pv_rows(T, type, hd, R, v, rb, cnt, b, T->pd, nv, nbytes);
    }
}

static void attend_quant_avx2(const el_qtile *T, int type, const char *kg, long j, const char *v, size_t rb,
                              const int32_t *pos, int cnt, int partial, const char *nk, const char *nv, size_t nbytes) {
    /* head_dim 64 (SmolLM2, Llama 3.2 1B) as a constant: the block loops unroll */
    if (type == EL_Q8_0) T->hd == 64 ? quant_tile(T, EL_Q8_0, 64, kg, j, v, rb, pos, cnt, partial, nk, nv, nbytes)
                                     : quant_tile(T, EL_Q8_0, T->hd, kg, j, v, rb, pos, cnt, partial, nk, nv, nbytes);
    else T->hd == 64 ? quant_tile(T, EL_Q4_0, 64, kg, j, v, rb, pos, cnt, partial, nk, nv, nbytes)
                     : quant_tile(T, EL_Q4_0, T->hd, kg, j, v, rb, pos, cnt, partial, nk, nv, nbytes);
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

/* one butterfly stage inside a vector: lanes in mask get s - v (the pair's first minus its second), the others v + s,
 * with s the vector whose lanes are each lane's pair partner */
INLINE __m256 fwht_stage(__m256 v, __m256 s, int mask) {
    return _mm256_blend_ps(_mm256_add_ps(v, s), _mm256_sub_ps(s, v), mask);
}

/* hadamard_rows' stages in its order: h = 1, 2, 4 inside each vector of 8, then h = 8 ... dim/2 across vectors */
static void hadamard_avx2(float *x, long rows, int dim, float norm) {
    const __m256 nv = _mm256_set1_ps(norm);
    for (long r = 0; r < rows; r++, x += dim) {
        for (int i = 0; i < dim; i += 8) {
            __m256 v = _mm256_loadu_ps(x + i);
            v = fwht_stage(v, _mm256_permute_ps(v, 0xB1), 0xAA);
            v = fwht_stage(v, _mm256_permute_ps(v, 0x4E), 0xCC);
            v = fwht_stage(v, _mm256_permute2f128_ps(v, v, 1), 0xF0);
            _mm256_storeu_ps(x + i, v);
        }
        for (int h = 8; h < dim; h <<= 1)
            for (int i = 0; i < dim; i += 2 * h)
                for (int j = i; j < i + h; j += 8) {
                    __m256 a = _mm256_loadu_ps(x + j), b = _mm256_loadu_ps(x + j + h);
                    _mm256_storeu_ps(x + j, _mm256_add_ps(a, b));
                    _mm256_storeu_ps(x + j + h, _mm256_sub_ps(a, b));
                }
        for (int j = 0; j < dim; j += 8) _mm256_storeu_ps(x + j, _mm256_mul_ps(_mm256_loadu_ps(x + j), nv));
    }
}

static void f16_row_avx2(const uint16_t *x, float *y, long n) {
    long i = 0;
    for (; i + 8 <= n; i += 8) _mm256_storeu_ps(y + i, _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(x + i))));
    for (; i < n; i++) y[i] = f16(x[i]);
}

/* F16C rounds to nearest even as el_f32_to_f16 does; from the first group of 8 holding a NaN on, the scalar path
 * (it drops a NaN's payload, which the instruction would keep part of) */
static void to_f16_row_avx2(const float *x, uint16_t *y, long n) {
    long i = 0;
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        if (_mm256_movemask_ps(_mm256_cmp_ps(v, v, _CMP_UNORD_Q))) break;
        _mm_storeu_si128((__m128i *)(y + i), _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
    }
    for (; i < n; i++) y[i] = el_f32_to_f16(x[i]);
}

/* el_quantize_row's Q8_0 loop on 8 lanes: the same max, scale, products and round-half-away steps per value, so the
 * same blocks for finite values (a NaN is left out of the max as there; its own byte is not defined on either path) */
static void q8_0_row_avx2(const float *x, void *dst, long n) {
    const __m256 abs = _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff)), half = _mm256_set1_ps(0.5f);
    for (long b = 0; b < n / EL_QK; b++, x += EL_QK) {
        el_block_q8_0 *y = (el_block_q8_0 *)dst + b;
        __m256 v[4], m = _mm256_setzero_ps();
        for (int k = 0; k < 4; k++)   /* maxps returns its second operand where one is NaN: m, as the scalar max */
            v[k] = _mm256_loadu_ps(x + 8 * k), m = _mm256_max_ps(_mm256_and_ps(v[k], abs), m);
        __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
        h = _mm_max_ps(h, _mm_movehl_ps(h, h));
        const float d = _mm_cvtss_f32(_mm_max_ss(h, _mm_movehdup_ps(h))) / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        __m256i q[4];
        for (int k = 0; k < 4; k++) {   /* t + (f >= 0.5) - (f <= -0.5), f = v - t, t its truncation */
            const __m256 p = _mm256_mul_ps(v[k], _mm256_set1_ps(id));
            const __m256i t = _mm256_cvttps_epi32(p);
            const __m256 f = _mm256_sub_ps(p, _mm256_cvtepi32_ps(t));
            q[k] = _mm256_add_epi32(_mm256_sub_epi32(t, _mm256_castps_si256(_mm256_cmp_ps(f, half, _CMP_GE_OQ))),
                                    _mm256_castps_si256(_mm256_cmp_ps(f, _mm256_set1_ps(-0.5f), _CMP_LE_OQ)));
        }
        const __m256i w = _mm256_packs_epi16(_mm256_packs_epi32(q[0], q[1]), _mm256_packs_epi32(q[2], q[3]));
        const __m256i order = _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7);   /* packs work within 128-bit lanes */
        _mm256_storeu_si256((__m256i *)y->qs, _mm256_permutevar8x32_epi32(w, order));
        y->d = el_f32_to_f16(d);
    }
}

const el_kernels el_kernels_avx2 = {
    quant_act_avx2, mm_rows_avx2, kq_avx2, pv_avx2, exp_sum_avx2, silu_mul_avx2, attend_lanes_avx2, 1, hadamard_avx2, f16_row_avx2,
    attend_quant_avx2, max_avx2, to_f16_row_avx2, q8_0_row_avx2,
};

#pragma GCC pop_options
#endif
