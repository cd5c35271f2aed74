/* Causal attention over a list of K/V blocks with online softmax, reading quantized K/V in place.
 *
 * A work unit is (query tile, kv head, key chunk). Its rows are the tile's queries times the kv head's group of
 * query heads, so every K/V tile loaded serves all of them (GQA sharing, flash-attention style query tiles in
 * prefill). Decode has one query: the keys are split into chunks instead, merged by their lse afterwards. */
#include "kernels.h"

#include <math.h>
#include <stdatomic.h>
#include <stdint.h>
#include <string.h>

#define MAX_GROUP 32     /* query heads per kv head */
#define TILE_ROWS 24     /* target rows per unit: enough reuse per K/V load, the row state stays in L1 */

typedef struct {
    const float *q;
    const int32_t *q_pos;
    int n_q, n_head, n_kv, hd, gs;
    float scale;
    const el_kvblock *blocks;
    int n_blocks, lanes;   /* lanes: every unit takes attend_lanes (no quantized block) */
    int kt;              /* keys per tile: EL_LANES_KT with lanes, else EL_KT */
    int qt, n_qt;        /* queries per tile, tiles */
    long chunk_keys;     /* keys per chunk (a multiple of EL_KT, so tiles stay whole) */
    int nchunk, n_units, nth;
    atomic_int next;     /* units are taken dynamically: causal prefill units differ in cost */
    float *part;         /* nchunk > 1: per unit o[rows][hd] (unnormalized), m[rows], l[rows] */
    float *ws;           /* per-thread workspace */
    size_t ws_floats;
    float *out, *lse;
} att_ctx;

static int max_rows(const att_ctx *c) { return c->qt * c->gs; }
/* The rows [j0, j1) of block B that fall in the global key range [k0, k1) (B's first key is number `base`),
 * and kv head g's K and V rows (rb bytes each) */
static inline void block_slice(const el_kvblock *B, int g, int hd, long base, long k0, long k1, long *j0, long *j1,
                               size_t *rb, const char **kh, const char **vh) {
    *j0 = k0 > base ? k0 - base : 0;
    *j1 = k1 - base < B->n ? k1 - base : B->n;
    *rb = el_row_bytes(B->dtype, hd);
    *kh = (const char *)B->k + (size_t)g * B->cap * *rb;
    *vh = (const char *)B->v + (size_t)g * B->cap * *rb;
}

/* Kv head g's rows of block B (first key number base) among the keys [from, to), one tile at most: bytes of K and of
 * V (0: none), from *nk and *nv */
static size_t tile_at(const att_ctx *c, int g, const el_kvblock *B, long base, long from, long to, const char **nk,
                      const char **nv) {
    long j0, j1;
    size_t rb;
    block_slice(B, g, c->hd, base, from, to, &j0, &j1, &rb, nk, nv);
    if (j1 <= j0) return 0;
    *nk += j0 * rb, *nv += j0 * rb;
    return (size_t)(j1 - j0 < c->kt ? j1 - j0 : c->kt) * rb;
}

/* The first tile of unit v (0: none), as tile_at gives it */
static size_t unit_first_tile(const att_ctx *c, int v, const char **nk, const char **nv) {
    if (v >= c->n_units) return 0;
    const long k0 = v % c->nchunk * c->chunk_keys;
    long base = 0;
    for (int bi = 0; bi < c->n_blocks; base += c->blocks[bi].n, bi++)
        if (k0 < base + c->blocks[bi].n) return tile_at(c, v / c->nchunk % c->n_kv, &c->blocks[bi], base, k0, k0 + c->chunk_keys, nk, nv);
    return 0;
}

/* What the kernels prefetch while the tile at row j of block bi computes (unit u, kv head g; base: the block's first
 * key number, j1: the unit's end in the block, k1: its last key + 1): the unit's next tile, or after its last one
 * the first of unit u + threads (the one a thread takes next when units cost alike, as in decode). Bytes of K and of
 * V (0: none), from *nk and *nv. A head's rows in a block are a few KB, too short a stream for the hardware
 * prefetcher to run ahead of a cold cache (decode reads every layer's K/V from DRAM). */
static size_t next_tile(const att_ctx *c, int u, int g, int bi, long j, long j1, long base, long k1, const char **nk,
                        const char **nv) {
    if (j + c->kt < j1) return tile_at(c, g, &c->blocks[bi], base, base + j + c->kt, k1, nk, nv);
    base += c->blocks[bi].n;
    if (++bi >= c->n_blocks || base >= k1) return unit_first_tile(c, u + c->nth, nk, nv);
    return tile_at(c, g, &c->blocks[bi], base, base, k1, nk, nv);
}

/* Smallest and largest position of a key tile: decides whether the tile is skipped, masked or fully visible */
static inline void pos_span(const int32_t *pos, int cnt, int32_t *pmin, int32_t *pmax) {
    int32_t lo = pos[0], hi = pos[0];   /* locals, not *pmin / *pmax: the loop then vectorizes */
    for (int t = 1; t < cnt; t++) lo = pos[t] < lo ? pos[t] : lo, hi = pos[t] > hi ? pos[t] : hi;
    *pmin = lo, *pmax = hi;
}

/* A unit's key tiles in order: tile_next fills in the next one that some query of the unit sees */
typedef struct {
    int bi;                  /* block index, and its first key's number */
    long base;
    const el_kvblock *B;
    long j, j1;              /* the tile's first row in B, the unit's end in B */
    int cnt, partial;        /* keys; some query misses some key (mask per query and key) */
    size_t rb;
    const char *kh, *vh;     /* the kv head's K and V rows in B */
} tile_it;

static tile_it tiles_of(void) { return (tile_it){.bi = -1}; }   /* before the first tile */

/* The tile after *t among kv head g's keys [k0, k1) for queries at positions qmin .. qmax; 0: none left */
static int tile_next(const att_ctx *c, int g, long k0, long k1, int32_t qmin, int32_t qmax, tile_it *t) {
    for (;;) {
        if (t->bi >= 0 && t->j + c->kt < t->j1) {
            t->j += c->kt;
        } else {   /* the next block that holds keys of the unit */
            if (t->bi >= 0) t->base += t->B->n;
            if (++t->bi >= c->n_blocks || t->base >= k1) return 0;
            t->B = &c->blocks[t->bi];
            block_slice(t->B, g, c->hd, t->base, k0, k1, &t->j, &t->j1, &t->rb, &t->kh, &t->vh);
            if (t->j >= t->j1) continue;
        }
        t->cnt = t->j1 - t->j < c->kt ? (int)(t->j1 - t->j) : c->kt;
        int32_t pmin, pmax;
        pos_span(t->B->pos + t->j, t->cnt, &pmin, &pmax);
        if (pmin > qmax) continue;   /* no query of the unit sees any of these keys */
        t->partial = pmax > qmin;
        return 1;
    }
}

/* whole cache lines per unit: two threads' units side by side would share a line that both write every tile */
static size_t part_floats(const att_ctx *c) { return ((size_t)max_rows(c) * (c->hd + 2) + 15) / 16 * 16; }

static size_t workspace_floats(const att_ctx *c) {
    size_t R = (size_t)max_rows(c), w = (R + 7) / 8 * 8;
    size_t lanes = 2 * c->hd * w + 2 * EL_KT * c->hd + EL_KT * w + 3 * w + 16;
    /* q rows, o, m, l, scores; el_lanes: qt, ot, kf, vf, st, m, l, qpos (el_qtile: pd instead) */
    return (R * c->hd + 15) / 16 * 16 + part_floats(c) + R * EL_ST + 16 + (lanes > R * EL_ST ? lanes : R * EL_ST);
}

/* Rows in vector lanes (prefill, F16/F32 keys): transpose the rows' queries in, run every visible key tile,
 * transpose o back. */
static void attend_lanes(att_ctx *c, int u, int g, long k0, long k1, const float *qf, int R, const int32_t *qp, int32_t qmin,
                         int32_t qmax, float *lanes_ws, float *o, float *mx, float *l) {
    const int gs = c->gs, hd = c->hd, w = (R + 7) / 8 * 8;
    float *qt = lanes_ws, *ot = qt + (size_t)hd * w, *kf = ot + (size_t)hd * w;
    float *vf = kf + (size_t)EL_LANES_KT * hd, *st = vf + (size_t)EL_LANES_KT * hd;
    float *m = st + (size_t)EL_LANES_KT * w, *lv = m + w;
    int32_t *qpos = (int32_t *)(lv + w);
    memset(qt, 0, sizeof(float) * 2 * hd * w);   /* padding lanes: zero queries, no keys visible */
    for (int r = 0; r < w; r++) m[r] = -INFINITY, lv[r] = 0, qpos[r] = r < R ? qp[r / gs] : INT32_MIN;
    for (int r = 0; r < R; r++)
        for (int d = 0; d < hd; d++) qt[(size_t)d * w + r] = qf[(size_t)r * hd + d];
    /* one vector of rows (decode): the output stays as rows, in ot's memory (R * hd <= w * hd, zeroed above) */
    el_lanes L = {.hd = hd, .w = w, .scale = c->scale, .qt = qt, .qpos = qpos, .ot = ot, .m = m, .l = lv, .kf = kf,
                  .vf = vf, .st = st, .orow = w == 8 ? ot : NULL, .rows = R};
    for (tile_it t = tiles_of(); tile_next(c, g, k0, k1, qmin, qmax, &t);) {
        L.pf_lines = (int)((next_tile(c, u, g, t.bi, t.j, t.j1, t.base, k1, &L.pf_k, &L.pf_v) + 63) / 64);
        el_kern->attend_lanes(&L, t.B->dtype, t.kh + t.j * t.rb, t.vh + t.j * t.rb, t.rb, t.B->pos + t.j, t.cnt, t.partial);
    }
    for (int r = 0; r < R; r++) {
        mx[r] = m[r], l[r] = lv[r];
        for (int d = 0; d < hd; d++) o[(size_t)r * hd + d] = L.orow ? L.orow[(size_t)r * hd + d] : ot[(size_t)d * w + r];
    }
}

void el_kq_grouped(int type, const char *kg, long j, int cnt, const float *q, int gs, int hd, float scale, float *s) {
    const size_t rb = el_row_bytes(type, hd), qb = el_row_bytes(type, EL_QK) - 2;
    const int nb = hd / EL_QK;
    for (long g0 = j - j % EL_KG; g0 < j + cnt; g0 += EL_KG) {
        const uint8_t *grp = (const uint8_t *)kg + g0 * rb;
        for (int h = 0; h < gs; h++) {
            const float *qh = q + (size_t)h * hd;
            float tot[EL_KG] = {0};
            for (int b = 0; b < nb; b++) {
                const uint8_t *x = grp + nb * 16 + b * qb * EL_KG;   /* the block's values, EL_KG keys per byte */
                float acc[EL_KG] = {0};
                for (size_t i = 0; i < qb; i++, x += EL_KG)
                    for (int r = 0; r < EL_KG; r++) {
                        if (type == EL_Q8_0) {
                            acc[r] += qh[b * EL_QK + i] * (float)(int8_t)x[r];
                        } else {   /* Q4_0: a byte holds values i (low nibble) and i + 16 */
                            acc[r] += qh[b * EL_QK + i] * (float)((x[r] & 15) - 8);
                            acc[r] += qh[b * EL_QK + i + 16] * (float)((x[r] >> 4) - 8);
                        }
                    }
                for (int r = 0; r < EL_KG; r++) tot[r] += acc[r] * el_f16_to_f32(((const uint16_t *)grp)[b * EL_KG + r]);
            }
            for (int r = 0; r < EL_KG; r++) {
                const long t = g0 + r - j;
                if (t >= 0 && t < cnt) s[h * EL_KT + t] = scale * tot[r];
            }
        }
    }
}

void el_kq_keys(int type, const char *kh, size_t rb, long j, int cnt, const float *q, int gs, int hd, float scale,
                float *s) {
    if (el_is_quant(type)) {
        el_kq_grouped(type, kh, j, cnt, q, gs, hd, scale, s);
        return;
    }
    int idx[EL_KT];
    for (int t = 0; t < cnt; t++) idx[t] = (int)(j + t);
    el_kern->kq(type, kh, rb, idx, cnt, q, gs, hd, scale, s);
}

/* One row's online-softmax step over a key tile (the portable path; the AVX2 quantized tile fuses its own,
 * softmax_pd): its scores s[0..cnt) become weights e^(s - m), keys past qpos (positions kpos; INT32_MAX: none masked)
 * weighing 0; the row's unnormalized output o (hd values), running max *m and sum *l move to the new maximum and *l
 * takes the weights' sum. A row that has seen no key yet gets weights 0. */
static void softmax_row(float *s, int cnt, const int32_t *kpos, int32_t qpos, float *o, int hd, float *m, float *l) {
    float m_new = *m;
    if (qpos != INT32_MAX)
        for (int t = 0; t < cnt; t++)
            if (kpos[t] > qpos) s[t] = -INFINITY;
    if (el_kern->max) m_new = el_kern->max(s, cnt, m_new);
    else
        for (int t = 0; t < cnt; t++) m_new = s[t] > m_new ? s[t] : m_new;
    if (m_new == -INFINITY) {   /* nothing visible to this row yet: it takes no part in P.V */
        memset(s, 0, sizeof(float) * cnt);
        return;
    }
    if (m_new > *m) {   /* rescale what was accumulated under the old maximum */
        const float f = expf(*m - m_new);
        for (int d = 0; d < hd; d++) o[d] *= f;
        *l *= f;
        *m = m_new;
    }
    *l += el_kern->exp_sum(s, cnt, m_new);   /* masked scores become exactly 0 */
}

static void attend_unit(att_ctx *c, int u, float *ws) {
    const int gs = c->gs, hd = c->hd;
    /* largest query tiles first: under dynamic scheduling the last units taken are the cheap ones */
    int chunk = u % c->nchunk, g = u / c->nchunk % c->n_kv, qtile = c->n_qt - 1 - u / c->nchunk / c->n_kv;
    int i0 = qtile * c->qt, nq = c->n_q - i0 < c->qt ? c->n_q - i0 : c->qt, R = nq * gs;
    long k0 = chunk * c->chunk_keys, k1 = k0 + c->chunk_keys;
    const int32_t *qp = c->q_pos + i0;
    int32_t qmin = qp[0], qmax = qp[0];
    for (int i = 1; i < nq; i++) qmin = qp[i] < qmin ? qp[i] : qmin, qmax = qp[i] > qmax ? qp[i] : qmax;

    float *qf = ws, *o = qf + ((size_t)R * hd + 15) / 16 * 16, *mx = o + (size_t)R * hd, *l = mx + R, *s = l + R;
    if (c->nchunk > 1) o = c->part + (size_t)u * part_floats(c), mx = o + (size_t)R * hd, l = mx + R;
    for (int i = 0; i < nq; i++)   /* row r = i * gs + h */
        memcpy(qf + (size_t)i * gs * hd, c->q + ((size_t)(i0 + i) * c->n_head + (size_t)g * gs) * hd, sizeof(float) * gs * hd);
    /* every F16/F32 unit takes the lanes path, whatever its row count: a row's result then does not depend on how
     * the prompt was chunked (decode equals prefill bit for bit), at some cost to f16 decode at long contexts */
    if (c->lanes) {
        attend_lanes(c, u, g, k0, k1, qf, R, qp, qmin, qmax, s + (size_t)R * EL_KT + 16, o, mx, l);
        goto done;
    }
    memset(o, 0, sizeof(float) * R * hd);
    for (int r = 0; r < R; r++) mx[r] = -INFINITY, l[r] = 0;

    /* quantized tiles: the table's fused kernel where it has one (pd in the lanes' part of the workspace) */
    const el_qtile T = {.hd = hd, .rows = R, .gs = gs, .scale = c->scale, .q = qf, .qpos = qp, .o = o, .m = mx, .l = l,
                        .s = s, .pd = s + (size_t)R * EL_ST + 16};
    int idx[EL_KT];
    for (tile_it t = tiles_of(); tile_next(c, g, k0, k1, qmin, qmax, &t);) {
        const int type = t.B->dtype, cnt = t.cnt;
        const int32_t *kpos = t.B->pos + t.j;
        if (el_kern->attend_quant && el_is_quant(type)) {
            const char *nk = NULL, *nv = NULL;
            size_t nbytes = next_tile(c, u, g, t.bi, t.j, t.j1, t.base, k1, &nk, &nv);
            el_kern->attend_quant(&T, type, t.kh, t.j, t.vh + t.j * t.rb, t.rb, kpos, cnt, t.partial, nk, nv, nbytes);
            continue;
        }
        el_kq_keys(type, t.kh, t.rb, t.j, cnt, qf, R, hd, c->scale, s);
        for (int r = 0; r < R; r++)
            softmax_row(s + r * EL_KT, cnt, kpos, t.partial ? qp[r / gs] : INT32_MAX, o + (size_t)r * hd, hd, mx + r,
                           l + r);
        for (int i = 0; i < cnt; i++) idx[i] = (int)(t.j + i);
        el_kern->pv(type, t.vh, t.rb, idx, cnt, s, R, hd, o);
    }
done:
    if (c->nchunk > 1) return;
    for (int r = 0; r < R; r++) {
        size_t head = (size_t)(i0 + r / gs) * c->n_head + (size_t)g * gs + r % gs;
        float *out = c->out + head * hd, inv = l[r] > 0 ? 1.0f / l[r] : 0.0f;
        for (int d = 0; d < hd; d++) out[d] = o[(size_t)r * hd + d] * inv;
        if (c->lse) c->lse[head] = l[r] > 0 ? mx[r] + logf(l[r]) : -INFINITY;
    }
}

static void attend_task(void *p, int ith, int nth) {
    att_ctx *c = p;
    (void)nth;
    for (int u; (u = atomic_fetch_add(&c->next, 1)) < c->n_units;) attend_unit(c, u, c->ws + (size_t)ith * c->ws_floats);
}

/* Merge the key chunks of each (query tile, kv head) with their lse and normalize into out and lse (NULL: not
 * wanted; decode: a few hundred floats). */
static void merge_chunks(const att_ctx *c, float *outs, float *lses) {
    const int gs = c->gs, hd = c->hd;
    for (int pi = 0; pi < c->n_units / c->nchunk; pi++) {
        int g = pi % c->n_kv, qtile = c->n_qt - 1 - pi / c->n_kv, i0 = qtile * c->qt;
        int nq = c->n_q - i0 < c->qt ? c->n_q - i0 : c->qt, R = nq * gs;
        const float *base = c->part + (size_t)pi * c->nchunk * part_floats(c);
        for (int r = 0; r < R; r++) {
            size_t head = (size_t)(i0 + r / gs) * c->n_head + (size_t)g * gs + r % gs;
            float *out = outs + head * hd, M = -INFINITY, L = 0;
            for (int k = 0; k < c->nchunk; k++) {
                const float *o = base + k * part_floats(c), m = o[(size_t)R * hd + r];
                M = m > M ? m : M;
            }
            memset(out, 0, sizeof(float) * hd);
            for (int k = 0; k < c->nchunk && M != -INFINITY; k++) {
                const float *o = base + k * part_floats(c), m = o[(size_t)R * hd + r];
                if (m == -INFINITY) continue;
                float w = expf(m - M);
                L += w * o[(size_t)R * hd + R + r];
                for (int d = 0; d < hd; d++) out[d] += w * o[(size_t)r * hd + d];
            }
            float inv = L > 0 ? 1.0f / L : 0.0f;
            for (int d = 0; d < hd; d++) out[d] *= inv;
            if (lses) lses[head] = L > 0 ? M + logf(L) : -INFINITY;
        }
    }
}

/* c for el_attention's arguments and nth threads; -1: arguments it rejects */
static int att_init(att_ctx *c, const float *q, int n_q, const int32_t *q_pos, int n_head, int n_kv_head, int hd,
                    float scale, const el_kvblock *blocks, int n_blocks, float *out, float *lse, int nth) {
    if (n_q <= 0 || n_kv_head <= 0 || n_head % n_kv_head || n_head / n_kv_head > MAX_GROUP || hd <= 0 || hd > EL_MAX_HD)
        return -1;
    long total = 0;
    int any_quant = 0;
    for (int b = 0; b < n_blocks; b++) {
        if (!el_row_bytes(blocks[b].dtype, hd) || (el_is_quant(blocks[b].dtype) && hd % EL_QK)) return -1;
        total += blocks[b].n;
        any_quant |= el_is_quant(blocks[b].dtype);
    }
    *c = (att_ctx){.nth = nth, .q = q, .q_pos = q_pos, .n_q = n_q, .n_head = n_head, .n_kv = n_kv_head, .hd = hd,
                   .gs = n_head / n_kv_head, .scale = scale, .blocks = blocks, .n_blocks = n_blocks,
                   .lanes = el_kern->attend_lanes && !any_quant && hd % 8 == 0, .out = out, .lse = lse};
    c->kt = c->lanes ? EL_LANES_KT : EL_KT;
    c->qt = TILE_ROWS / c->gs > 1 ? TILE_ROWS / c->gs : 1;
    if (c->qt > n_q) c->qt = n_q;
    c->n_qt = (n_q + c->qt - 1) / c->qt;
    /* Few (query tile, kv head) pairs (decode): split the keys too, into enough chunks that every thread streams
     * an equal share of the cache; a chunk keeps >= 256 keys so its fixed cost stays small */
    int pairs = c->n_qt * n_kv_head;
    c->nchunk = 1;
    if (nth > 1 && pairs < 4 * nth) {
        c->nchunk = (4 * nth + pairs - 1) / pairs;
        while ((pairs * c->nchunk) % nth) c->nchunk++;
        long max_chunks = total / 256 > 1 ? total / 256 : 1;
        if (c->nchunk > max_chunks) c->nchunk = (int)max_chunks;
    }
    c->chunk_keys = total ? ((total + c->nchunk - 1) / c->nchunk + EL_KT - 1) / EL_KT * EL_KT : EL_KT;
    c->n_units = pairs * c->nchunk;
    c->ws_floats = (workspace_floats(c) + 15) / 16 * 16;   /* whole cache lines: no false sharing */
    atomic_init(&c->next, 0);
    return 0;
}

/* floats of scratch c's units need: the chunks' partial results, then each thread's workspace */
static size_t att_part_floats(const att_ctx *c) {
    return c->nchunk > 1 ? (part_floats(c) * c->n_units + 15) / 16 * 16 : 0;
}

static size_t att_scratch_floats(const att_ctx *c) { return att_part_floats(c) + c->ws_floats * c->nth; }

size_t el_att_ctx_bytes(void) { return sizeof(att_ctx); }

size_t el_att_plan(void *ctx, const float *q, const int32_t *q_pos, int n_head, int n_kv_head, int hd, float scale,
                   const el_kvblock *blocks, int n_blocks, float *out, int nth) {
    att_ctx *c = ctx;
    return att_init(c, q, 1, q_pos, n_head, n_kv_head, hd, scale, blocks, n_blocks, out, NULL, nth) ? 0
                                                                                                    : att_scratch_floats(c);
}

void el_att_bind(void *ctx, float *mem) {
    att_ctx *c = ctx;
    c->part = mem;
    c->ws = mem + att_part_floats(c);
}

void el_att_units(void *ctx, int ith) { attend_task(ctx, ith, ((att_ctx *)ctx)->nth); }

void el_att_out(const void *ctx, float *out) {
    const att_ctx *c = ctx;
    if (c->nchunk > 1) merge_chunks(c, out, NULL);
    else if (out != c->out) memcpy(out, c->out, sizeof(float) * c->n_head * c->hd);
}

void el_attention(const float *q, int n_q, const int32_t *q_pos, int n_head, int n_kv_head, int hd, float scale,
                  const el_kvblock *blocks, int n_blocks, float *out, float *lse) {
    att_ctx c;
    el_lock();
    if (att_init(&c, q, n_q, q_pos, n_head, n_kv_head, hd, scale, blocks, n_blocks, out, lse, el_get_threads_locked())) {
        el_unlock();
        return;
    }
    float *mem = el_scratch(1, sizeof(float) * att_scratch_floats(&c));
    if (mem) {
        el_att_bind(&c, mem);
        el_parallel(attend_task, &c);
        if (c.nchunk > 1) merge_chunks(&c, c.out, c.lse);
    }
    el_unlock();
}
