/* A forward step through every layer in one call: the per-layer calls the Python backend would make
 * (el_attn_in, el_kv_append into the tail block, el_attention, el_attn_out_mlp), with the same numerics,
 * minus ~30 Python round trips per token. */
#include "kernels.h"

#include <stdlib.h>

static int tails_have_room(el_kvblock *const *descs, int n_layer, int n_blocks, int n) {
    for (int l = 0; l < n_layer; l++) {
        const el_kvblock *t = &descs[l][n_blocks - 1];
        if (t->dtype != EL_F16 || t->n + n > t->cap) return 0;
    }
    return 1;
}

int el_forward_layers(const el_model *m, el_kvblock *const *descs, int n_blocks, int rotate, const int32_t *pos, int n,
                      float *x, const el_buffers *b, const el_kvblock *seal) {
    if (n <= 0 || n_blocks <= 0 || !tails_have_room(descs, m->n_layer, n_blocks, n)) return -1;
    const int H = m->n_head, G = m->n_kv_head, hd = m->head_dim;
    float *cs = NULL;   /* the positions' RoPE table, once for every layer */
    if (el_rope_applies(m->rope_dim, hd) && !(cs = el_rope_table(n, m->rope_dim, pos, m->rope_base))) return -1;
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
