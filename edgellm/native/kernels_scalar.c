/* Portable scalar kernels: the reference every SIMD table is tested against, and the fallback. */
#include "kernels.h"

#include <math.h>

static void quant_act_scalar(const float *x, el_block_q8a *y, int nb) {
    for (int b = 0; b < nb; b++, x += EL_QK, y++) {
        float amax = 0;
        for (int j = 0; j < EL_QK; j++) amax = fmaxf(amax, fabsf(x[j]));
        float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
        int sum = 0;
        for (int j = 0; j < EL_QK; j++) {
            int q = (int)nearbyintf(x[j] * id);   /* half to even, like cvtps2dq / vcvtnq */
            y->qs[j] = (int8_t)q;
            sum += q;
        }
        y->d = d;
        y->s = d * (float)sum;
    }
}

/* row r of W (rows of rb bytes) . act */
static float dot_scalar(int type, const uint8_t *W, size_t rb, long r, const void *act, int cols) {
    const el_block_q8a *a = act;
    const void *row = W + (size_t)r * rb;
    float acc = 0;
    if (el_is_repacked(type)) {   /* block by block through its GGUF form */
        uint8_t blk[sizeof(el_block_q8_0)];
        for (int b = 0; b < cols / EL_QK; b++) {
            el_unpack_block(W, type, rb, r, cols / EL_QK, b, blk);
            acc += dot_scalar(el_base_type(type), blk, 0, 0, a + b, EL_QK);
        }
        return acc;
    }
    switch (type) {
    case EL_F32:
        for (int c = 0; c < cols; c++) acc += ((const float *)row)[c] * ((const float *)act)[c];
        break;
    case EL_F16:
        for (int c = 0; c < cols; c++) acc += el_f16_to_f32(((const uint16_t *)row)[c]) * ((const float *)act)[c];
        break;
    case EL_Q8_0:
        for (int b = 0; b < cols / EL_QK; b++) {
            const el_block_q8_0 *w = (const el_block_q8_0 *)row + b;
            int s = 0;
            for (int j = 0; j < 32; j++) s += w->qs[j] * a[b].qs[j];
            acc += el_f16_to_f32(w->d) * a[b].d * (float)s;
        }
        break;
    case EL_Q4_0:
        for (int b = 0; b < cols / EL_QK; b++) {
            const el_block_q4_0 *w = (const el_block_q4_0 *)row + b;
            int s = 0;
            for (int j = 0; j < 16; j++) s += (w->qs[j] & 15) * a[b].qs[j] + (w->qs[j] >> 4) * a[b].qs[j + 16];
            float d = el_f16_to_f32(w->d);   /* sum (q-8) d a = d (sum q a) - 8 d s */
            acc += d * a[b].d * (float)s - 8.0f * d * a[b].s;
        }
        break;
    case EL_Q4_1:
        for (int b = 0; b < cols / EL_QK; b++) {
            const el_block_q4_1 *w = (const el_block_q4_1 *)row + b;
            int s = 0;
            for (int j = 0; j < 16; j++) s += (w->qs[j] & 15) * a[b].qs[j] + (w->qs[j] >> 4) * a[b].qs[j + 16];
            acc += el_f16_to_f32(w->d) * a[b].d * (float)s + el_f16_to_f32(w->m) * a[b].s;
        }
        break;
    }
    return acc;
}

static void mm_rows_scalar(const el_mm *m, int r0, int r1) {
    size_t act_stride = el_is_quant(m->wtype) ? (size_t)(m->cols / EL_QK) * sizeof(el_block_q8a) : (size_t)m->cols * 4;
    for (int r = r0; r < r1; r++)
        for (int t = 0; t < m->n; t += m->planes) {   /* planes of one token are summed */
            float y = 0;
            for (int p = 0; p < m->planes; p++)
                y += dot_scalar(m->wtype, m->W, m->row_bytes, r, (const char *)m->act + (t + p) * act_stride, m->cols);
            m->Y[(size_t)(t / m->planes) * m->ldy + r] = y;
        }
    if (m->bound) el_row_bounds(m, r0, r1, m->bound_v, m->bound);
}

static void kq_scalar(int type, const char *k, size_t rb, const int *idx, int cnt, const float *q, int gs, int hd, float scale,
                      float *s) {
    float row[EL_MAX_HD];   /* checked by el_attention / el_attention_mass */
    for (int t = 0; t < cnt; t++) {
        el_dequantize_row(k + idx[t] * rb, row, hd, type);   /* the F16 / F32 key as f32 */
        for (int h = 0; h < gs; h++) {
            double acc = 0;   /* the portable path sums exactly enough to serve as the SIMD tables' reference */
            for (int c = 0; c < hd; c++) acc += (double)row[c] * q[(size_t)h * hd + c];
            s[h * EL_KT + t] = scale * (float)acc;
        }
    }
}

static void pv_scalar(int type, const char *v, size_t rb, const int *idx, int cnt, const float *p, int gs, int hd, float *o) {
    float row[EL_MAX_HD];   /* checked by el_attention / el_attention_mass */
    for (int t = 0; t < cnt; t++) {
        el_dequantize_row(v + idx[t] * rb, row, hd, type);
        for (int h = 0; h < gs; h++)
            for (int c = 0; c < hd; c++) o[(size_t)h * hd + c] += p[h * EL_KT + t] * row[c];
    }
}

static float exp_sum_scalar(float *x, int n, float sub) {
    float s = 0;
    for (int i = 0; i < n; i++) s += x[i] = expf(x[i] - sub);
    return s;
}

static void silu_mul_scalar(float *g, const float *u, long n) {
    for (long i = 0; i < n; i++) g[i] = g[i] / (1.0f + expf(-g[i])) * u[i];
}

const el_kernels el_kernels_scalar = {
    quant_act_scalar, mm_rows_scalar, kq_scalar, pv_scalar, exp_sum_scalar, silu_mul_scalar,
};
