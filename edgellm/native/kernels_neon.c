/* AArch64 NEON kernels, two tables picked at run time (core.c, getauxval):
 *   el_kernels_neon      baseline ARMv8-A (Pi 4 / Cortex-A72): int8 dots by vmull_s8 / vmlal_s8 + vpadalq_s16
 *   el_kernels_neon_dot  ARMv8.2-A dotprod (Pi 5 / Cortex-A76): int8 dots by vdotq_s32 (SDOT)
 * The library is compiled for baseline aarch64; only the second table's functions are compiled for dotprod
 * (pragma below), so one build runs on both.
 *
 * The file includes itself once per table: the first pass holds what both share (activation quantization,
 * attention K.Q and P.V, exp, silu and helpers), the part under EL_NEON_PASS is compiled twice with a different int8
 * block dot (BLOCK_DOT) and name suffix (SFX). Results match kernels_scalar.c up to float summation order. */
#if defined(__aarch64__)
#ifndef EL_NEON_PASS
#include "kernels.h"

#include <arm_neon.h>
#include <math.h>
#include <stdlib.h>
#include <string.h>

#define INLINE static inline __attribute__((always_inline))

INLINE float f16(uint16_t h) {
    __fp16 x;   /* fcvt: exact, subnormals included */
    memcpy(&x, &h, 2);
    return (float)x;
}

INLINE float rd_f16(const uint8_t *p) {
    uint16_t h;
    memcpy(&h, p, 2);
    return f16(h);
}

/* ---------------- activation quantization ---------------- */

static void quant_act_neon(const float *x, el_block_q8a *y, int nb) {
    for (int b = 0; b < nb; b++, x += EL_QK, y++) {
        float32x4_t v[8], mx = vdupq_n_f32(0);
        for (int k = 0; k < 8; k++) {
            v[k] = vld1q_f32(x + 4 * k);
            mx = vmaxnmq_f32(mx, vabsq_f32(v[k]));   /* maxnm ignores NaN, like fmaxf */
        }
        float amax = vmaxnmvq_f32(mx);
        float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        int32x4_t q[8], s = vdupq_n_s32(0);
        for (int k = 0; k < 8; k++) {
            q[k] = vcvtnq_s32_f32(vmulq_n_f32(v[k], id));   /* half to even, like nearbyintf */
            s = vaddq_s32(s, q[k]);
        }
        for (int k = 0; k < 2; k++) {
            int16x8_t lo = vcombine_s16(vqmovn_s32(q[4 * k]), vqmovn_s32(q[4 * k + 1]));
            int16x8_t hi = vcombine_s16(vqmovn_s32(q[4 * k + 2]), vqmovn_s32(q[4 * k + 3]));
            vst1q_s8(y->qs + 16 * k, vcombine_s8(vqmovn_s16(lo), vqmovn_s16(hi)));
        }
        y->d = d;
        y->s = d * (float)vaddvq_s32(s);
    }
}

/* ---------------- weight blocks ---------------- */

INLINE size_t block_bytes(int type) {
    return type == EL_Q8_0 ? sizeof(el_block_q8_0) : type == EL_Q4_1 ? sizeof(el_block_q4_1) : sizeof(el_block_q4_0);
}

/* The 32 weights of a block as bytes, elements 0..15 in w[0] and 16..31 in w[1]: unsigned nibbles (0..15) for
 * Q4_0 / Q4_1 (the -8 offset and the min are added through the activation block sum), signed for Q8_0. */
INLINE void load_w(int type, const uint8_t *blk, int8x16_t w[2]) {
    if (type == EL_Q8_0) {
        w[0] = vld1q_s8((const int8_t *)blk + 2);
        w[1] = vld1q_s8((const int8_t *)blk + 18);
        return;
    }
    uint8x16_t x = vld1q_u8(blk + (type == EL_Q4_1 ? 4 : 2));
    w[0] = vreinterpretq_s8_u8(vandq_u8(x, vdupq_n_u8(0x0F)));
    w[1] = vreinterpretq_s8_u8(vshrq_n_u8(x, 4));
}

/* block value = d_w d_a (w.a) + c s_a, with c = m (Q4_1), -8 d_w (Q4_0), 0 (Q8_0) */
INLINE float block_c(int type, const uint8_t *blk) {
    return type == EL_Q4_1 ? rd_f16(blk + 2) : type == EL_Q4_0 ? -8.0f * rd_f16(blk) : 0.0f;
}

/* Without dotprod: |w| <= 128 and |a| <= 127 (quant_act's range), so the sum of two products fits int16
 * (2 * 128 * 127 = 32512): one vmull + one vmlal per 8 lanes, then one pairwise widening add into int32. */
INLINE int32x4_t block_dot_mull(int32x4_t acc, const int8x16_t w[2], const int8x16_t a[2]) {
    int16x8_t p0 = vmlal_s8(vmull_s8(vget_low_s8(w[0]), vget_low_s8(a[0])), vget_low_s8(w[1]), vget_low_s8(a[1]));
    int16x8_t p1 = vmlal_high_s8(vmull_high_s8(w[0], a[0]), w[1], a[1]);
    return vpadalq_s16(vpadalq_s16(acc, p0), p1);
}

/* [sum a, sum b, sum c, sum d] */
INLINE float32x4_t hsum4(float32x4_t a, float32x4_t b, float32x4_t c, float32x4_t d) {
    return vpaddq_f32(vpaddq_f32(a, b), vpaddq_f32(c, d));
}

/* 4 floats of a F16 / F32 row from element c */
INLINE float32x4_t load4(int type, const void *p, int c) {
    return type == EL_F16 ? vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16((const uint16_t *)p + c)))
                          : vld1q_f32((const float *)p + c);
}

/* sum of row[c] x[c]; F16 / F32 rows */
INLINE float fdot(int type, const void *row, const float *x, int n) {
    float32x4_t acc[4] = {vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0)};
    int c = 0;
    for (; c + 16 <= n; c += 16)
        for (int k = 0; k < 4; k++) acc[k] = vfmaq_f32(acc[k], load4(type, row, c + 4 * k), vld1q_f32(x + c + 4 * k));
    for (; c + 4 <= n; c += 4) acc[0] = vfmaq_f32(acc[0], load4(type, row, c), vld1q_f32(x + c));
    float s = vaddvq_f32(vaddq_f32(vaddq_f32(acc[0], acc[1]), vaddq_f32(acc[2], acc[3])));
    for (; c < n; c++) s += (type == EL_F16 ? f16(((const uint16_t *)row)[c]) : ((const float *)row)[c]) * x[c];
    return s;
}

static void fmm_rows(const el_mm *m, int r0, int r1) {   /* F16 / F32 weights: off the model's hot path */
    for (int r = r0; r < r1; r++)
        for (int t = 0; t < m->n; t++) {
            const uint8_t *row = m->W + (size_t)r * m->row_bytes;
            const float *x = (const float *)m->act + (size_t)t * m->cols;
            m->Y[(size_t)t * m->ldy + r] = m->wtype == EL_F16 ? fdot(EL_F16, row, x, m->cols) : fdot(EL_F32, row, x, m->cols);
        }
}

#define TR 4    /* rows per tile */
#define TT 2    /* tokens per tile (the two planes of one token when planes == 2) */
#define TC 64   /* tokens per chunk: the chunk's activations stay in cache while all row tiles pass over them */

/* Per-thread buffer for the tile scales (2 * TR floats per block), grown as needed; NULL when out of memory. */
static float *scales_buf(int nb) {
    static _Thread_local float *sc;
    static _Thread_local int sc_blocks;
    if (nb > sc_blocks) {
        free(sc);
        sc = malloc(sizeof(float) * 2 * TR * (size_t)nb);
        sc_blocks = sc ? nb : 0;
    }
    return sc;
}

/* Per-block scales of NR rows, converted once per (row tile, token chunk): sc[b*NR + r] = d, sc[(nb + b)*NR + r] = c */
INLINE void tile_scales(int type, const el_mm *m, int r, int NR, int nb, float *sc) {
    const size_t bb = block_bytes(type);
    for (int i = 0; i < NR; i++) {
        const uint8_t *row = m->W + (size_t)(r + i) * m->row_bytes;
        for (int b = 0; b < nb; b++) {
            sc[b * NR + i] = rd_f16(row + b * bb);
            sc[(nb + b) * NR + i] = block_c(type, row + b * bb);
        }
    }
}

/* ---------------- attention: K.Q and P.V (no int8 dots, shared by both tables) ---------------- */

/* A V row as hd floats (hd % 16 == 0) */
INLINE void v_row(int type, const uint8_t *row, int hd, float *out) {
    if (type == EL_F32) {
        memcpy(out, row, (size_t)hd * 4);
        return;
    }
    if (type == EL_F16) {
        for (int c = 0; c < hd; c += 4) vst1q_f32(out + c, load4(EL_F16, row, c));
        return;
    }
    const size_t bb = block_bytes(type);
    for (int b = 0; b < hd / EL_QK; b++, out += EL_QK) {
        const uint8_t *blk = row + b * bb;
        float d = rd_f16(blk);
        int8x16_t q[2];
        if (type == EL_Q8_0) {
            q[0] = vld1q_s8((const int8_t *)blk + 2);
            q[1] = vld1q_s8((const int8_t *)blk + 18);
        } else {   /* Q4_0: low nibbles are elements 0..15, high nibbles 16..31; value (q - 8) d */
            uint8x16_t x = vld1q_u8(blk + 2);
            q[0] = vsubq_s8(vreinterpretq_s8_u8(vandq_u8(x, vdupq_n_u8(0x0F))), vdupq_n_s8(8));
            q[1] = vsubq_s8(vreinterpretq_s8_u8(vshrq_n_u8(x, 4)), vdupq_n_s8(8));
        }
        for (int k = 0; k < 2; k++) {
            int16x8_t lo = vmovl_s8(vget_low_s8(q[k])), hi = vmovl_high_s8(q[k]);
            float *o = out + 16 * k;
            vst1q_f32(o, vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(lo))), d));
            vst1q_f32(o + 4, vmulq_n_f32(vcvtq_f32_s32(vmovl_high_s16(lo)), d));
            vst1q_f32(o + 8, vmulq_n_f32(vcvtq_f32_s32(vmovl_s16(vget_low_s16(hi))), d));
            vst1q_f32(o + 12, vmulq_n_f32(vcvtq_f32_s32(vmovl_high_s16(hi)), d));
        }
    }
}

static void pv_neon(int type, const char *v, size_t rb, const int *idx, int cnt, const float *p, int gs, int hd, float *o) {
    if (hd % 16 || hd > EL_MAX_HD) {
        el_kernels_scalar.pv(type, v, rb, idx, cnt, p, gs, hd, o);
        return;
    }
    float row[EL_MAX_HD];
    for (int t = 0; t < cnt; t++) {
        v_row(type, (const uint8_t *)v + idx[t] * rb, hd, row);
        for (int h = 0; h < gs; h++) {
            float ph = p[h * EL_KT + t];
            float *oh = o + (size_t)h * hd;
            for (int c = 0; c < hd; c += 16)
                for (int k = 0; k < 4; k++)
                    vst1q_f32(oh + c + 4 * k, vfmaq_n_f32(vld1q_f32(oh + c + 4 * k), vld1q_f32(row + c + 4 * k), ph));
        }
    }
}

/* s[h * EL_KT + t] = scale * q_h . k_t (F16 / F32 keys: quantized ones are grouped, el_kq_grouped scores them) */
static void kq_neon(int type, const char *k, size_t rb, const int *idx, int cnt, const float *q, int gs, int hd, float scale,
                    float *s) {
    if (hd % 16 || hd > EL_MAX_HD) {
        el_kernels_scalar.kq(type, k, rb, idx, cnt, q, gs, hd, scale, s);
        return;
    }
    for (int t = 0; t < cnt; t++) {
        const uint8_t *key = (const uint8_t *)k + idx[t] * rb;
        for (int h = 0; h < gs; h++) s[h * EL_KT + t] = scale * fdot(type, key, q + (size_t)h * hd, hd);
    }
}

/* ---------------- exp ---------------- */

/* e^x = 2^n e^r, |r| <= ln2/2, Cephes expf polynomial (~1 ulp); inputs clamped so 2^n stays a normal float
 * (the same function as the AVX2 exp8) */
INLINE float32x4_t exp4(float32x4_t x) {
    x = vminq_f32(vmaxq_f32(x, vdupq_n_f32(-87.33654f)), vdupq_n_f32(88.3762626647949f));
    float32x4_t n = vrndnq_f32(vmulq_n_f32(x, 1.44269504088896341f));
    float32x4_t r = vfmsq_f32(x, n, vdupq_n_f32(0.693359375f));
    r = vfmsq_f32(r, n, vdupq_n_f32(-2.12194440e-4f));
    float32x4_t p = vdupq_n_f32(1.9875691500E-4f);
    p = vfmaq_f32(vdupq_n_f32(1.3981999507E-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(8.3334519073E-3f), p, r);
    p = vfmaq_f32(vdupq_n_f32(4.1665795894E-2f), p, r);
    p = vfmaq_f32(vdupq_n_f32(1.6666665459E-1f), p, r);
    p = vfmaq_f32(vdupq_n_f32(5.0000001201E-1f), p, r);
    p = vfmaq_f32(vaddq_f32(r, vdupq_n_f32(1.0f)), p, vmulq_f32(r, r));
    int32x4_t e = vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23);
    return vmulq_f32(p, vreinterpretq_f32_s32(e));
}

/* exp4 that returns 0 where e^x underflows (x = -inf for masked keys; NaN too) */
INLINE float32x4_t exp4z(float32x4_t x) {
    return vreinterpretq_f32_u32(vandq_u32(vreinterpretq_u32_f32(exp4(x)), vcgeq_f32(x, vdupq_n_f32(-87.33654f))));
}

static float exp_sum_neon(float *x, int n, float sub) {
    float32x4_t vs = vdupq_n_f32(sub), acc = vdupq_n_f32(0);
    int i = 0;
    for (; i + 4 <= n; i += 4) {
        float32x4_t e = exp4z(vsubq_f32(vld1q_f32(x + i), vs));
        vst1q_f32(x + i, e);
        acc = vaddq_f32(acc, e);
    }
    if (i < n) {   /* the tail as one vector padded with -inf: every value is exp4z's wherever it lies */
        float t[4];
        for (int j = 0; j < 4; j++) t[j] = i + j < n ? x[i + j] : -INFINITY;
        float32x4_t e = exp4z(vsubq_f32(vld1q_f32(t), vs));
        vst1q_f32(t, e);
        for (int j = 0; i + j < n; j++) x[i + j] = t[j];
        acc = vaddq_f32(acc, e);
    }
    return vaddvq_f32(acc);
}

static void silu_mul_neon(float *g, const float *u, long n) {
    long i = 0;
    for (; i + 4 <= n; i += 4) {
        float32x4_t x = vld1q_f32(g + i);
        float32x4_t den = vaddq_f32(vdupq_n_f32(1.0f), exp4(vnegq_f32(x)));
        vst1q_f32(g + i, vmulq_f32(vdivq_f32(x, den), vld1q_f32(u + i)));
    }
    for (; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

/* max(m, x[0..n)): maxnm, like the portable loop, passes over a NaN score */
static float max_neon(const float *x, int n, float m) {
    float32x4_t acc = vdupq_n_f32(m);
    int i = 0;
    for (; i + 4 <= n; i += 4) acc = vmaxnmq_f32(vld1q_f32(x + i), acc);
    float r = vmaxnmvq_f32(acc);
    for (; i < n; i++) r = x[i] > r ? x[i] : r;
    return r;
}

/* FCVTN rounds to nearest even as el_f32_to_f16 does; from the first group of 4 holding a NaN on, the scalar path
 * (it drops a NaN's payload, which the instruction would keep part of) */
static void to_f16_row_neon(const float *x, uint16_t *y, long n) {
    long i = 0;
    for (; i + 4 <= n; i += 4) {
        const float32x4_t v = vld1q_f32(x + i);
        if (vminvq_u32(vceqq_f32(v, v)) == 0) break;
        vst1_u16(y + i, vreinterpret_u16_f16(vcvt_f16_f32(v)));
    }
    for (; i < n; i++) y[i] = el_f32_to_f16(x[i]);
}

/* ---------------- the int8 kernels, once per table ---------------- */

#define EL_NEON_PASS 1
#define SFX(name) name##_neon
#define BLOCK_DOT block_dot_mull
#include "kernels_neon.c"   /* this file, second part */
#undef SFX
#undef BLOCK_DOT
#undef EL_NEON_PASS

#pragma GCC push_options
#pragma GCC target("arch=armv8.2-a+dotprod")
/* SDOT: each lane sums 4 products */
INLINE int32x4_t block_dot_sdot(int32x4_t acc, const int8x16_t w[2], const int8x16_t a[2]) {
    return vdotq_s32(vdotq_s32(acc, w[0], a[0]), w[1], a[1]);
}
#define EL_NEON_PASS 2
#define SFX(name) name##_neon_dot
#define BLOCK_DOT block_dot_sdot
#include "kernels_neon.c"   /* this file, second part */
#pragma GCC pop_options

/* optional entries left out are NULL (the callers then use the generic path) */
const el_kernels el_kernels_neon = {
    .quant_act = quant_act_neon, .mm_rows = mm_rows_neon, .kq = kq_neon, .pv = pv_neon,
    .exp_sum = exp_sum_neon, .silu_mul = silu_mul_neon, .max = max_neon, .to_f16_row = to_f16_row_neon,
};

const el_kernels el_kernels_neon_dot = {
    .quant_act = quant_act_neon, .mm_rows = mm_rows_neon_dot, .kq = kq_neon, .pv = pv_neon,
    .exp_sum = exp_sum_neon, .silu_mul = silu_mul_neon, .max = max_neon, .to_f16_row = to_f16_row_neon,
};

#else /* EL_NEON_PASS: the part compiled once per int8 dot */

/* Y for rows r..r+NR-1 x tokens t..t+NT-1: each unpacked weight block feeds NT tokens, each activation block NR rows */
INLINE void SFX(tile)(int type, const el_mm *m, int r, int t, int NR, int NT, int nb, const float *sc) {
    const size_t bb = block_bytes(type);
    const el_block_q8a *act = (const el_block_q8a *)m->act + (size_t)t * nb;
    const uint8_t *row = m->W + (size_t)r * m->row_bytes;
    float32x4_t acc[TR][TT];
    float32x4_t cacc[TT];   /* sum_b c[r] s_a, 4 rows per vector (NR == 4) */
    float cs[TR][TT];       /* same, scalar (NR < 4) */
    for (int i = 0; i < NR; i++)
        for (int j = 0; j < NT; j++) acc[i][j] = vdupq_n_f32(0), cs[i][j] = 0;
    for (int j = 0; j < NT; j++) cacc[j] = vdupq_n_f32(0);
    for (int b = 0; b < nb; b++) {
        int8x16_t a[TT][2];
        float da[TT];
        for (int j = 0; j < NT; j++) {
            const el_block_q8a *ab = act + (size_t)j * nb + b;
            a[j][0] = vld1q_s8(ab->qs);
            a[j][1] = vld1q_s8(ab->qs + 16);
            da[j] = ab->d;
        }
        for (int i = 0; i < NR; i++) {
            int8x16_t w[2];
            load_w(type, row + i * m->row_bytes + b * bb, w);
            float dw = sc[b * NR + i];
            for (int j = 0; j < NT; j++)
                acc[i][j] = vfmaq_n_f32(acc[i][j], vcvtq_f32_s32(BLOCK_DOT(vdupq_n_s32(0), w, a[j])), dw * da[j]);
        }
        if (type == EL_Q8_0) continue;
        for (int j = 0; j < NT; j++) {
            float s = act[(size_t)j * nb + b].s;
            if (NR == TR) cacc[j] = vfmaq_n_f32(cacc[j], vld1q_f32(sc + (nb + b) * NR), s);
            else
                for (int i = 0; i < NR; i++) cs[i][j] += sc[(nb + b) * NR + i] * s;
        }
    }
    if (NT == 2 && m->planes == 2) {   /* the high and residual planes of token t/2 */
        for (int i = 0; i < NR; i++) acc[i][0] = vaddq_f32(acc[i][0], acc[i][1]), cs[i][0] += cs[i][1];
        cacc[0] = vaddq_f32(cacc[0], cacc[1]);
        t /= 2, NT = 1;
    }
    for (int j = 0; j < NT; j++) {
        float *y = m->Y + (size_t)(t + j) * m->ldy + r;
        if (NR == TR) vst1q_f32(y, vaddq_f32(hsum4(acc[0][j], acc[1][j], acc[2][j], acc[3][j]), cacc[j]));
        else
            for (int i = 0; i < NR; i++) y[i] = vaddvq_f32(acc[i][j]) + cs[i][j];
    }
}

INLINE void SFX(qmm_rows)(int type, const el_mm *m, int r0, int r1, float *sc) {
    const int nb = m->cols / EL_QK;
    for (int t0 = 0; t0 < m->n; t0 += TC) {
        int t1 = t0 + TC < m->n ? t0 + TC : m->n;
        int r = r0;
        for (; r + TR <= r1; r += TR) {
            tile_scales(type, m, r, TR, nb, sc);
            int t = t0;
            for (; t + TT <= t1; t += TT) SFX(tile)(type, m, r, t, TR, TT, nb, sc);
            if (t < t1) SFX(tile)(type, m, r, t, TR, 1, nb, sc);
        }
        for (; r < r1; r++) {
            tile_scales(type, m, r, 1, nb, sc);
            int t = t0;
            for (; t + TT <= t1; t += TT) SFX(tile)(type, m, r, t, 1, TT, nb, sc);
            if (t < t1) SFX(tile)(type, m, r, t, 1, 1, nb, sc);
        }
    }
}

static void SFX(mm_rows)(const el_mm *m, int r0, int r1) {
    if (!el_is_quant(m->wtype)) {
        fmm_rows(m, r0, r1);
        return;
    }
    float *sc = scales_buf(m->cols / EL_QK);
    if (!sc || el_is_repacked(m->wtype)) {   /* repacked: el_repack leaves weights alone on NEON, unless switched */
        el_kernels_scalar.mm_rows(m, r0, r1);
        return;
    }
    switch (m->wtype) {
    case EL_Q4_0: SFX(qmm_rows)(EL_Q4_0, m, r0, r1, sc); break;
    case EL_Q4_1: SFX(qmm_rows)(EL_Q4_1, m, r0, r1, sc); break;
    case EL_Q8_0: SFX(qmm_rows)(EL_Q8_0, m, r0, r1, sc); break;
    }
    if (m->bound) el_row_bounds(m, r0, r1, m->bound_v, m->bound);
}

#endif /* EL_NEON_PASS */
#endif /* __aarch64__ */
