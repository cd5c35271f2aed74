/* A forward step through every layer in one call: the per-layer calls the Python backend would make
 * (el_attn_in, el_kv_append into the tail block, el_attention, el_attn_out_mlp), with the same numerics,
 * minus ~30 Python round trips per token. */
#include "kernels.h"

#include <stdlib.h>
#include <string.h>

static int tails_have_room(el_kvblock *const *descs, int n_layer, int n_blocks, int n) {
    for (int l = 0; l < n_layer; l++) {
        const el_kvblock *t = &descs[l][n_blocks - 1];
        if (t->dtype != EL_F16 || t->n + n > t->cap) return 0;
    }
    return 1;
}

/* ---------------- one token: every layer in one pool job ----------------
 * A decode token's products are small (0.2-1.1 MB a matrix), and as one pool job each they stream well below what
 * the same threads stream through them with a fixed share each and a barrier between products
 * (bench/stream_sync.py): every job's start, split and end cost, and the serial steps between jobs leave the other
 * threads idle. Here every thread walks all layers: each computes its own rows of every product and everything
 * that depends on those rows alone (RoPE, K/V appends, residual adds, SiLU), and its own copy of what every thread
 * needs whole (the norms, the activations' quantization, the merged attention output); the threads meet at five
 * barriers a layer. Each row is computed as el_forward_layers' per-layer calls compute it (the same kernels on the
 * same 8-row tiles), so the results are theirs bit for bit. */

/* a thread's own buffers: the normed row, the attention output, the activations as 8-bit blocks and their planes */
typedef struct {
    float *h, *att, *ds;
    el_block_q8a *q;
} own_bufs;

typedef struct {
    const el_model *m;
    el_kvblock *const *descs;
    el_kvblock *f16;         /* per layer: the tail as the token's K/V rows go into it, f16 */
    int n_blocks, rotate, seal;   /* seal: the token fills the tails, which the descriptors already describe sealed */
    const float *cs;
    float *x;
    const el_buffers *b;
    int *row;         /* per layer: the tail row the token goes to */
    char *att;        /* per layer: an el_att_plan context, att_bytes apart */
    size_t att_bytes, next;   /* next: el_next_bytes, what fetch_rows takes of a share */
    own_bufs *own;
    el_barrier bar;
} token_job;

/* x (cols floats) as the activations that the count matrices W take: quantized where one is */
static void acts_for(el_weight *const *W, int count, const float *x, int cols, const own_bufs *o) {
    int quant = 0, ds = 0;
    for (int i = 0; i < count; i++) quant |= el_is_quant(W[i]->type), ds |= el_uses_act_ds(W[i]->type);
    if (quant) el_quant_row(x, cols, o->q, ds ? o->ds : NULL);
}

/* rows [r0, r1) of y = w x (acts_for made the activations) */
static void rows_of(const el_weight *w, const float *x, const own_bufs *o, float *y, int r0, int r1) {
    if (r0 >= r1) return;
    const int quant = el_is_quant(w->type);
    const el_mm mm = {w->w, el_row_bytes(w->type, w->cols), w->type, w->rows, w->cols, 1, w->rows,
                      quant ? (const void *)o->q : x, y, 1, o->ds};
    el_kern->mm_rows(&mm, r0, r1);
}

/* thread ith's share of `rows` rows: whole 8-row groups (the kernels' tiles) */
static void share(int rows, int ith, int nth, int *r0, int *r1) {
    const int groups = (rows + 7) / 8;
    *r0 = groups * ith / nth * 8;
    *r1 = groups * (ith + 1) / nth * 8 < rows ? groups * (ith + 1) / nth * 8 : rows;
}

/* thread ith's heads of the QKV product: units 0..H-1 are query heads, H..H+G-1 kv heads (a K and a V head, twice
 * the rows), cut where the rows before reach ith / nth of all */
static int head_cut(int H, int G, int ith, int nth) {
    const int total = H + 2 * G;
    int u = 0;
    while (u < H + G && (u < H ? u : 2 * u - H) * nth < total * ith) u++;
    return u;
}

/* thread ith's query heads [q0, q1) and kv heads [g0, g1) (head_cut) */
static void heads_of(const el_model *m, int ith, int nth, int *q0, int *q1, int *g0, int *g1) {
    const int H = m->n_head, G = m->n_kv_head, u0 = head_cut(H, G, ith, nth), u1 = head_cut(H, G, ith + 1, nth);
    *q0 = u0 < H ? u0 : H, *q1 = u1 < H ? u1 : H, *g0 = u0 > H ? u0 - H : 0, *g1 = u1 > H ? u1 - H : 0;
}

/* The layer's QKV rows of thread ith's heads, RoPE and rotation on them, its kv heads' K/V rows into the f16 tail and,
 * where the token fills it (sealed: the tail's descriptor, already at the quantized rows), those heads' rows
 * quantized there as el_kv_seal does */
static void qkv_heads(const token_job *j, const el_layer_w *L, const el_kvblock *tail, const el_kvblock *sealed,
                      int row, const own_bufs *o, int ith, int nth) {
    const el_model *m = j->m;
    const int hd = m->head_dim;
    int q0, q1, g0, g1;
    heads_of(m, ith, nth, &q0, &q1, &g0, &g1);
    const el_buffers *b = j->b;
    rows_of(L->wq, o->h, o, b->q, q0 * hd, q1 * hd);
    rows_of(L->wk, o->h, o, b->k, g0 * hd, g1 * hd);
    rows_of(L->wv, o->h, o, b->v, g0 * hd, g1 * hd);
    if (j->cs) {
        el_rope_apply(b->q + q0 * hd, 1, q1 - q0, hd, m->rope_dim, j->cs, m->neox);
        el_rope_apply(b->k + g0 * hd, 1, g1 - g0, hd, m->rope_dim, j->cs, m->neox);
    }
    if (j->rotate) el_hadamard(b->q + q0 * hd, q1 - q0, hd);
    for (int g = g0; g < g1; g++) {
        const size_t at = ((size_t)g * tail->cap + row) * hd;
        el_kv_append_head(b->k + g * hd, hd, j->rotate, (uint16_t *)tail->k + at);
        el_kv_append_head(b->v + g * hd, hd, j->rotate, (uint16_t *)tail->v + at);
        if (sealed) el_kv_seal_head(tail, sealed, g, hd);
    }
}

/* The first `bytes` of rows [r0, r1) of w, fetched as the thread goes to wait at a barrier: the kernels prefetch
 * el_pf_bytes ahead of the row in use, so a share's first rows would otherwise come from DRAM on demand. */
static void fetch_rows(const el_weight *w, int r0, int r1, size_t bytes) {
    if (r0 >= r1) return;
    const size_t rb = el_row_bytes(w->type, w->cols), all = (size_t)(r1 - r0) * rb, len = all < bytes ? all : bytes;
    const char *p = (const char *)w->w + (size_t)r0 * rb;
    for (size_t o = 0; o < len; o += 64) __builtin_prefetch(p + o, 0, 3);
}

/* fetch_rows of thread ith's share of w */
static void fetch_share(const el_weight *w, size_t bytes, int ith, int nth) {
    int r0, r1;
    share(w->rows, ith, nth, &r0, &r1);
    fetch_rows(w, r0, r1, bytes);
}

/* rows [r0, r1) of w's product added to x (the residual) */
static void add_rows(const el_weight *w, const float *in, const own_bufs *o, float *tmp, float *x, int ith, int nth) {
    int r0, r1;
    share(w->rows, ith, nth, &r0, &r1);
    rows_of(w, in, o, tmp, r0, r1);
    for (int r = r0; r < r1; r++) x[r] += tmp[r];
}

/* fetch_rows of thread ith's QKV rows in layer L */
static void fetch_qkv(const el_model *m, const el_layer_w *L, size_t bytes, int ith, int nth) {
    int q0, q1, g0, g1;
    heads_of(m, ith, nth, &q0, &q1, &g0, &g1);
    fetch_rows(L->wq, q0 * m->head_dim, q1 * m->head_dim, bytes);
    fetch_rows(L->wk, g0 * m->head_dim, g1 * m->head_dim, bytes);
    fetch_rows(L->wv, g0 * m->head_dim, g1 * m->head_dim, bytes);
}

/* el_step_timing's totals: each thread's seconds in each stage, on its own cache lines */
static struct {
    _Alignas(64) double s[EL_STEP_STAGES];
} stage_s[EL_MAX_THREADS];
static int stage_on, stage_steps;

int el_step_timing(int on, double *out, int max_threads) {
    el_lock();
    for (int t = 0; out && t < max_threads; t++)
        for (int i = 0; i < EL_STEP_STAGES; i++) out[t * EL_STEP_STAGES + i] = t < EL_MAX_THREADS ? stage_s[t].s[i] : 0;
    const int steps = stage_steps;
    memset(stage_s, 0, sizeof stage_s);
    stage_on = on != 0, stage_steps = 0;
    el_unlock();
    return steps;
}

/* With timing on, the time since *t to thread ith's stage i; *t becomes now */
static inline void stage_end(double *t, int ith, int i) {
    if (!stage_on) return;
    const double now = el_now_s();
    stage_s[ith].s[i] += now - *t;
    *t = now;
}

static void token_task(void *p, int ith, int nth) {
    token_job *j = p;
    const el_model *m = j->m;
    const el_buffers *b = j->b;
    const own_bufs *o = &j->own[ith];
    const int dim = m->dim, H = m->n_head, hd = m->head_dim;
    double t = stage_on ? el_now_s() : 0;
    for (int l = 0; l < m->n_layer; l++) {
        const el_layer_w *L = &m->layers[l];
        el_rmsnorm(j->x, L->attn_norm, 1, dim, m->eps, o->h);
        acts_for((el_weight *[]){L->wq, L->wk, L->wv}, 3, o->h, dim, o);
        qkv_heads(j, L, &j->f16[l], j->seal ? &j->descs[l][j->n_blocks - 1] : NULL, j->row[l], o, ith, nth);
        stage_end(&t, ith, 0);
        el_barrier_wait(&j->bar, nth);
        stage_end(&t, ith, 1);
        void *att = j->att + (size_t)l * j->att_bytes;
        el_att_units(att, ith);
        fetch_share(L->wo, j->next, ith, nth);
        stage_end(&t, ith, 2);
        el_barrier_wait(&j->bar, nth);
        stage_end(&t, ith, 3);
        el_att_out(att, o->att);
        if (j->rotate) el_hadamard(o->att, H, hd);
        acts_for(&L->wo, 1, o->att, H * hd, o);
        add_rows(L->wo, o->att, o, b->h, j->x, ith, nth);
        fetch_share(L->gate, j->next, ith, nth);
        fetch_share(L->up, j->next, ith, nth);
        stage_end(&t, ith, 4);
        el_barrier_wait(&j->bar, nth);
        stage_end(&t, ith, 5);
        el_rmsnorm(j->x, L->ffn_norm, 1, dim, m->eps, o->h);
        acts_for((el_weight *[]){L->gate, L->up}, 2, o->h, dim, o);
        int r0, r1;
        share(L->gate->rows, ith, nth, &r0, &r1);
        rows_of(L->gate, o->h, o, b->g, r0, r1);
        rows_of(L->up, o->h, o, b->u, r0, r1);
        el_kern->silu_mul(b->g + r0, b->u + r0, r1 - r0);
        fetch_share(L->down, j->next, ith, nth);
        stage_end(&t, ith, 6);
        el_barrier_wait(&j->bar, nth);
        stage_end(&t, ith, 7);
        acts_for(&L->down, 1, b->g, L->gate->rows, o);
        add_rows(L->down, b->g, o, b->h, j->x, ith, nth);
        if (l + 1 < m->n_layer) fetch_qkv(m, &m->layers[l + 1], j->next, ith, nth);
        stage_end(&t, ith, 8);
        el_barrier_wait(&j->bar, nth);
        stage_end(&t, ith, 9);
    }
    if (stage_on && ith == 0) stage_steps++;
}

/* Whether token_task can take the model: shapes its shares and tiles hold for, activations it can quantize */
static int token_fits(const el_model *m) {
    const int H = m->n_head, G = m->n_kv_head, hd = m->head_dim;
    if (hd % 8 || G <= 0 || H % G) return 0;
    for (int l = 0; l < m->n_layer; l++) {
        const el_layer_w *L = &m->layers[l];
        el_weight *const W[7] = {L->wq, L->wk, L->wv, L->wo, L->gate, L->up, L->down};
        for (int i = 0; i < 7; i++)
            if (el_is_quant(W[i]->type) && W[i]->cols % EL_QK) return 0;
        if (L->wq->rows != H * hd || L->wk->rows != G * hd || L->wv->rows != G * hd || L->wo->rows != m->dim ||
            L->wo->cols != H * hd || L->up->rows != L->gate->rows || L->down->cols != L->gate->rows ||
            L->down->rows != m->dim)
            return 0;
    }
    return 1;
}

/* A thread's own_bufs from base (NULL: none): returns their floats, whole cache lines */
static size_t own_layout(const el_model *m, int n_ff, float *base, own_bufs *o) {
    const int att = m->n_head * m->head_dim, cols = n_ff > m->dim ? (n_ff > att ? n_ff : att) : (m->dim > att ? m->dim : att);
    const int nb = (cols + EL_QK - 1) / EL_QK;
    const size_t q_floats = ((size_t)nb * sizeof(el_block_q8a) + sizeof(float) - 1) / sizeof(float);
    if (base) *o = (own_bufs){.h = base, .att = base + m->dim, .q = (el_block_q8a *)(base + m->dim + att),
                              .ds = base + m->dim + att + q_floats};
    return ((size_t)m->dim + att + q_floats + 2 * (size_t)el_ds_blocks(nb) + 15) / 16 * 16;
}

/* forward_token's part under the lock, for j (its model, caches, buffers and the room for row, att and f16 filled
 * in): each tail's row for the token, its f16 view and the layers' attention plans, then the job */
static int token_locked(token_job *j, const int32_t *pos, const el_kvblock *seal) {
    const el_model *m = j->m;
    const int L = m->n_layer, nth = el_get_threads_locked(), last = j->n_blocks - 1;
    el_kvblock *f16 = j->f16;
    int n_ff = 0;
    for (int l = 0; l < L; l++) {
        const el_layer_w *Lw = &m->layers[l];
        el_weight *const W[7] = {Lw->wq, Lw->wk, Lw->wv, Lw->wo, Lw->gate, Lw->up, Lw->down};
        for (int i = 0; i < 7; i++) el_weight_prepare_locked(W[i]);
        n_ff = Lw->gate->rows > n_ff ? Lw->gate->rows : n_ff;
        f16[l] = j->descs[l][last];
        if (seal && f16[l].n + 1 != f16[l].cap) return -1;   /* a seal table for a token that fills no tail */
    }
    /* the tails take the token's row first, so that each layer's attention plan counts its key; a token that fills
     * them is attended sealed, as the per-layer path attends after el_kv_seal */
    size_t att_floats = 0;
    int planned = 1;
    for (int l = 0; l < L; l++) {
        el_kvblock *tail = &j->descs[l][last];
        j->row[l] = tail->n++;
        if (seal) tail->k = seal[l].k, tail->v = seal[l].v, tail->dtype = seal[l].dtype, tail->cap = seal[l].cap;
        const size_t f = el_att_plan(j->att + l * j->att_bytes, j->b->q, pos, m->n_head, m->n_kv_head, m->head_dim,
                                     m->scale, j->descs[l], j->n_blocks, j->b->att, nth);
        planned &= f > 0;
        att_floats = f > att_floats ? f : att_floats;
    }
    const size_t own = own_layout(m, n_ff, NULL, NULL);
    float *mem = planned ? el_scratch(1, sizeof(float) * att_floats) : NULL;
    float *mine = mem ? el_scratch(2, sizeof(float) * own * nth) : NULL;
    if (!mine) {
        for (int l = 0; l < L; l++) j->descs[l][last] = f16[l];
        return -1;
    }
    own_bufs bufs[nth];
    for (int t = 0; t < nth; t++) own_layout(m, n_ff, mine + own * t, &bufs[t]);
    for (int l = 0; l < L; l++) {
        el_att_bind(j->att + l * j->att_bytes, mem);
        ((int32_t *)f16[l].pos)[j->row[l]] = pos[0];
    }
    j->own = bufs, j->seal = seal != NULL;
    /* alone, a thread's products follow each other with no wait, its prefetch stream running on */
    j->next = nth > 1 ? (size_t)el_next_bytes(-1) : 0;
    el_parallel(token_task, j);
    return 0;
}

/* One token through every layer as token_task (seal: el_forward_layers' table where the token fills the tails):
 * returns 0, or -1 where it cannot take it (the caller then takes the per-layer calls; nothing has changed) */
static int forward_token(const el_model *m, el_kvblock *const *descs, int n_blocks, int rotate, const float *cs,
                         const int32_t *pos, float *x, const el_buffers *b, const el_kvblock *seal) {
    /* el_kv_append's own check: a rotation needs a power-of-2 head_dim */
    if (!token_fits(m) || (rotate && (m->head_dim & (m->head_dim - 1)))) return -1;
    const size_t att_bytes = (el_att_ctx_bytes() + 63) / 64 * 64;
    token_job j = {.m = m, .descs = descs, .n_blocks = n_blocks, .rotate = rotate, .cs = cs, .x = x, .b = b,
                   .att_bytes = att_bytes, .row = malloc(sizeof(int) * m->n_layer),
                   .att = aligned_alloc(64, att_bytes * m->n_layer), .f16 = malloc(sizeof(el_kvblock) * m->n_layer)};
    int rc = -1;
    if (j.row && j.att && j.f16) {
        el_lock();
        rc = token_locked(&j, pos, seal);
        el_unlock();
    }
    free(j.row);
    free(j.att);
    free(j.f16);
    return rc;
}

static int token_step = 1;

int el_token_step(int on) {
    if (on >= 0) token_step = on != 0;
    return token_step;
}

int el_forward_layers(const el_model *m, el_kvblock *const *descs, int n_blocks, int rotate, const int32_t *pos, int n,
                      float *x, const el_buffers *b, const el_kvblock *seal) {
    if (n <= 0 || n_blocks <= 0 || !tails_have_room(descs, m->n_layer, n_blocks, n)) return -1;
    const int H = m->n_head, G = m->n_kv_head, hd = m->head_dim;
    float *cs = NULL;   /* the positions' RoPE table, once for every layer */
    if (el_rope_applies(m->rope_dim, hd) && !(cs = el_rope_table(n, m->rope_dim, pos, m->rope_base))) return -1;
    /* one token: one pool job for all layers */
    if (n == 1 && token_step && !forward_token(m, descs, n_blocks, rotate, cs, pos, x, b, seal)) {
        free(cs);
        return 0;
    }
    for (int l = 0; l < m->n_layer; l++) {
        const el_layer_w *L = &m->layers[l];
        el_attn_in_cs(x, n, m->dim, L->attn_norm, m->eps, L->wq, L->wk, L->wv, cs, H, G, hd, m->rope_dim, m->neox, b->h,
                      b->q, b->k, b->v);
        el_kvblock *tail = &descs[l][n_blocks - 1];
        /* the descriptor's arrays are the cache's own writable tail (KVCache keeps them f16 and current) */
        el_kv_append(b->k, b->v, pos, n, G, hd, rotate, (void *)tail->k, (void *)tail->v, (int32_t *)tail->pos, tail->n,
                     tail->cap);
        tail->n += n;
        if (seal && tail->n == tail->cap) el_kv_seal(tail, &seal[l], G, hd);
        if (rotate) el_hadamard(b->q, (long)n * H, hd);
        el_attention(b->q, n, pos, H, G, hd, m->scale, descs[l], n_blocks, b->att, b->lse);
        if (rotate) el_hadamard(b->att, (long)n * H, hd);
        el_attn_out_mlp(x, b->att, n, m->dim, L->wo, L->ffn_norm, m->eps, L->gate, L->up, L->down, b->h, b->g, b->u);
    }
    free(cs);
    return 0;
}

int el_decode_run(const el_model *m, el_kvblock *const *descs, int n_blocks, int rotate, int32_t pos, int32_t tok,
                  int max_n, const int32_t *stop, int n_stop, el_weight *embd, el_weight *output,
                  const float *out_norm, const uint8_t *rho, const el_sampling *s, uint64_t *state, int32_t *hist,
                  int n_hist, float *x, const el_buffers *b, float *h, float *logits, int32_t *out) {
    /* room for one more than the run feeds: no tail fills */
    if (max_n <= 0 || n_blocks <= 0 || !tails_have_room(descs, m->n_layer, n_blocks, max_n + 1)) return -1;
    /* el_sample's draw is then the argmax, which el_logits_refine finds among the rows it recomputes */
    const int greedy = s->temperature == 0.0f && (s->repeat_penalty == 1.0f || s->repeat_last_n == 0);
    for (int i = 0; i < max_n; i++) {
        el_get_rows(embd->w, embd->type, embd->cols, &tok, 1, x);
        if (el_forward_layers(m, descs, n_blocks, rotate, &pos, 1, x, b, NULL)) return -1;
        el_rmsnorm(x, out_norm, 1, m->dim, m->eps, h);
        el_weight_prepare(output);
        if (el_logits_refine(output, rho, h, logits, greedy ? &tok : NULL) < 0) return -1;
        if (!greedy && (tok = el_sample(s, state, logits, output->rows, hist, n_hist)) < 0) return -1;
        out[i] = hist[n_hist++] = tok;
        pos++;
        for (int j = 0; j < n_stop; j++)
            if (tok == stop[j]) return i + 1;
    }
    return max_n;
}
