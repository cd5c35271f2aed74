/* Attention mass per key: what the KV policies (H2O, SnapKV, InfiniPot's catalyst) score entries by. */
#include "kernels.h"

#include <math.h>
#include <stdatomic.h>
#include <stdlib.h>

typedef struct {
    const float *q;
    const int32_t *q_pos;
    int n_q, n_head, n_kv, hd, gs, reduce_max;
    float scale;
    const el_kvblock *blocks;
    const long *first;        /* global index of each block's first key */
    int n_blocks;
    const float *lse;
    float *out;
    atomic_int next;
} mass_ctx;

/* Keys of block b for kv head g, against every query */
static void mass_unit(mass_ctx *c, int g, int b) {
    const el_kvblock *B = &c->blocks[b];
    const int gs = c->gs, hd = c->hd;
    const size_t rb = el_row_bytes(B->dtype, hd);
    const char *kh = (const char *)B->k + (size_t)g * B->cap * rb;
    float *out = c->out + (size_t)g * c->first[c->n_blocks] + c->first[b];
    float s[EL_KT * 32];   /* up to 32 query heads */
    for (int j = 0; j < B->n; j++) out[j] = 0;
    for (int j0 = 0; j0 < B->n; j0 += EL_KT) {
        int cnt = B->n - j0 < EL_KT ? B->n - j0 : EL_KT;
        for (int i = 0; i < c->n_q; i++) {
            size_t head0 = (size_t)i * c->n_head + (size_t)g * gs;
            const float *q = c->q + head0 * hd;   /* scored as el_attention scores */
            el_kq_keys(B->dtype, kh, rb, j0, cnt, q, gs, hd, c->scale, s);
            for (int h = 0; h < gs; h++) {
                float l = c->lse[head0 + h];
                if (l == -INFINITY) continue;
                for (int t = 0; t < cnt; t++) {
                    if (B->pos[j0 + t] > c->q_pos[i]) continue;   /* causal: this query cannot see the key */
                    float p = expf(s[h * EL_KT + t] - l);
                    float *o = &out[j0 + t];
                    *o = c->reduce_max ? (p > *o ? p : *o) : *o + p;
                }
            }
        }
    }
}

static void mass_task(void *p, int ith, int nth) {
    mass_ctx *c = p;
    (void)ith, (void)nth;
    for (int u; (u = atomic_fetch_add(&c->next, 1)) < c->n_kv * c->n_blocks;) mass_unit(c, u / c->n_blocks, u % c->n_blocks);
}

int el_attention_mass(const float *q, int n_q, const int32_t *q_pos, int n_head, int n_kv_head, int hd, float scale,
                      const el_kvblock *blocks, int n_blocks, const float *lse, int reduce_max, float *out) {
    if (n_q <= 0 || n_kv_head <= 0 || n_head % n_kv_head || n_head / n_kv_head > 32 || hd <= 0 || hd > EL_MAX_HD || hd % EL_QK)
        return -1;
    long *first = malloc(sizeof(long) * (n_blocks + 1));
    if (!first) return -1;
    first[0] = 0;
    for (int b = 0; b < n_blocks; b++) first[b + 1] = first[b] + blocks[b].n;
    mass_ctx c = {.q = q, .q_pos = q_pos, .n_q = n_q, .n_head = n_head, .n_kv = n_kv_head, .hd = hd,
                  .gs = n_head / n_kv_head, .reduce_max = reduce_max, .scale = scale, .blocks = blocks, .first = first,
                  .n_blocks = n_blocks, .lse = lse, .out = out};
    atomic_init(&c.next, 0);
    el_lock();
    el_parallel(mass_task, &c);
    el_unlock();
    free(first);
    return 0;
}
