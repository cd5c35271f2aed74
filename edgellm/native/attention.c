/* Causal attention over a list of K/V blocks with online softmax, reading quantized K/V in place. */
#include "kernels.h"

#include <math.h>
#include <stdatomic.h>
#include <string.h>

#define MAX_GROUP 32     /* query heads per kv head */
#define MAX_HD 512

typedef struct {
    const float *q;
    const int32_t *q_pos;
    int n_head, n_kv, hd, gs;
    float scale;
    const el_kvblock *blocks;
    int n_blocks;
    long chunk_keys;     /* keys per unit */
    int nchunk, n_units;
    atomic_int next;     /* units are taken dynamically: causal prefill units differ in cost */
    float *part;         /* per unit: o[gs][hd] (unnormalized), m[gs], l[gs] */
    float *out, *lse;
} att_ctx;

static size_t part_floats(const att_ctx *c) { return (size_t)c->gs * (c->hd + 2); }

/* Online softmax of the gs heads of kv head g for query i over global keys [k0, k1) */
static void attend_unit(att_ctx *c, int u) {
    const int gs = c->gs, hd = c->hd, nb = hd / EL_QK;
    int chunk = u % c->nchunk, g = u / c->nchunk % c->n_kv, i = u / c->nchunk / c->n_kv;
    long k0 = chunk * c->chunk_keys, k1 = k0 + c->chunk_keys;
    int32_t qp = c->q_pos[i];
    const float *qf = c->q + ((size_t)i * c->n_head + (size_t)g * gs) * hd;
    float *o = c->part + (size_t)u * part_floats(c), *mx = o + (size_t)gs * hd, *l = mx + gs;
    el_block_q8a q8[MAX_GROUP * MAX_HD / EL_QK];
    int have_q8 = 0;
    float s[MAX_GROUP * EL_KT];
    int idx[EL_KT];

    memset(o, 0, sizeof(float) * part_floats(c));
    for (int h = 0; h < gs; h++) mx[h] = -INFINITY;
    long base = 0;
    for (int bi = 0; bi < c->n_blocks && base < k1; base += c->blocks[bi].n, bi++) {
        const el_kvblock *B = &c->blocks[bi];
        long j0 = k0 > base ? k0 - base : 0, j1 = k1 - base < B->n ? k1 - base : B->n;
        if (j0 >= j1) continue;
        int quant = el_is_quant(B->dtype);
        if (quant && !have_q8) {   /* quantize the query once, as the matmul does its activations */
            for (int h = 0; h < gs; h++) el_kern->quant_act(qf + (size_t)h * hd, q8 + h * nb, nb);
            have_q8 = 1;
        }
        size_t rb = el_row_bytes(B->dtype, hd);
        const char *kh = (const char *)B->k + (size_t)g * B->cap * rb, *vh = (const char *)B->v + (size_t)g * B->cap * rb;
        for (long j = j0; j < j1;) {
            int cnt = 0;
            for (; j < j1 && cnt < EL_KT; j++)
                if (B->pos[j] <= qp) idx[cnt++] = (int)j;
            if (!cnt) continue;
            el_kern->kq(B->dtype, kh, rb, idx, cnt, quant ? (const void *)q8 : (const void *)qf, gs, hd, c->scale, s);
            for (int h = 0; h < gs; h++) {
                float m_new = mx[h];
                for (int t = 0; t < cnt; t++) m_new = s[h * EL_KT + t] > m_new ? s[h * EL_KT + t] : m_new;
                if (m_new > mx[h]) {   /* rescale what was accumulated under the old maximum */
                    float f = expf(mx[h] - m_new);
                    for (int d = 0; d < hd; d++) o[(size_t)h * hd + d] *= f;
                    l[h] *= f;
                    mx[h] = m_new;
                }
                l[h] += el_kern->exp_sum(s + h * EL_KT, cnt, mx[h]);
            }
            el_kern->pv(B->dtype, vh, rb, idx, cnt, s, gs, hd, o);
        }
    }
}

static void attend_task(void *p, int ith, int nth) {
    att_ctx *c = p;
    (void)ith, (void)nth;
    for (int u; (u = atomic_fetch_add(&c->next, 1)) < c->n_units;) attend_unit(c, u);
}

/* Merge the key chunks of each (query, kv head) with their lse and normalize. */
static void merge_task(void *p, int ith, int nth) {
    att_ctx *c = p;
    const int gs = c->gs, hd = c->hd, pairs = c->n_units / c->nchunk;
    for (int pi = ith; pi < pairs; pi += nth) {
        int i = pi / c->n_kv, g = pi % c->n_kv;
        const float *base = c->part + (size_t)pi * c->nchunk * part_floats(c);
        for (int h = 0; h < gs; h++) {
            size_t head = (size_t)i * c->n_head + (size_t)g * gs + h;
            float *out = c->out + head * hd, M = -INFINITY, L = 0;
            for (int k = 0; k < c->nchunk; k++) {
                float m = base[k * part_floats(c) + (size_t)gs * hd + h];
                M = m > M ? m : M;
            }
            memset(out, 0, sizeof(float) * hd);
            if (M == -INFINITY) {
                c->lse[head] = -INFINITY;
                continue;
            }
            for (int k = 0; k < c->nchunk; k++) {
                const float *o = base + k * part_floats(c);
                float m = o[(size_t)gs * hd + h];
                if (m == -INFINITY) continue;
                float w = expf(m - M);
                L += w * o[(size_t)gs * hd + gs + h];
                for (int d = 0; d < hd; d++) out[d] += w * o[(size_t)h * hd + d];
            }
            for (int d = 0; d < hd; d++) out[d] /= L;
            c->lse[head] = M + logf(L);
        }
    }
}

void el_attention(const float *q, int n_q, const int32_t *q_pos, int n_head, int n_kv_head, int hd, float scale,
                  const el_kvblock *blocks, int n_blocks, float *out, float *lse) {
    if (n_q <= 0 || n_kv_head <= 0 || n_head % n_kv_head || n_head / n_kv_head > MAX_GROUP || hd <= 0 || hd > MAX_HD) return;
    long total = 0;
    for (int b = 0; b < n_blocks; b++) {
        if (!el_row_bytes(blocks[b].dtype, hd) || (el_is_quant(blocks[b].dtype) && hd % EL_QK)) return;
        total += blocks[b].n;
    }
    el_lock();
    int nth = el_get_threads_locked();
    att_ctx c = {.q = q, .q_pos = q_pos, .n_head = n_head, .n_kv = n_kv_head, .hd = hd, .gs = n_head / n_kv_head,
                 .scale = scale, .blocks = blocks, .n_blocks = n_blocks, .out = out, .lse = lse};
    /* Few (query, kv head) pairs (decode): split the keys too, so every thread streams its share of the cache */
    int pairs = n_q * n_kv_head;
    c.nchunk = pairs >= 4 * nth ? 1 : nth;
    if (c.nchunk > 1 && total < 64L * c.nchunk) c.nchunk = 1;
    c.chunk_keys = total ? (total + c.nchunk - 1) / c.nchunk : 1;
    c.n_units = pairs * c.nchunk;
    c.part = el_scratch(1, sizeof(float) * part_floats(&c) * c.n_units);
    if (c.part) {
        atomic_init(&c.next, 0);
        el_parallel(attend_task, &c);
        el_parallel(merge_task, &c);
    }
    el_unlock();
}
