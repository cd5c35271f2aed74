/* Next-token sampling (el_sample): the repetition penalty, top-k, min-p, top-p and the draw, in C so that a sampled
 * decode runs whole runs of tokens per native call (el_decode_run) as a greedy one does. Reference:
 * reference.sample. */
#include "kernels.h"

#include <math.h>
#include <stdlib.h>

/* splitmix64: one 64-bit state, a fixed sequence per seed on every platform */
static uint64_t next_u64(uint64_t *state) {
    uint64_t z = (*state += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

double el_uniform(uint64_t *state) { return (double)(next_u64(state) >> 11) * 0x1p-53; }

typedef struct {
    int32_t id;
    float v;
} cand;

/* Rank order: larger value first, then the smaller id (so the first largest ranks first, as argmax) */
static int ranks_before(const cand *a, const cand *b) { return a->v > b->v || (a->v == b->v && a->id < b->id); }

static int cmp_rank(const void *a, const void *b) { return ranks_before(b, a) - ranks_before(a, b); }

/* The recent tokens' penalized values, each token once (seen twice, it still moves once): n of them in pen */
typedef struct {
    cand *pen;
    int n;
} penalty;

static int penalized(const penalty *p, int32_t id) {
    for (int j = 0; j < p->n; j++)
        if (p->pen[j].id == id) return 1;
    return 0;
}

static void penalize(penalty *p, const float *logits, int n, const int32_t *recent, int n_recent, float r) {
    p->n = 0;
    if (r == 1.0f) return;
    for (int j = 0; j < n_recent; j++) {
        const int32_t id = recent[j];
        const float v = id >= 0 && id < n ? logits[id] : NAN;
        if (v != v || penalized(p, id)) continue;   /* NaN: never a candidate, penalized or not */
        p->pen[p->n++] = (cand){id, v > 0 ? v / r : v * r};
    }
}

/* Reorders a[0..cnt) so that a[0..want) are its want best by rank (quickselect; ranks are a strict order) */
static void select_best(cand *a, int cnt, int want) {
    int lo = 0, hi = cnt - 1;
    const int k = want - 1;
    while (lo < hi) {
        const cand pivot = a[lo + (hi - lo) / 2];
        int i = lo, j = hi;
        while (i <= j) {
            while (ranks_before(&a[i], &pivot)) i++;
            while (ranks_before(&pivot, &a[j])) j--;
            if (i <= j) {
                const cand t = a[i];
                a[i++] = a[j];
                a[j--] = t;
            }
        }
        if (k <= j) hi = j;
        else if (k >= i) lo = i;
        else break;   /* a[k] is the pivot, in place */
    }
}

#define EL_SAMPLE_SLACK 4   /* top_m's buffer holds this many times the candidates it keeps: fewer selections */

/* The m best candidates by rank (penalties applied; NaN logits never chosen), sorted, into out (room for
 * EL_SAMPLE_SLACK (m + P) + P, P penalized tokens): returns how many (< m only when n is). One pass keeps the raw
 * values above the (m + P)-th best seen so far (a later equal value ranks below it); the true m best are among
 * those and the penalized ones. */
static int top_m(const float *logits, int n, int m, const penalty *p, cand *out) {
    const int want = m + p->n, cap = EL_SAMPLE_SLACK * want;
    int cnt = 0, have = 0;
    float thr = 0;
    for (int i = 0; i < n; i++) {
        const float v = logits[i];
        if (v != v || (have && !(v > thr))) continue;
        out[cnt++] = (cand){i, v};
        if (cnt == cap) {
            select_best(out, cnt, want);
            cnt = want, have = 1, thr = out[want - 1].v;
        }
    }
    int k = 0;   /* drop the penalized tokens' raw values, then add their penalized ones */
    for (int j = 0; j < cnt; j++)
        if (!penalized(p, out[j].id)) out[k++] = out[j];
    for (int j = 0; j < p->n; j++) out[k++] = p->pen[j];
    if (k > m) select_best(out, k, m), k = m;
    qsort(out, k, sizeof(cand), cmp_rank);
    return k;
}

/* Sum of exp((v - top) / t) over every token, penalties applied: the logits' terms by the kernel table's float
 * exp_sum a chunk at a time (NaN logits and the penalized tokens' raw values none: a raw value above top would leave
 * a float sum's rounding behind when taken off), the chunks' sums in double, then the penalized tokens' terms. */
static double weight_sum(const float *logits, int n, const penalty *p, float top, float t) {
    float x[256];
    const float inv = 1.0f / t;
    double sum = 0;
    for (int i0 = 0; i0 < n; i0 += 256) {
        const int m = n - i0 < 256 ? n - i0 : 256;
        for (int i = 0; i < m; i++) {
            const float v = logits[i0 + i];
            x[i] = v == v ? (v - top) * inv : -INFINITY;
        }
        for (int j = 0; j < p->n; j++)
            if (p->pen[j].id >= i0 && p->pen[j].id < i0 + m) x[p->pen[j].id - i0] = -INFINITY;
        sum += el_kern->exp_sum(x, m, 0.0f);
    }
    for (int j = 0; j < p->n; j++) sum += exp(((double)p->pen[j].v - top) / t);
    return sum;
}

/* The draw from candidates c[0..m) in rank order (cum: room for m running sums). complete: c holds every
 * candidate; total: the weight of all candidates (for top-p, and for the draw when no filter can end the kept
 * prefix). Returns the token, or -1 when the kept prefix or the draw reaches past c[m - 1]. */
static int32_t walk(const el_sampling *s, const cand *c, int m, int complete, double total, double u, double *cum) {
    const double t = s->temperature;
    const int cuts = s->min_p > 0 || s->top_p < 1.0f;
    double run = 0;
    int keep = -1;   /* the kept prefix's length, once a filter ends it inside c */
    for (int j = 0; j < m && keep < 0; j++) {
        const double w = exp(((double)c[j].v - c[0].v) / t);
        if (j > 0 && w < s->min_p) {
            keep = j;
            break;
        }
        cum[j] = run += w;
        if (s->top_p < 1.0f && run >= s->top_p * total) keep = j + 1;
    }
    if (keep < 0 && complete) keep = m;
    if (keep < 0 && cuts) return -1;
    const double target = u * (keep < 0 ? total : cum[keep - 1]);
    const int end = keep < 0 ? m : keep;
    for (int j = 0; j < end; j++)
        if (cum[j] > target) return c[j].id;
    return keep < 0 ? -1 : c[keep - 1].id;
}

/* The token from the best m candidates, or -1 with *more set when the draw needs more of them. *total: the
 * vocabulary's weight where it is needed (without top-k), summed on the first call (when it is negative). */
static int32_t pick(const el_sampling *s, const float *logits, int n, const penalty *p, int m, int k, double u,
                    double *total, int *more) {
    cand *c = malloc(sizeof(cand) * (EL_SAMPLE_SLACK * ((size_t)m + p->n) + p->n));
    double *cum = malloc(sizeof(double) * m);
    int32_t tok = -1;
    *more = 0;
    const int got = c && cum ? top_m(logits, n, m, p, c) : 0;
    if (got && s->temperature == 0.0f) tok = c[0].id;
    else if (got) {
        const int complete = k || got < m || m == n;
        if (k) {   /* top-p's share is of the top k */
            *total = 0;
            for (int j = 0; j < got; j++) *total += exp(((double)c[j].v - c[0].v) / s->temperature);
        } else if (*total < 0 && (s->top_p < 1.0f || s->min_p <= 0))
            *total = weight_sum(logits, n, p, c[0].v, s->temperature);
        tok = walk(s, c, got, complete, *total, u, cum);
        *more = tok < 0;
    }
    free(c);
    free(cum);
    return tok;
}

int32_t el_sample(const el_sampling *s, uint64_t *state, const float *logits, int n, const int32_t *hist, int n_hist) {
    if (n <= 0 || !s || n_hist < 0) return -1;
    const int last = s->repeat_last_n < n_hist ? s->repeat_last_n : n_hist;
    const int k = s->temperature == 0.0f ? 1 : s->top_k > 0 && s->top_k < n ? s->top_k : 0;
    cand pen_buf[256];
    penalty p = {last <= 256 ? pen_buf : malloc(sizeof(cand) * last), 0};
    if (!p.pen) return -1;
    penalize(&p, logits, n, hist + n_hist - last, last, s->repeat_penalty);
    const double u = s->temperature == 0.0f ? 0 : el_uniform(state);
    int32_t tok;
    int more;
    double total = -1;
    /* no top-k: the best m candidates for m growing until the filters and the draw end inside them */
    for (int m = k ? k : 64;; m = m < n / 8 ? m * 8 : n)
        if ((tok = pick(s, logits, n, &p, m, k, u, &total, &more)) >= 0 || !more || m == n) break;
    if (p.pen != pen_buf) free(p.pen);
    return tok;
}
