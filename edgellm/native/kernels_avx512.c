/* AVX-512 (F, BW, VL, DQ, VNNI) kernels: the AVX2 table with the quantized attention tile, the interleaved Q4 matmul
 * (prefill and decode) and the row-repacked Q8_0 GEMV (the output matrix) in 16-lane vectors and VNNI byte dots. Only
 * this file's functions are compiled for AVX-512 (pragma below); they are reached solely through el_kernels_avx512()
 * after a cpuid check.
 *
 * Every lane does what the AVX2 kernel does for its key, head dimension or weight row, the same operations in the
 * same order (integer dot products are exact in any order), so the outputs are the AVX2 table's bit for bit
 * (tests/test_native_kernels.py checks it); the wider vectors and VNNI's fused byte dot products cut the
 * instructions: the attention tile is arithmetic-bound at long contexts, and the fewer a GEMV's instructions the
 * closer its weight stream runs to the memory's rate. */
#if defined(__x86_64__)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
#include "kernels.h"
#include "kernels_x86.h"

#include <immintrin.h>
#include <math.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>

/* exp8z (kernels_avx2.c) on 16 lanes: each lane's operations are exp8z's, so its values */
INLINE __m512 exp16z(__m512 x) {
    const __m512 lo = _mm512_set1_ps(-87.33654f);
    const __mmask16 keep = _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ);
    x = _mm512_min_ps(_mm512_max_ps(x, lo), _mm512_set1_ps(88.3762626647949f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
    __m512 p = _mm512_set1_ps(1.9875691500E-4f);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073E-3f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894E-2f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459E-1f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201E-1f));
    p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.0f)));
    __m512i e = _mm512_slli_epi32(_mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127)), 23);
    return _mm512_maskz_mov_ps(keep, _mm512_mul_ps(p, _mm512_castsi512_ps(e)));
}

INLINE size_t block_bytes(int type) { return type == EL_Q8_0 ? sizeof(el_block_q8_0) : sizeof(el_block_q4_0); }

/* 16 bytes as int8 values to floats; Q4_0: the low (hi 0) or high nibbles minus 8 */
INLINE __m512 bytes16(int type, __m128i b, int hi) {
    if (type == EL_Q4_0) {
        if (hi) b = _mm_srli_epi16(b, 4);
        b = _mm_sub_epi8(_mm_and_si128(b, _mm_set1_epi8(0x0F)), _mm_set1_epi8(8));
    }
    return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(b));
}

/* A V block's values 16h .. 16h + 15 before its scale (Q4_0: the low nibbles are values 0..15, the high 16..31) */
INLINE __m512 qvals16(int type, const uint8_t *blk, int h) {
    if (type == EL_Q8_0) return bytes16(type, _mm_loadu_si128((const __m128i *)(blk + 2 + 16 * h)), 0);
    return bytes16(type, _mm_loadu_si128((const __m128i *)(blk + 2)), h);
}

/* ---------------- K.Q: two key groups per vector ---------------- */

/* A pair of key groups: lanes 0..7 the keys of group lo, 8..15 those of group hi (hi = lo for the last group of an
 * odd count: its lanes are computed and not stored) */
typedef struct {
    const uint8_t *lo, *hi;
    __mmask16 keep;
} gpair;

/* Value i of a quantized block (Q4_0: i or i + 16, as group_vals) for a pair's 16 keys, 8 bytes at byte offset o of
 * each group */
INLINE __m512 pair_vals(int type, const gpair *p, size_t o, int hi) {
    const __m128i b = _mm_loadl_epi64((const __m128i *)(p->lo + o));
    return bytes16(type, _mm_castpd_si128(_mm_loadh_pd(_mm_castsi128_pd(b), (const double *)(p->hi + o))), hi);
}

/* kq_groups (kernels_avx2.c) for NR rows and NP group pairs at once: each lane's FMAs, scale and stores are those of
 * its key there. The first `lines` of the (b, i) steps each prefetch a line of pk (the next tile's K). */
INLINE void kq_pairs(int type, const gpair *gp, int hd, const float *q, float scale, float *s, int NR, int NP,
                     const char *pk, int lines) {
    const int nb = hd / EL_QK, qb = type == EL_Q8_0 ? EL_QK : EL_QK / 2, halves = type == EL_Q8_0 ? 1 : 2;
    __m512 acc[12];
    for (int b = 0; b < nb; b++) {
        const size_t vo = (size_t)nb * 16 + (size_t)b * qb * EL_KG;
        for (int k = 0; k < NR * NP; k++) acc[k] = _mm512_setzero_ps();
        for (int i = 0; i < qb; i++) {
            const int line = b * qb + i;
            if (line < lines) _mm_prefetch(pk + 64 * line, _MM_HINT_T0);
            for (int h = 0; h < halves; h++) {
                __m512 kv[4];
                for (int p = 0; p < NP; p++) kv[p] = pair_vals(type, gp + p, vo + (size_t)i * EL_KG, h);
                for (int r = 0; r < NR; r++) {
                    const __m512 qv = _mm512_set1_ps(q[(size_t)r * hd + b * EL_QK + i + 16 * h]);
                    for (int p = 0; p < NP; p++) acc[r * NP + p] = _mm512_fmadd_ps(qv, kv[p], acc[r * NP + p]);
                }
            }
        }
        for (int p = 0; p < NP; p++) {
            const __m256i h16 = _mm256_inserti128_si256(
                _mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)(gp[p].lo + b * 16))),
                _mm_loadu_si128((const __m128i *)(gp[p].hi + b * 16)), 1);
            const __m512 d = _mm512_mul_ps(_mm512_cvtph_ps(h16), _mm512_set1_ps(scale));
            for (int r = 0; r < NR; r++) {
                float *o = s + r * EL_ST + 16 * p;
                const __m512 v = b ? _mm512_fmadd_ps(acc[r * NP + p], d, _mm512_maskz_loadu_ps(gp[p].keep, o))
                                   : _mm512_mul_ps(acc[r * NP + p], d);
                _mm512_mask_storeu_ps(o, gp[p].keep, v);
            }
        }
    }
    for (int line = nb * qb; line < lines; line++) _mm_prefetch(pk + 64 * line, _MM_HINT_T0);
}

/* ---------------- softmax and P.V ---------------- */

/* block_scales (kernels_avx2.c) 16 at a time: d[t] = the f16 scale at x + t * rb for t < cnt, 0 up to the next
 * multiple of 16 */
INLINE void block_scales16(const char *x, size_t rb, int cnt, float *d) {
    const __m512i lane = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
    const __m512i off = _mm512_mullo_epi32(lane, _mm512_set1_epi32((int)rb));
    for (int t0 = 0; t0 < cnt; t0 += 16) {
        const __mmask16 in = _mm512_cmpgt_epi32_mask(_mm512_set1_epi32(cnt - t0), lane);
        const __m512i g = _mm512_mask_i32gather_epi32(_mm512_setzero_si512(), in, off, x + t0 * rb, 1);
        _mm512_storeu_ps(d + t0, _mm512_cvtph_ps(_mm512_cvtepi32_epi16(g)));   /* the low halves */
    }
}

/* softmax_pd (kernels_avx2.c) on 16 keys a vector for NR rows from r0 at once: the same masking, maximum, lane-wise
 * exps, products and stores (the first 8 * nv values, nv = the 8-key vectors there), and each row's sum over the
 * 8-key halves in their order. Its steps run a phase for all NR rows before the next: a row alone is a chain of
 * dependent steps (maximum, reduction, exps, sum) whose latency the tile otherwise waits out row after row. */
INLINE void softmax_rows16(const el_qtile *T, int r0, int NR, int off, const int32_t *pp, int nv, int partial,
                           const float *dv0, const float *dv1) {
    const int n16 = (nv + 1) / 2;
    __m512 x[3][EL_KT / 16];
    __mmask16 in[EL_KT / 16];
    float m_new[3];
    for (int k = 0; k < n16; k++) in[k] = 2 * k + 1 < nv ? 0xFFFF : 0x00FF;
    for (int i = 0; i < NR; i++) {   /* masked scores, the rows' maxima */
        const int r = r0 + i;
        const __m512i qp = _mm512_set1_epi32(partial ? T->qpos[r / T->gs] : INT32_MAX - 1);
        __m512 mv = _mm512_set1_ps(T->m[r]);
        for (int k = 0; k < n16; k++) {
            const __mmask16 later = _mm512_cmpgt_epi32_mask(_mm512_loadu_si512(pp + 16 * k), qp);
            x[i][k] = _mm512_mask_mov_ps(_mm512_maskz_loadu_ps(in[k], T->s + r * EL_ST + off + 16 * k),
                                         later | (__mmask16)~in[k], _mm512_set1_ps(-INFINITY));
            mv = _mm512_max_ps(x[i][k], mv);
        }
        m_new[i] = _mm512_reduce_max_ps(mv);
    }
    for (int i = 0; i < NR; i++) {
        const int r = r0 + i;
        if (m_new[i] > T->m[r]) {   /* rescale what was accumulated under the old maximum */
            const float f = expf(T->m[r] - m_new[i]);
            float *o = T->o + (size_t)r * T->hd;
            for (int d = 0; d < T->hd; d++) o[d] *= f;
            T->l[r] *= f;
            T->m[r] = m_new[i];
        }
    }
    for (int i = 0; i < NR; i++) {
        const int r = r0 + i;
        float *s = T->s + r * EL_ST, *pd = T->pd + r * EL_ST;
        if (m_new[i] == -INFINITY) {   /* nothing visible to this row yet: it takes no part in P.V */
            for (int k = 0; k < n16; k++)
                _mm512_mask_storeu_ps(pd + 16 * k, in[k], _mm512_setzero_ps()), _mm512_mask_storeu_ps(s + 16 * k, in[k], _mm512_setzero_ps());
            continue;
        }
        const __m512 mu = _mm512_set1_ps(m_new[i]);
        __m256 acc = _mm256_setzero_ps();
        for (int k = 0; k < n16; k++) {
            const __m512 e = exp16z(_mm512_sub_ps(x[i][k], mu));
            acc = _mm256_add_ps(acc, _mm512_castps512_ps256(e));
            if (in[k] == 0xFFFF) acc = _mm256_add_ps(acc, _mm512_extractf32x8_ps(e, 1));
            _mm512_mask_storeu_ps(pd + 16 * k, in[k], _mm512_mul_ps(e, _mm512_loadu_ps(dv0 + 16 * k)));
            _mm512_mask_storeu_ps(s + 16 * k, in[k], dv1 ? _mm512_mul_ps(e, _mm512_loadu_ps(dv1 + 16 * k)) : e);
        }
        T->l[r] += hsum(acc);
    }
}

/* The tile's rows through softmax_rows16 in threes (row r sees the keys at positions <= qpos[r / gs] when partial) */
INLINE void softmax_pd16(const el_qtile *T, int R, int off, const int32_t *pos, int cnt, int partial, const float *dv0,
                         const float *dv1) {
    const int nv = (cnt + 7) / 8;
    int32_t pp[EL_KT];   /* positions, past the tile INT32_MAX: later than any query */
    for (int t = 0; t < 16 * ((nv + 1) / 2); t++) pp[t] = t < cnt ? pos[t] : INT32_MAX;
    for (int r = 0; r < R; r += 3) switch (R - r < 3 ? R - r : 3) {   /* compile-time row counts */
        case 3: softmax_rows16(T, r, 3, off, pp, nv, partial, dv0, dv1); break;
        case 2: softmax_rows16(T, r, 2, off, pp, nv, partial, dv0, dv1); break;
        default: softmax_rows16(T, r, 1, off, pp, nv, partial, dv0, dv1); break;
        }
}

/* quant_pv (kernels_avx2.c) for NB consecutive V blocks b, b + 1 (weights times scales pdb[0], pdb[1], rows EL_ST
 * apart) of NH rows: each output lane takes its FMAs in key order, as there. One line of pv a key while t < lines. */
INLINE void quant_pv16(int type, const char *v, size_t rb, int cnt, const float *const *pdb, int b, int NB, float *o,
                       int hd, int NH, const char *pv, int lines) {
    const size_t bb = block_bytes(type);
    __m512 acc[3][4];
    for (int i = 0; i < NH; i++)
        for (int k = 0; k < 2 * NB; k++) acc[i][k] = _mm512_loadu_ps(o + (size_t)i * hd + b * EL_QK + 16 * k);
    for (int t = 0; t < cnt; t++) {
        const uint8_t *row = (const uint8_t *)v + t * rb + b * bb;
        if (t < lines) _mm_prefetch(pv + 64 * t, _MM_HINT_T0);
        for (int u = 0; u < NB; u++)
            for (int h = 0; h < 2; h++) {
                const __m512 x = qvals16(type, row + u * bb, h);
                for (int i = 0; i < NH; i++)
                    acc[i][2 * u + h] = _mm512_fmadd_ps(_mm512_set1_ps(pdb[u][i * EL_ST + t]), x, acc[i][2 * u + h]);
            }
    }
    for (int i = 0; i < NH; i++)
        for (int k = 0; k < 2 * NB; k++) _mm512_storeu_ps(o + (size_t)i * hd + b * EL_QK + 16 * k, acc[i][k]);
}

/* P.V of NB blocks from b for the tile's rows in threes; the first rows prefetch the next tile's V (the lines this
 * call's share, a line per key, the rest after) */
INLINE void pv_rows16(const el_qtile *T, int type, int hd, int R, const char *v, size_t rb, int cnt, int b, int NB,
                      const float *pd0, const float *pd1, const char *nv, size_t nbytes) {
    const int nb = hd / EL_QK;
    const size_t vfrom = nbytes * b / nb, vto = nbytes * (b + NB) / nb;
    const char *pv = nv + vfrom / 64 * 64;
    const int lines = (int)((vto + 63) / 64 - vfrom / 64);
    for (int r = 0; r < R; r += 3) {
        const float *pdb[2] = {pd0 + r * EL_ST, pd1 + r * EL_ST};
        float *o = T->o + (size_t)r * hd;
        const int nl = r ? 0 : lines;
        switch ((R - r < 3 ? R - r : 3) * 10 + NB) {   /* compile-time shapes */
        case 32: quant_pv16(type, v, rb, cnt, pdb, b, 2, o, hd, 3, pv, nl); break;
        case 31: quant_pv16(type, v, rb, cnt, pdb, b, 1, o, hd, 3, pv, nl); break;
        case 22: quant_pv16(type, v, rb, cnt, pdb, b, 2, o, hd, 2, pv, nl); break;
        case 21: quant_pv16(type, v, rb, cnt, pdb, b, 1, o, hd, 2, pv, nl); break;
        case 12: quant_pv16(type, v, rb, cnt, pdb, b, 2, o, hd, 1, pv, nl); break;
        default: quant_pv16(type, v, rb, cnt, pdb, b, 1, o, hd, 1, pv, nl); break;
        }
    }
    for (int l = cnt; l < lines; l++) _mm_prefetch(pv + 64 * l, _MM_HINT_T0);
}

/* quant_tile (kernels_avx2.c) in 16 lanes: K.Q with rows in threes and group pairs in fours (12 accumulators); the
 * softmax; P.V with rows in threes, two V blocks a pass where head_dim has them. */
INLINE void quant_tile16(const el_qtile *T, int type, int hd, const char *kh, long j, const char *v, size_t rb,
                         const int32_t *pos, int cnt, int partial, const char *nk, const char *nv, size_t nbytes) {
    const int R = T->rows, off = (int)(j % EL_KG), ng = (off + cnt + EL_KG - 1) / EL_KG, np = (ng + 1) / 2;
    const size_t bb = block_bytes(type), gb = EL_KG * rb;
    const uint8_t *kg = (const uint8_t *)kh + (j - off) * rb;
    gpair gp[(EL_ST / EL_KG + 1) / 2];
    for (int p = 0; p < np; p++) {
        const int whole = 2 * p + 1 < ng;
        gp[p] = (gpair){kg + 2 * p * gb, kg + (2 * p + whole) * gb, whole ? 0xFFFF : 0x00FF};
    }
    for (int r = 0; r < R; r += 3) {
        const float *q = T->q + (size_t)r * hd;
        float *s = T->s + r * EL_ST;
        for (int p = 0; p < np; p += 4) {
            /* the first rows prefetch the next tile's K, a share per chunk of pairs */
            const size_t from = r ? nbytes : (size_t)2 * p * gb, to = p + 4 >= np ? nbytes : (size_t)2 * (p + 4) * gb;
            const int lines = from < to && to <= nbytes ? (int)((to - from + 63) / 64) : 0;
            const char *pk = nk + from;
            switch ((R - r < 3 ? R - r : 3) * 10 + (np - p < 4 ? np - p : 4)) {   /* compile-time shapes */
            case 34: kq_pairs(type, gp + p, hd, q, T->scale, s + 16 * p, 3, 4, pk, lines); break;
            case 33: kq_pairs(type, gp + p, hd, q, T->scale, s + 16 * p, 3, 3, pk, lines); break;
            case 32: kq_pairs(type, gp + p, hd, q, T->scale, s + 16 * p, 3, 2, pk, lines); break;
            case 31: kq_pairs(type, gp + p, hd, q, T->scale, s + 16 * p, 3, 1, pk, lines); break;
            case 24: kq_pairs(type, gp + p, hd, q, T->scale, s + 16 * p, 2, 4, pk, lines); break;
            case 23: kq_pairs(type, gp + p, hd, q, T->scale, s + 16 * p, 2, 3, pk, lines); break;
            case 22: kq_pairs(type, gp + p, hd, q, T->scale, s + 16 * p, 2, 2, pk, lines); break;
            case 21: kq_pairs(type, gp + p, hd, q, T->scale, s + 16 * p, 2, 1, pk, lines); break;
            case 14: kq_pairs(type, gp + p, hd, q, T->scale, s + 16 * p, 1, 4, pk, lines); break;
            case 13: kq_pairs(type, gp + p, hd, q, T->scale, s + 16 * p, 1, 3, pk, lines); break;
            case 12: kq_pairs(type, gp + p, hd, q, T->scale, s + 16 * p, 1, 2, pk, lines); break;
            default: kq_pairs(type, gp + p, hd, q, T->scale, s + 16 * p, 1, 1, pk, lines); break;
            }
        }
    }
    /* two blocks (head_dim 64): the softmax writes both blocks' weights and one P.V pass takes both; more: the later
     * blocks' weights from the p it leaves */
    const int nb = hd / EL_QK;
    float dv[2][EL_KT];
    block_scales16(v, rb, cnt, dv[0]);
    if (nb == 2) block_scales16(v + bb, rb, cnt, dv[1]);
    softmax_pd16(T, R, off, pos, cnt, partial, dv[0], nb == 2 ? dv[1] : NULL);
    if (nb == 2) {
        pv_rows16(T, type, hd, R, v, rb, cnt, 0, 2, T->pd, T->s, nv, nbytes);
        return;
    }
    pv_rows16(T, type, hd, R, v, rb, cnt, 0, 1, T->pd, T->pd, nv, nbytes);
    const int cnt16 = (cnt + 15) & ~15;
    for (int b = 1; b < nb; b++) {
        block_scales16(v + b * bb, rb, cnt, dv[0]);
        for (int r = 0; r < R; r++)
            for (int t = 0; t < cnt16; t += 16)
                _mm512_mask_storeu_ps(T->pd + r * EL_ST + t, cnt - t >= 16 ? 0xFFFF : (__mmask16)((1u << (cnt - t)) - 1),
                                      _mm512_mul_ps(_mm512_loadu_ps(T->s + r * EL_ST + t), _mm512_loadu_ps(dv[0] + t)));
        pv_rows16(T, type, hd, R, v, rb, cnt, b, 1, T->pd, T->pd, nv, nbytes);
    }
}

static void attend_quant_avx512(const el_qtile *T, int type, const char *kg, long j, const char *v, size_t rb,
                                const int32_t *pos, int cnt, int partial, const char *nk, const char *nv, size_t nbytes) {
    /* head_dim 64 (SmolLM2, Llama 3.2 1B) as a constant: the block loops unroll */
    if (type == EL_Q8_0) T->hd == 64 ? quant_tile16(T, EL_Q8_0, 64, kg, j, v, rb, pos, cnt, partial, nk, nv, nbytes)
                                     : quant_tile16(T, EL_Q8_0, T->hd, kg, j, v, rb, pos, cnt, partial, nk, nv, nbytes);
    else T->hd == 64 ? quant_tile16(T, EL_Q4_0, 64, kg, j, v, rb, pos, cnt, partial, nk, nv, nbytes)
                     : quant_tile16(T, EL_Q4_0, T->hd, kg, j, v, rb, pos, cnt, partial, nk, nv, nbytes);
}

/* ---------------- matmul, 8-row interleaved Q4 weights, two groups a vector ---------------- */

/* A pair of 8-row groups' blocks: lanes 0..7 group lo's rows, 8..15 group hi's (hi = lo for the last group of an odd
 * count: its lanes are computed and not stored) */
INLINE __m512i two256(const uint8_t *lo, const uint8_t *hi) {
    return _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_loadu_si256((const __m256i *)lo)),
                              _mm256_loadu_si256((const __m256i *)hi), 1);
}

INLINE __m512 two_f16(const uint8_t *lo, const uint8_t *hi) {
    return _mm512_cvtph_ps(_mm256_inserti128_si256(_mm256_castsi128_si256(_mm_loadu_si128((const __m128i *)lo)),
                                                   _mm_loadu_si128((const __m128i *)hi), 1));
}

INLINE int32_t act4(const int8_t *p) {
    int32_t v;
    memcpy(&v, p, 4);
    return v;
}

/* x_dot (kernels_avx2.c) for 16 rows: lane i, row i's integer dot with act block a (exact, as maddubs' there) */
INLINE __m512 x_dot16(const __m512i *lo, const __m512i *hi, const el_block_q8a *a) {
    __m512i s = _mm512_setzero_si512();
    for (int c = 0; c < 4; c++) {
        s = _mm512_dpbusd_epi32(s, lo[c], _mm512_set1_epi32(act4(a->qs + 4 * c)));
        s = _mm512_dpbusd_epi32(s, hi[c], _mm512_set1_epi32(act4(a->qs + 16 + 4 * c)));
    }
    return _mm512_cvtepi32_ps(s);
}

/* scale_wmax (kernels_avx2.c) for Q4 lanes: 8|d| (Q4_0), 15|d| + |m| (Q4_1, m = c) */
INLINE __m512 scale_wmax16(int type, __m512 dw, __m512 c) {
    const __m512 wmax = _mm512_mul_ps(_mm512_abs_ps(dw), _mm512_set1_ps(type == EL_Q4_1X ? 15 : 8));
    return type == EL_Q4_1X ? _mm512_add_ps(wmax, _mm512_abs_ps(c)) : wmax;
}

/* x_store (kernels_avx2.c) for a pair's 16 lanes: rows g.. of the lanes kept (8 or 16) within [r0, r1) */
INLINE void x_store16(float *y, int g, int lanes, int r0, int r1, __m512 v) {
    if (g >= r0 && g + lanes <= r1) {
        _mm512_mask_storeu_ps(y + g, lanes == 16 ? 0xFFFF : 0x00FF, v);
        return;
    }
    float l[16];
    _mm512_storeu_ps(l, v);
    for (int i = 0; i < lanes; i++)
        if (g + i >= r0 && g + i < r1) y[g + i] = l[i];
}

/* x_group (kernels_avx2.c) for the groups at g and g + 8 (lanes 8 or 16): each row's terms and sums are x_group's */
INLINE void x_pair(int type, const el_mm *m, int g, int lanes, int r0, int r1, int t, int NT, int BOUND) {
    const int nb = m->cols / EL_QK;
    const size_t bb = 8 * m->row_bytes / nb;
    const uint8_t *q0 = m->W + (size_t)g * m->row_bytes, *q1 = lanes == 16 ? q0 + 8 * m->row_bytes : q0;
    const el_block_q8a *a[XT];
    __m512 acc[XT][XACC], bacc = _mm512_setzero_ps();
    for (int j = 0; j < NT; j++) {
        a[j] = (const el_block_q8a *)m->act + (size_t)(t + j) * nb;
        for (int k = 0; k < XACC; k++) acc[j][k] = _mm512_setzero_ps();
    }
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    for (int b = 0; b < nb; b++) {
        const uint8_t *b0 = q0 + bb * b, *b1 = q1 + bb * b;
        __m512i lo[4], hi[4];
        for (int c = 0; c < 4; c++) {
            const __m512i x = two256(b0 + 32 * c, b1 + 32 * c);
            lo[c] = _mm512_and_si512(x, m4), hi[c] = _mm512_and_si512(_mm512_srli_epi16(x, 4), m4);
        }
        const __m512 dw = two_f16(b0 + 128, b1 + 128);
        const __m512 c = type == EL_Q4_1X ? two_f16(b0 + 144, b1 + 144) : _mm512_mul_ps(dw, _mm512_set1_ps(-8.0f));
        for (int j = 0; j < NT; j++) {
            const __m512 dd = _mm512_mul_ps(dw, _mm512_set1_ps(a[j][b].d));
            const __m512 v = _mm512_fmadd_ps(x_dot16(lo, hi, a[j] + b), dd, _mm512_mul_ps(c, _mm512_set1_ps(a[j][b].s)));
            acc[j][b % XACC] = _mm512_add_ps(acc[j][b % XACC], v);
        }
        if (BOUND) bacc = _mm512_fmadd_ps(scale_wmax16(type, dw, c), _mm512_set1_ps(m->bound_v[b]), bacc);
    }
    __m512 y[XT];
    for (int j = 0; j < NT; j++) {
        for (int w = XACC / 2; w; w /= 2)
            for (int k = 0; k < w; k++) acc[j][k] = _mm512_add_ps(acc[j][k], acc[j][k + w]);
        y[j] = acc[j][0];
    }
    if (m->planes == 2) {   /* act rows 2i, 2i + 1: the two planes of token t / 2 + i (NT even) */
        for (int j = 0; j < NT / 2; j++) y[j] = _mm512_add_ps(y[2 * j], y[2 * j + 1]);
        t /= 2, NT /= 2;
    }
    for (int j = 0; j < NT; j++) x_store16(m->Y + (size_t)(t + j) * m->ldy, g, lanes, r0, r1, y[j]);
    if (BOUND && t == 0) x_store16(m->bound, g, lanes, r0, r1, bacc);
}

/* xmm_rows (kernels_avx2.c) with a slab's two groups in one pass (prefill: the activations' dwords are VNNI's
 * broadcast operands, shared by 16 rows) */
INLINE void xmm_rows16(int type, const el_mm *m, int r0, int r1, int BOUND) {
    for (int t0 = 0; t0 < m->n; t0 += TC) {
        const int t1 = t0 + TC < m->n ? t0 + TC : m->n;
        for (int rs = r0 & ~7; rs < r1; rs += RS) {
            const int re = rs + RS < r1 ? rs + RS : r1, lanes = rs + 8 < re ? 16 : 8;
            int t = t0;
            for (; t + XT <= t1; t += XT) x_pair(type, m, rs, lanes, r0, r1, t, XT, BOUND);
            for (; t + 2 <= t1; t += 2) x_pair(type, m, rs, lanes, r0, r1, t, 2, BOUND);
            if (t < t1) x_pair(type, m, rs, lanes, r0, r1, t, 1, BOUND);
        }
    }
}

/* ---------------- decode GEMV, interleaved Q4 weights ---------------- */

/* One token's act blocks as x_group1's VNNI operands: per block four vectors, for the low nibbles of chunks 0-1, of
 * chunks 2-3, and the high nibbles of chunks 0-1, of 2-3 (x_unpack: chunk c's lane i holds row i's weights 4c..4c+3 in
 * its low nibbles, 16+4c..16+4c+3 in its high ones); a vector's lanes 0-7 hold the four act values its first chunk
 * meets, lanes 8-15 the second's. Per thread, grown as needed; NULL: no memory. */
static const __m512i *spread_x(const el_block_q8a *a, int nb) {
    static _Thread_local __m512i *buf;
    static _Thread_local int cap;
    if (nb > cap) {
        free(buf);
        buf = aligned_alloc(64, (size_t)nb * 4 * sizeof(__m512i));
        cap = buf ? nb : 0;
        if (!buf) return NULL;
    }
    for (int b = 0; b < nb; b++) {
        const __m512i qs = _mm512_broadcast_i64x4(_mm256_loadu_si256((const __m256i *)a[b].qs));
        for (int v = 0; v < 4; v++) {
            const int w = (v >= 2 ? 4 : 0) + 2 * (v % 2);   /* lanes 0-7: act dword w (values 4w..4w+3); 8-15: w + 1 */
            const __m512i idx = _mm512_set_epi32(w + 1, w + 1, w + 1, w + 1, w + 1, w + 1, w + 1, w + 1, w, w, w, w, w,
                                                 w, w, w);
            buf[4 * b + v] = _mm512_permutexvar_epi32(idx, qs);
        }
    }
    return buf;
}

/* x_group (kernels_avx2.c) for one token: the group's 128 bytes of a block in two 64-byte loads (the bytes in order,
 * one stream), four VNNI dots into lanes i and i + 8 of row i, their sum the exact integer dot of x_dot; the float
 * terms and sums are x_group's on the low 8 lanes */
INLINE void x_group1(int type, const el_mm *m, int g, int r0, int r1, const __m512i *xs, int BOUND) {
    const int nb = m->cols / EL_QK;
    const size_t bb = 8 * m->row_bytes / nb;
    const uint8_t *q = m->W + (size_t)g * m->row_bytes;
    const el_block_q8a *a = m->act;
    const __m512i m4 = _mm512_set1_epi8(0x0F);
    __m512 acc[XACC], bacc = _mm512_setzero_ps();
    for (int k = 0; k < XACC; k++) acc[k] = _mm512_setzero_ps();
    const char *pf = (const char *)q + PF_BYTES;
    for (int b = 0; b < nb; b++, pf += bb) {
        for (int k = 0; k < 3; k++) _mm_prefetch(pf + 64 * k, _MM_HINT_T0);   /* x_group's prefetch */
        const uint8_t *blk = q + bb * b;
        const __m512i x01 = _mm512_loadu_si512(blk), x23 = _mm512_loadu_si512(blk + 64), *v = xs + 4 * b;
        __m512i lo = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(x01, m4), v[0]);
        __m512i hi = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(_mm512_srli_epi16(x01, 4), m4), v[2]);
        lo = _mm512_dpbusd_epi32(lo, _mm512_and_si512(x23, m4), v[1]);
        hi = _mm512_dpbusd_epi32(hi, _mm512_and_si512(_mm512_srli_epi16(x23, 4), m4), v[3]);
        const __m512i s = _mm512_add_epi32(lo, hi);
        const __m512 dot = _mm512_zextps256_ps512(
            _mm256_cvtepi32_ps(_mm256_add_epi32(_mm512_castsi512_si256(s), _mm512_extracti64x4_epi64(s, 1))));
        const __m512 dw = _mm512_cvtph_ps(_mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)(blk + 128))));
        const __m512 c = type == EL_Q4_1X
                             ? _mm512_cvtph_ps(_mm256_zextsi128_si256(_mm_loadu_si128((const __m128i *)(blk + 144))))
                             : _mm512_mul_ps(dw, _mm512_set1_ps(-8.0f));
        const __m512 dd = _mm512_mul_ps(dw, _mm512_set1_ps(a[b].d));
        const __m512 term = _mm512_fmadd_ps(dot, dd, _mm512_mul_ps(c, _mm512_set1_ps(a[b].s)));
        acc[b % XACC] = _mm512_add_ps(acc[b % XACC], term);
        if (BOUND) bacc = _mm512_fmadd_ps(scale_wmax16(type, dw, c), _mm512_set1_ps(m->bound_v[b]), bacc);
    }
    for (int w = XACC / 2; w; w /= 2)
        for (int k = 0; k < w; k++) acc[k] = _mm512_add_ps(acc[k], acc[k + w]);
    x_store16(m->Y, g, 8, r0, r1, acc[0]);
    if (BOUND) x_store16(m->bound, g, 8, r0, r1, bacc);
}

INLINE void xgemv(int type, const el_mm *m, int r0, int r1, const __m512i *xs, int BOUND) {
    for (int g = r0 & ~7; g < r1; g += 8) x_group1(type, m, g, r0, r1, xs, BOUND);
}

/* ---------------- decode GEMV, row-repacked Q8_0 weights (the output matrix) ---------------- */

/* One activation row as VNNI's signed operand: its blocks' values back to back, and per block 128 sum(a), taken off
 * the dots of w + 128 (AVX-512 has no vpsignb to move w's sign onto a as AVX2 does). Per thread, grown as needed;
 * 0: no memory. */
typedef struct {
    int8_t *qs;
    int32_t *a128;   /* el_ds_blocks(nb) entries, zero past nb */
} act_row;

static int spread_act(const el_block_q8a *a, int nb, act_row *out) {
    static _Thread_local void *buf;
    static _Thread_local int cap;
    const int nbp = el_ds_blocks(nb);
    if (nbp > cap) {
        free(buf);
        buf = aligned_alloc(64, (size_t)nbp * (32 + 4));
        cap = buf ? nbp : 0;
        if (!buf) return 0;
    }
    out->qs = buf, out->a128 = (int32_t *)((int8_t *)buf + (size_t)nbp * 32);
    for (int b = 0; b < nbp; b++) {
        int sum = 0;
        for (int i = 0; i < 32; i++) {
            const int8_t v = b < nb ? a[b].qs[i] : 0;
            out->qs[32 * b + i] = v;
            sum += v;
        }
        out->a128[b] = 128 * sum;
    }
    return 1;
}

/* group_dots (kernels_avx2.c) of a Q8_0R row's blocks b..b+cnt-1 (qs: the row's values) with one act row: lane k,
 * block b + k's exact integer dot (0 past cnt). VNNI sums (w + 128) a per dword, four vectors of two blocks fold into
 * one of eight sums, and 128 sum(a) comes off. */
INLINE __m256i dots8_q8(const uint8_t *qs, const act_row *A, int b, int cnt) {
    __m512i v[4];
    for (int p = 0; p < 4; p++) {
        const __mmask64 in = (2 * p < cnt ? 0xFFFFFFFFull : 0) | (2 * p + 1 < cnt ? 0xFFFFFFFF00000000ull : 0);
        const __m512i w = _mm512_xor_si512(_mm512_maskz_loadu_epi8(in, qs + 32 * (b + 2 * p)), _mm512_set1_epi8((char)0x80));
        v[p] = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_load_si512(A->qs + 32 * (b + 2 * p)));
    }
    const __m512i s01 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[0], v[1]), _mm512_unpackhi_epi32(v[0], v[1]));
    const __m512i s23 = _mm512_add_epi32(_mm512_unpacklo_epi32(v[2], v[3]), _mm512_unpackhi_epi32(v[2], v[3]));
    /* 128-bit chunk c: the sums of chunk c of v[0..3]; a block is two chunks */
    const __m512i r = _mm512_add_epi32(_mm512_unpacklo_epi64(s01, s23), _mm512_unpackhi_epi64(s01, s23));
    const __m512i e = _mm512_add_epi32(_mm512_shuffle_i32x4(r, r, _MM_SHUFFLE(2, 0, 2, 0)),
                                       _mm512_shuffle_i32x4(r, r, _MM_SHUFFLE(3, 1, 3, 1)));
    const __m256i d = _mm256_permutevar8x32_epi32(_mm512_castsi512_si256(e), _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
    return _mm256_maskz_mov_epi32((__mmask8)((1u << cnt) - 1), _mm256_sub_epi32(d, _mm256_loadu_si256((const __m256i *)(A->a128 + b))));
}

/* f16x8 (kernels_avx2.c): v[b..b+cnt-1] as floats, 0 past cnt; a masked load reads nothing past them */
INLINE __m256 f16x8(const uint16_t *v, int b, int cnt) {
    if (cnt == RG) return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i *)(v + b)));
    return _mm256_cvtph_ps(_mm_maskz_loadu_epi16((__mmask8)((1u << cnt) - 1), v + b));
}

/* rrows (kernels_avx2.c) for Q8_0R and one token: each row's lane k takes blocks k, k + 8, ... in order, as rgroup
 * and tail_pairs give them, rows in fours summed by hsum4 and the rest one by one by hsum, as tile_store does */
INLINE void q8r_gemv(const el_mm *m, int r0, int r1, const act_row *A, int BOUND) {
    const int nb = m->cols / EL_QK;
    const size_t rb = m->row_bytes;
    const float *da = m->act_ds;
    const uint8_t *row = m->W + (size_t)r0 * rb;
    for (int r = r0; r < r1;) {
        const int nr = r1 - r < TR ? 1 : TR;
        __m256 acc[TR], bacc[TR];
        for (int i = 0; i < nr; i++, row += rb) {
            for (const char *p = (const char *)row + PF_BYTES, *e = p + rb; p < e; p += 128) {
                _mm_prefetch(p, _MM_HINT_T0);
                _mm_prefetch(p + 64, _MM_HINT_T0);
            }
            const uint16_t *d16 = (const uint16_t *)(row + (size_t)nb * 32);
            acc[i] = bacc[i] = _mm256_setzero_ps();
            for (int b = 0; b < nb; b += RG) {
                const int cnt = nb - b < RG ? nb - b : RG;
                const __m256 dw = f16x8(d16, b, cnt);
                acc[i] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dots8_q8(row, A, b, cnt)), _mm256_mul_ps(dw, _mm256_loadu_ps(da + b)), acc[i]);
                if (BOUND)   /* scale_wmax of Q8_0: 127 |d| */
                    bacc[i] = _mm256_fmadd_ps(_mm256_mul_ps(_mm256_and_ps(dw, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fffffff))), _mm256_set1_ps(127)),
                                              _mm256_loadu_ps(m->bound_v + b), bacc[i]);
            }
            if (BOUND) m->bound[r + i] = hsum(bacc[i]);
        }
        if (nr == TR) _mm_storeu_ps(m->Y + r, hsum4(acc[0], acc[1], acc[2], acc[3]));
        else m->Y[r] = hsum(acc[0]);
        r += nr;
    }
}

static void mm_rows_avx512(const el_mm *m, int r0, int r1) {
    const int bound = m->bound != NULL;   /* a compile-time case each, so the plain product pays nothing for it */
    if (m->wtype == EL_Q8_0R && m->n == 1 && m->planes != 2) {   /* the output matrix's GEMV */
        act_row A;
        if (spread_act(m->act, m->cols / EL_QK, &A)) {
            bound ? q8r_gemv(m, r0, r1, &A, 1) : q8r_gemv(m, r0, r1, &A, 0);
            return;
        }
    }
    /* A decode GEMV over interleaved Q4 weights: one group at a time, its bytes as one stream (x_pair's two streams
     * measured slower for one token); with the one-token step it runs 1-3% faster than AVX2's (docs/PERFORMANCE.md) */
    const __m512i *xs;
    if (m->n == 1 && m->planes != 2 && (m->wtype == EL_Q4_0X || m->wtype == EL_Q4_1X) &&
        (xs = spread_x(m->act, m->cols / EL_QK))) {
        if (m->wtype == EL_Q4_1X) bound ? xgemv(EL_Q4_1X, m, r0, r1, xs, 1) : xgemv(EL_Q4_1X, m, r0, r1, xs, 0);
        else bound ? xgemv(EL_Q4_0X, m, r0, r1, xs, 1) : xgemv(EL_Q4_0X, m, r0, r1, xs, 0);
        return;
    }
    /* Other decode GEMVs (two planes, other weights) take AVX2's kernels */
    if (m->n <= (m->planes == 2 ? 2 : 1)) {
        el_kernels_avx2.mm_rows(m, r0, r1);
        return;
    }
    switch (m->wtype) {
    case EL_Q4_0X: bound ? xmm_rows16(EL_Q4_0X, m, r0, r1, 1) : xmm_rows16(EL_Q4_0X, m, r0, r1, 0); return;
    case EL_Q4_1X: bound ? xmm_rows16(EL_Q4_1X, m, r0, r1, 1) : xmm_rows16(EL_Q4_1X, m, r0, r1, 0); return;
    default: el_kernels_avx2.mm_rows(m, r0, r1);
    }
}

static el_kernels table;
static pthread_once_t table_once = PTHREAD_ONCE_INIT;

static void fill_table(void) {
    table = el_kernels_avx2;
    table.attend_quant = attend_quant_avx512;
    table.mm_rows = mm_rows_avx512;
}

const el_kernels *el_kernels_avx512(void) {
    pthread_once(&table_once, fill_table);
    return &table;
}

#pragma GCC pop_options
#endif
