/* edgellm native kernels: public C API (mirrored in build.py's cdef) and the internal interfaces
 * shared by the per-ISA kernel files. */
#ifndef EDGELLM_KERNELS_H
#define EDGELLM_KERNELS_H

#include <stddef.h>
#include <stdatomic.h>
#include <stdint.h>

/* ---- public API ---- */
/* GGML type ids, and the same blocks in el_repack's layout (ids no GGML type uses, never in files) */
enum { EL_F32 = 0, EL_F16 = 1, EL_Q4_0 = 2, EL_Q4_1 = 3, EL_Q8_0 = 8, EL_Q4_0R = 102, EL_Q4_1R = 103, EL_Q8_0R = 108,
       EL_Q4_0X = 112, EL_Q4_1X = 113 };

/* n tokens of one layer's K/V: kv head h's rows at k (v) + h * cap rows, n of them, in dtype; positions pos[0..n).
 * Quantized keys (Q8_0, Q4_0) are grouped: see el_kv_group (cap a multiple of 8). */
typedef struct {
    const void *k;
    const void *v;
    const int32_t *pos;
    int n;
    int cap;
    int dtype;
} el_kvblock;

int  el_simd_level(void);
int  el_set_simd(int level);
/* The decode GEMVs' software prefetch distance in bytes: set where bytes > 0 (a benchmark's knob; el_set_simd resets
 * it to its table's), returns the one in use */
int  el_prefetch_bytes(int bytes);
/* How many bytes of the next decode product a thread fetches ahead: in the one-token step, of its own share while it
 * waits at a barrier; between per-product jobs, an idle worker of the next product's first rows while the caller runs
 * the serial steps (pool_hint). Set where bytes >= 0 (a benchmark's knob; 0: none), returns the one in use */
int  el_next_bytes(int bytes);
/* Whether el_forward_layers takes one token through every layer in one pool job (1, the default) or as per-layer
 * jobs (0): set where on >= 0 (a benchmark's knob, the same results either way), returns the one in use */
int  el_token_step(int on);
/* Times the thread pool's jobs (a benchmark's tool, bench/pool_split.py): out (5 doubles, or NULL) gets the totals
 * since the last call: jobs, seconds inside jobs, of them the caller's own share and its wait for the other threads,
 * and seconds between one job's end and the next one's start (the serial steps); then timing is on or off. */
void el_pool_timing(int on, double *out);
/* Times the stages of the one-token step (a benchmark's tool, bench/step_stages.py): out (EL_STEP_STAGES doubles a
 * thread for max_threads threads, thread after thread, or NULL) gets each thread's seconds in each stage since the
 * last call, in order: QKV (with the norm, RoPE and K/V appends), attention's units, the merge with the output
 * projection, gate/up, down, each followed by its barrier wait; then timing is on or off. Returns the one-token
 * steps timed. */
#define EL_STEP_STAGES 10
int  el_step_timing(int on, double *out, int max_threads);
void el_set_threads(int n);
int  el_get_threads(void);
void el_matmul(const void *W, int wtype, int rows, int cols, const float *X, int n, float *Y, int ldy);
/* Same product with ~16-bit activations: each activation block is quantized to 8 bits and so is its rounding
 * residual, and both planes go through the int8 kernels (each unpacked weight block serves both). Used where
 * 8-bit activations cost the most accuracy (the output layer); in decode it costs little, weights dominate. */
void el_matmul_hp(const void *W, int wtype, int rows, int cols, const float *X, int n, float *Y, int ldy);
void el_get_rows(const void *W, int wtype, int cols, const int32_t *ids, int n, float *out);
void el_rmsnorm(const float *x, const float *w, int n, int dim, float eps, float *out);
void el_rope(float *x, int n, int n_heads, int head_dim, int rope_dim, const int32_t *pos, float freq_base, int neox);
/* The angles el_rope turns by at each of n positions: cs[i * rope_dim + 2j] = cos, [.. + 2j + 1] = sin of
 * pos[i] * freq_base^(-2j / rope_dim), j < rope_dim / 2 (rope_dim even, <= 512) */
void el_rope_cos_sin(const int32_t *pos, int n, int rope_dim, float freq_base, float *cs);
void el_silu_mul(float *gate, const float *up, long n);
void el_softmax(float *x, int rows, int cols);
/* In place: each of `rows` rows of `dim` (a power of 2) floats times the normalized Walsh-Hadamard matrix,
 * which is orthogonal and its own inverse. */
void el_hadamard(float *x, long rows, int dim);
void el_quantize_row(const float *x, void *dst, long n, int type);
void el_dequantize_row(const void *src, float *y, long n, int type);
void el_attention(const float *q, int n_q, const int32_t *q_pos, int n_head, int n_kv_head, int hd, float scale,
                  const el_kvblock *blocks, int n_blocks, float *out, float *lse);

/* Attention mass per key, for the KV policies' scores. With lse from el_attention over the same blocks:
 * out[g * n_keys + j] = sum (reduce_max = 0) or max (1) over the queries i and the query heads h of kv head g of
 * exp(scale q_ih . k_j - lse_ih), counting only keys visible to the query (pos_j <= q_pos[i]). Keys are numbered
 * across the blocks in order. Returns 0, or -1 on bad arguments or no memory. */
int el_attention_mass(const float *q, int n_q, const int32_t *q_pos, int n_head, int n_kv_head, int hd, float scale,
                      const el_kvblock *blocks, int n_blocks, const float *lse, int reduce_max, float *out);

/* The grouped key layout of quantized blocks: n rows (a multiple of 8) of hd values of `type` (Q8_0, Q4_0; rb bytes
 * each) from `rows` into `out`, 8 rows at a time with their bytes transposed, so that K.Q runs with 8 keys in vector
 * lanes and needs no horizontal sums. A group takes its rows' 8 * rb bytes: per 32-value block b, the 8 rows' f16
 * scales (16 bytes at b * 16), then per byte i of the block's quantized values the 8 rows' bytes (at
 * nb * 16 + (b * qb + i) * 8, nb blocks per row, qb value bytes per block). Rows at multiples of 8 stay where they
 * are in row layout. el_kv_ungroup: rows [j, j + n) of grouped keys kg back as rows. */
void el_kv_group(int type, const void *rows, long n, int hd, void *out);
void el_kv_ungroup(int type, const void *kg, long j, int n, int hd, void *out);

/* n f16 values (a multiple of 32 for the block types) quantized to `type`: el_quantize_row of their f32 values */
void el_kv_quantize(const uint16_t *x, void *dst, long n, int type);

/* A full f16 tail (n_kv_head heads of tail->cap rows, a multiple of 8) quantized to the rows at `to` (k, v: the first
 * of them, a head's rows to->cap rows apart, e.g. inside a larger block, a slab; dtype; keys grouped); the tail's
 * descriptor then describes them there (k, v, cap, dtype). KVCache's one conversion of a tail, from Python and from
 * el_forward_layers alike. */
void el_kv_seal(el_kvblock *tail, const el_kvblock *to, int n_kv_head, int hd);

/* Append n tokens of K and V (f32 [n][n_kv_head][hd]) and their positions to a block: rows row0 .. row0 + n - 1 of
 * its f16 arrays k16, v16 ([n_kv_head][cap][hd]) and of pos16 ([cap]). rotate: each head vector goes through the
 * normalized Walsh-Hadamard transform first (as el_hadamard; hd a power of 2). The inputs are not modified. */
void el_kv_append(const float *k, const float *v, const int32_t *pos, int n, int n_kv_head, int hd, int rotate,
                  void *k16, void *v16, int32_t *pos16, int row0, int cap);

/* Compaction's gather: entries idx[g * keep + i] (numbered across the blocks in order; i < keep) of kv head g into
 * k, v (f32 [keep][n_kv_head][hd]) in the model's basis (rotated: the cache stores Hadamard-rotated rows). cs given
 * (CR-RoPE): each gathered key is re-rotated from its position p to its rank i, by the angles of delta i - p in
 * cs[(i - p - d0) * rope_dim ...] (el_rope_cos_sin of deltas d0 .. d0 + nd - 1, one table for every layer).
 * Returns 0, or -1 on bad arguments (an index past the blocks' entries, a delta outside the table) or no memory. */
int el_kv_gather(const el_kvblock *blocks, int n_blocks, int n_kv_head, int hd, int rotated, const int32_t *idx,
                 int keep, int rope_dim, int neox, const float *cs, int d0, int nd, float *k, float *v);

/* Rewrite `rows` rows of `cols` quantized weights of `type` (Q4_0, Q4_1, Q8_0) in place into the layout the active
 * kernels read fastest (same bytes) and return its type; return `type` and change nothing where the kernels have no
 * such layout (scalar, NEON) or the type has none. Every function that takes a weight type accepts the repacked ones.
 * - Q4 with rows % 8 == 0: EL_Q4_0X / EL_Q4_1X, rows interleaved in groups of 8 (the 8 rows' bytes, 8 row bytes from
 *   the group's first row), block by block (8 GGUF blocks' bytes each, in the order the kernel reads them): 4 chunks
 *   of 32 bytes in which row i's 4 bytes at 4 i are GGUF qs[4 c .. 4 c + 3] of chunk c (low nibbles: elements 4 c..,
 *   high: 16 + 4 c..), then the 8 rows' f16 d, then (Q4_1) their f16 m. A row is not contiguous: el_dequantize_row
 *   takes the group's first row only; el_get_rows takes any.
 * - otherwise EL_Q4_0R, EL_Q4_1R, EL_Q8_0R, row by row: the quantized bytes of all nb blocks, then their nb f16
 *   scales d, then (Q4_1) their nb f16 mins m. Q8_0: 32 bytes per block. Q4: 32 bytes per pair of blocks, byte j
 *   holding element j of the first block (low nibble) and of the second (high nibble); an odd last block keeps
 *   GGUF's 16 bytes (byte j: elements j and j + 16). */
int el_repack(void *W, int type, int rows, int cols);

/* A weight matrix: rows x cols of type `type`. The fused steps below repack it on first use (el_repack) and update
 * `type`, so a matrix must have one el_weight, and callers read w and type from it at each call. With `home` set (a
 * buffer of the matrix's bytes, e.g. a slot of a huge-page arena) the repacked matrix is written there instead of
 * over w, w then points to it, and the source's whole pages are released (madvise DONTNEED: meant for a private
 * file map that was never written, whose pages would read back as the file). */
typedef struct {
    void *w;
    int type, rows, cols;
    void *home;
} el_weight;

/* Repack w's matrix if the active kernels want it (once; what the fused steps do to their weights). */
void el_weight_prepare(el_weight *w);

/* Per row of w (a quantized matrix, after el_weight_prepare): rho[r] = ceil(255 * max over the row's blocks of
 * sum |w_j| / (32 wmax)), wmax being the bound on |w_j| that the block's scales give (Q8_0 127|d|, Q4_0 8|d|,
 * Q4_1 15|d| + |m|), so that a block's L1 norm is <= 32 wmax rho[r] / 255. For el_logits_refine. Returns 0, or -1
 * (no memory, or w not quantized). */
int el_weight_l1_ratio(el_weight *w, uint8_t *rho);

/* y = w x for one activation row x (w->cols floats; y: w->rows), equal to el_matmul_hp where it can matter, at about
 * half its cost: every row by the 8-bit product (x's high plane), then each 4-row tile that holds a row which the
 * residual plane could still lift to the largest value recomputed by el_matmul_hp's kernel (the same tiles, so
 * bit-identical). The residual of block b is at most 127 lo_b.d per element, so it moves row r by at most
 * sum_b 32 wmax_rb rho[r] / 255 * 127 lo_b.d (plus the products' float rounding): rows never recomputed lie within
 * that of el_matmul_hp, and the argmax is el_matmul_hp's. rho from el_weight_l1_ratio. best: NULL, or where the
 * first largest of y goes, found among the recomputed rows (a row left alone lies below the largest lower bound, so
 * below them): greedy decoding needs no pass over y. Returns the number of rows recomputed, or -1 (no memory). */
int el_logits_refine(el_weight *w, const uint8_t *rho, const float *x, float *y, int32_t *best);

/* One layer's attention input, identical to the unfused calls: h = rmsnorm(x) * norm (x, h [n][dim]); q, k, v =
 * h times wq, wk, wv (el_matmul; quantized weights share one quantization of h); RoPE (el_rope) on q's n_head
 * and k's n_kv_head heads at positions pos. */
void el_attn_in(const float *x, int n, int dim, const float *norm, float eps,
                el_weight *wq, el_weight *wk, el_weight *wv,
                const int32_t *pos, int n_head, int n_kv_head, int head_dim, int rope_dim, float freq_base, int neox,
                float *h, float *q, float *k, float *v);

/* The rest of the layer after attention, identical to the unfused calls: x += att times wo; h = rmsnorm(x) * norm;
 * g = h times gate, u = h times up (one quantization of h); g = silu(g) * u; x += g times down.
 * x, h [n][dim]; att [n][wo->cols]; g, u [n][gate->rows]. */
void el_attn_out_mlp(float *x, const float *att, int n, int dim, el_weight *wo, const float *norm, float eps,
                     el_weight *gate, el_weight *up, el_weight *down, float *h, float *g, float *u);

/* One layer's weights for el_forward_layers (which repacks them on first use, as the fused steps do). */
typedef struct {
    const float *attn_norm, *ffn_norm;
    el_weight *wq, *wk, *wv, *wo, *gate, *up, *down;
} el_layer_w;

typedef struct {
    int n_layer, dim, n_head, n_kv_head, head_dim, rope_dim, neox;
    float eps, rope_base, scale;
    const el_layer_w *layers;
} el_model;

/* Scratch of a step: h, x-sized; q, att [n][n_head * head_dim]; k, v [n][n_kv_head * head_dim]; lse [n][n_head];
 * g, u [n][n_ff]. */
typedef struct {
    float *h, *q, *k, *v, *att, *lse, *g, *u;
} el_buffers;

/* n tokens at positions pos through every layer, x [n][dim] in place, each layer's K/V appended to its tail block
 * descs[l][n_blocks - 1] (f16, and rotated first when `rotate`, as KVCache stores them) and attention over its
 * n_blocks blocks (q rotated in and the output back when `rotate`). Exactly the per-layer calls of the Python
 * backend. seal: NULL, or per layer where a tail that these tokens fill is quantized to (k, v: the first of the tail's
 * rows, a head's rows cap rows apart, e.g. inside a larger block; dtype) before attention reads it; the tail's
 * descriptor then points there (k, v, cap, dtype).
 * Returns -1 and changes nothing unless every layer's tail is f16 with room for n more tokens (or out of memory). */
int el_forward_layers(const el_model *m, el_kvblock *const *descs, int n_blocks, int rotate, const int32_t *pos, int n,
                      float *x, const el_buffers *b, const el_kvblock *seal);

/* How el_sample picks a token from logits (SamplingParams): temperature 0 is the argmax (the first largest) */
typedef struct {
    float temperature, top_p, min_p, repeat_penalty;
    int top_k, repeat_last_n;
} el_sampling;

/* The next uniform double in [0, 1) of a splitmix64 stream (state: its 64 bits, advanced) */
double el_uniform(uint64_t *state);

/* A token drawn from logits[0..n): the last repeat_last_n of hist[0..n_hist) penalized (positive logits divided by
 * repeat_penalty, negative ones multiplied; a token seen twice moves once); at temperature 0 their argmax (the first
 * largest), else, candidates in rank order (larger value first, then smaller id): the top_k best (all when 0),
 * weighed w = exp((v - v_best) / temperature); kept: the prefix with w >= min_p, cut after the first candidate at
 * which the running weight reaches top_p times the top_k's; drawn: the first kept candidate whose running weight
 * exceeds u times the kept weight, u = el_uniform(state) (one draw a token; none at temperature 0). Weights and
 * running sums in double, but without top-k the top_k's weight (the whole vocabulary's) is summed in float chunks.
 * Logits are not changed. Returns the token, or -1 (no memory, no candidate). Reference: reference.sample. */
int32_t el_sample(const el_sampling *s, uint64_t *state, const float *logits, int n, const int32_t *hist, int n_hist);

/* Decoding without Python between tokens (Python between them runs with caches the weights evicted): feeds tok at
 * position pos through every layer (el_forward_layers), takes the next-token logits as the Python backend's
 * next_logits does (el_rmsnorm with out_norm, el_logits_refine with rho; into logits, output->rows floats), picks
 * the next token from them by el_sample (s, state) with the history hist[0..n_hist) and appends it to out and to
 * hist (room for n_hist + max_n); then feeds that token at pos + 1, and so on: max_n tokens, or fewer when one of
 * stop[0..n_stop) comes (the last one in out, not fed). h: dim floats. The tails need room for more than max_n
 * tokens (none fills: no seal). Returns the number of tokens in out, or -1 (bad arguments, or out of memory part
 * way: the cache then holds tokens its owner does not know of). */
int el_decode_run(const el_model *m, el_kvblock *const *descs, int n_blocks, int rotate, int32_t pos, int32_t tok,
                  int max_n, const int32_t *stop, int n_stop, el_weight *embd, el_weight *output,
                  const float *out_norm, const uint8_t *rho, const el_sampling *s, uint64_t *state, int32_t *hist,
                  int n_hist, float *x, const el_buffers *b, float *h, float *logits, int32_t *out);

/* ---- internal ---- */

extern int el_pf_bytes;   /* el_prefetch_bytes' distance, read by the x86 GEMV kernels */

/* el_attn_in with the RoPE table of its positions given (el_rope_table; NULL: no RoPE), so a step through every
 * layer computes it once */
void el_attn_in_cs(const float *x, int n, int dim, const float *norm, float eps, el_weight *wq, el_weight *wk,
                   el_weight *wv, const float *cs, int n_head, int n_kv_head, int head_dim, int rope_dim, int neox,
                   float *h, float *q, float *k, float *v);
/* Whether RoPE turns anything: el_rope, el_attn_in and a whole-model step skip it otherwise */
static inline int el_rope_applies(int rope_dim, int head_dim) { return rope_dim / 2 > 0 && rope_dim <= head_dim; }
/* el_rope's cos / sin table of n positions (malloc'd, the caller frees; NULL: no memory) */
float *el_rope_table(int n, int rope_dim, const int32_t *pos, float freq_base);
#define EL_QK 32

/* GGUF blocks; f16 fields kept as raw bits. */
typedef struct { uint16_t d; uint8_t qs[16]; } el_block_q4_0;
typedef struct { uint16_t d, m; uint8_t qs[16]; } el_block_q4_1;
typedef struct { uint16_t d; int8_t qs[32]; } el_block_q8_0;
/* Quantized activation block: s = d * sum(qs) lets the Q4_1 min (m*s) and the Q4_0 offset (-8*d_w*s)
 * be added once per block outside the integer dot product. */
typedef struct { float d, s; int8_t qs[32]; } el_block_q8a;

_Static_assert(sizeof(el_block_q4_0) == 18, "q4_0 block");
_Static_assert(sizeof(el_block_q4_1) == 20, "q4_1 block");
_Static_assert(sizeof(el_block_q8_0) == 34, "q8_0 block");
_Static_assert(sizeof(el_block_q8a) == 40, "q8a block");

static inline int el_is_interleaved(int type) { return type == EL_Q4_0X || type == EL_Q4_1X; }
static inline int el_is_repacked(int type) {
    return type == EL_Q4_0R || type == EL_Q4_1R || type == EL_Q8_0R || el_is_interleaved(type);
}
/* the row-repacked kernels read the activations' block scales as planes (el_mm.act_ds) */
static inline int el_uses_act_ds(int type) { return el_is_repacked(type) && !el_is_interleaved(type); }
/* the GGUF type of a repacked one (EL_Q4_1R, EL_Q4_1X -> EL_Q4_1); other types unchanged */
static inline int el_base_type(int type) {
    if (el_is_interleaved(type)) return type - (EL_Q4_0X - EL_Q4_0);
    return el_is_repacked(type) ? type - (EL_Q4_0R - EL_Q4_0) : type;
}
/* GGUF block b (el_block_q4_0 / q4_1 / q8_0 bytes) of row r of W (rows of rb bytes, nb blocks) in el_repack's layout */
void el_unpack_block(const uint8_t *W, int type, size_t rb, long r, int nb, int b, uint8_t *blk);
/* Blocks per row of the activation scale planes (el_mm.act_ds): nb rounded up to whole groups of 8 */
static inline int el_ds_blocks(int nb) { return (nb + 7) & ~7; }

float el_f16_to_f32(uint16_t h);
uint16_t el_f32_to_f16(float f);
int el_is_quant(int type);
size_t el_row_bytes(int type, long n);   /* 0 for an unknown type */

/* Thread pool: fn runs once on each of the el_get_threads() threads (ith = 0 is the caller). */
typedef void (*el_task_fn)(void *ctx, int ith, int nth);
void el_parallel(el_task_fn fn, void *ctx);   /* caller holds el_lock() */
void el_lock(void);
int el_get_threads_locked(void);
void el_unlock(void);

/* Arguments of one matmul; act is the quantized X (quant W) or X itself (F16/F32 W). */
typedef struct {
    const uint8_t *W;
    size_t row_bytes;
    int wtype, rows, cols, n, ldy;
    const void *act;
    float *Y;
    int planes;   /* 2: act rows 2t and 2t+1 are the high and residual planes of token t, summed into Y row t */
    /* repacked W only: per act row, d[nbp] then s[nbp] of its blocks (nbp = el_ds_blocks(nb), zero padded), so the
     * kernels load the scales of 8 consecutive blocks as one vector */
    const float *act_ds;
    /* optional (el_logits_refine): mm_rows also sets bound[r] = el_row_bounds' sum for each of its rows */
    const float *bound_v;
    float *bound;
} el_mm;

/* Attention state of a unit with many rows (prefill): row r is lane r % 8 of vector r / 8, so the online softmax
 * runs on whole vectors and K.Q / P.V are outer products that need no horizontal sums. Arrays [hd][w] hold one
 * vector row of w = 8 * nv lanes per head dimension; padding lanes have qpos INT32_MIN and stay empty. */
typedef struct {
    int hd, w;
    float scale;
    const float *qt;       /* [hd][w] queries */
    const int32_t *qpos;   /* [w] */
    float *ot, *m, *l;     /* [hd][w] unnormalized output; [w] running max and sum */
    float *kf, *vf, *st;   /* scratch: [EL_LANES_KT][hd] keys and values as f32, [EL_LANES_KT][w] scores */
    /* NULL, or (w == 8: rows <= 8, e.g. decode) where the output is kept as rows [rows][hd] instead of in ot:
     * K.Q then runs with keys in lanes and P.V with head dimensions in lanes, the same FMAs in the same order */
    float *orow;
    int rows;
    /* the unit's next tile, prefetched during this one's K.Q (orow units): pf_lines cache lines of K and of V */
    const char *pf_k, *pf_v;
    int pf_lines;
} el_lanes;

/* A unit's rows for el_kernels.attend_quant: row r is query r / gs, head r % gs of its kv head's group. */
typedef struct {
    int hd, rows, gs;
    float scale;
    const float *q;          /* [rows][hd] */
    const int32_t *qpos;     /* [rows / gs] */
    float *o, *m, *l;        /* [rows][hd] unnormalized output; [rows] running max and sum */
    float *s, *pd;           /* scratch [rows][EL_ST] each: scores / weights, weights times a V block's scales */
} el_qtile;

/* One table of kernels per SIMD level; the active one is el_kern. */
typedef struct {
    /* nb blocks of 32 floats -> activation blocks */
    void (*quant_act)(const float *x, el_block_q8a *y, int nb);
    /* rows [r0, r1) of Y for all n tokens */
    void (*mm_rows)(const el_mm *m, int r0, int r1);
    /* Attention over a tile of cnt <= EL_KT keys (rows idx[t] of k / v, rb bytes apart) for the gs query heads
     * of one kv head. kq (F16 / F32 keys; grouped quantized keys take el_kq_grouped): s[h*EL_KT + t] = scale *
     * q_h . k_t, with q gs rows of hd f32. pv: o[h*hd + c] += sum_t p[h*EL_KT + t] v_t[c]. */
    void (*kq)(int type, const char *k, size_t rb, const int *idx, int cnt, const float *q, int gs, int hd, float scale, float *s);
    void (*pv)(int type, const char *v, size_t rb, const int *idx, int cnt, const float *p, int gs, int hd, float *o);
    /* x[i] = exp(x[i] - sub) (0 where that underflows, e.g. masked -inf scores); returns the sum. SIMD tables: one
     * exp for every position and the sum per lane, so trailing zeros (masked keys) leave both unchanged */
    float (*exp_sum)(float *x, int n, float sub);
    void (*silu_mul)(float *gate, const float *up, long n);
    /* Optional (NULL: attention uses kq / pv): one key tile of a unit whose rows sit in vector lanes, see el_lanes.
     * Keys / values: cnt rows of k / v (F16 / F32), rb bytes apart, positions pos; partial: mask keys past a row's
     * query. Quantized caches take attend_quant (or kq / pv): dequantizing their keys for the lanes costs more than
     * it saves. */
    void (*attend_lanes)(const el_lanes *L, int type, const char *k, const char *v, size_t rb, const int32_t *pos,
                         int cnt, int partial);
    /* 1: mm_rows has kernels for el_repack's layouts, so el_repack rewrites weights (0: it leaves them as they are;
     * mm_rows must still take repacked weights, e.g. after el_set_simd switched tables) */
    int repacks;
    /* Optional (NULL: the portable loop): rows of x times the Walsh-Hadamard matrix times norm, dim a power of 2
     * >= 8; the same butterflies in the same order as the portable loop, so bit-identical results */
    void (*hadamard)(float *x, long rows, int dim, float norm);
    /* Optional (NULL: el_f16_to_f32 per value): n f16 values to f32, exactly */
    void (*f16_row)(const uint16_t *x, float *y, long n);
    /* Optional (NULL: attention uses el_kq_grouped / exp_sum / pv): one tile of cnt <= EL_KT quantized keys (Q8_0 /
     * Q4_0, hd a multiple of EL_QK), keys j .. j + cnt - 1 of a kv head's grouped keys kg, their V rows from v (rb
     * bytes apart) and positions from pos, for all of T's rows, their online-softmax state updated in place. A row's
     * arithmetic must not depend on the other rows (decode equals prefill bit for bit). next_k / next_v: next_bytes
     * of the unit's next tile, prefetched while this one computes (next_bytes 0: none). */
    void (*attend_quant)(const el_qtile *T, int type, const char *kg, long j, const char *v, size_t rb,
                         const int32_t *pos, int cnt, int partial, const char *next_k, const char *next_v,
                         size_t next_bytes);
    /* Optional (NULL: the portable loop): the largest of m and x[0..n) (a maximum: the same in any order) */
    float (*max)(const float *x, int n, float m);
    /* Optional (NULL: el_f32_to_f16 per value): n f32 values to f16, bit for bit as el_f32_to_f16 rounds them */
    void (*to_f16_row)(const float *x, uint16_t *y, long n);
    /* Optional (NULL: the portable loop): n f32 values (whole blocks) as Q8_0 blocks, bit for bit as ggml's
     * quantize_row_q8_0_ref for finite values (every KV tail that fills is quantized through it) */
    void (*q8_0_row)(const float *x, void *dst, long n);
} el_kernels;

/* The kq of grouped quantized keys, portable (keys in lanes, no horizontal sums): s[h * EL_KT + t] = scale * q_h . k_t
 * for keys j .. j + cnt - 1 of a kv head's grouped keys kg (el_kv_group) and the gs query rows q (hd apart) */
void el_kq_grouped(int type, const char *kg, long j, int cnt, const float *q, int gs, int hd, float scale, float *s);

/* The same scores for keys j .. j + cnt - 1 of a kv head's rows kh (rb bytes each) in either layout: grouped quantized
 * keys through el_kq_grouped, F16 / F32 rows through the active table's kq */
void el_kq_keys(int type, const char *kh, size_t rb, long j, int cnt, const float *q, int gs, int hd, float scale,
                float *s);

/* out[r] = sum_b wmax_rb v[b] for rows r0..r1-1 of m's weights (wmax_rb: el_weight_l1_ratio's bound on |w| in block
 * b; v padded with zeros to el_ds_blocks(nb)): el_mm.bound where a kernel has no faster way */
void el_row_bounds(const el_mm *m, int r0, int r1, const float *v, float *out);

extern const el_kernels *el_kern;
extern const el_kernels el_kernels_scalar;
#if defined(__x86_64__)
extern const el_kernels el_kernels_avx2;
const el_kernels *el_kernels_avx512(void);   /* level 2: the AVX2 table with AVX-512 kernels where they pay */
#endif
#if defined(__aarch64__)
extern const el_kernels el_kernels_neon;       /* level 10: ARMv8-A NEON (Pi 4) */
extern const el_kernels el_kernels_neon_dot;   /* level 11: + dotprod (Pi 5) */
#endif

#define EL_KT 64   /* keys per attention tile */
/* keys per tile with rows in lanes (el_lanes): its keys transposed to [hd][32] floats stay in L1 (at 64, a row
 * stride of 256 bytes maps the 64 dimensions onto a quarter of L1's sets: f16 decode ran 12% slower) */
#define EL_LANES_KT 32
#define EL_MAX_HD 512   /* head_dim el_attention / el_attention_mass take (the kernels' row buffers) */
#define EL_KG 8          /* keys per group of the grouped key layout (el_kv_group) */
#define EL_MAX_QROW (EL_MAX_HD / EL_QK * 34)   /* bytes of the largest quantized KV row (Q8_0) */
/* row stride of the quantized tiles' scores (el_qtile.s / pd): a tile starting inside a key group scores the whole
 * group, its first keys left unused */
#define EL_ST (EL_KT + EL_KG)

/* Scratch memory owned by the library, grown on demand; slot 0 is matmul activations, 1 attention, 2 the one-token
 * step's per-thread buffers. Only used under the library lock (el_matmul / el_attention serialize). */
void *el_scratch(int slot, size_t bytes);

#define EL_MAX_THREADS 64   /* the pool's */

/* CLOCK_MONOTONIC in seconds */
double el_now_s(void);

/* A spin barrier for the nth threads of one el_parallel job (zero-initialized) */
typedef struct {
    _Alignas(64) atomic_int arrived;
    _Alignas(64) atomic_int phase;
} el_barrier;
void el_barrier_wait(el_barrier *b, int nth);

/* el_weight_prepare; caller holds the lock */
void el_weight_prepare_locked(el_weight *w);
/* One activation row (cols floats) as 8-bit blocks q and, where ds is not NULL, their scale planes (el_mm.act_ds) */
void el_quant_row(const float *x, int cols, el_block_q8a *q, float *ds);
/* RoPE on n rows of n_heads heads with the positions' table cs (el_rope_table) */
void el_rope_apply(float *x, int n, int n_heads, int head_dim, int rope_dim, const float *cs, int neox);
/* kv head h's rows of a full f16 tail quantized to its rows at `to`: el_kv_seal's step, which leaves the tail's
 * descriptor as it is */
void el_kv_seal_head(const el_kvblock *tail, const el_kvblock *to, int h, int hd);
/* One head's K or V row (hd floats; rotated first when `rotate`) as f16 at dst: el_kv_append's step */
void el_kv_append_head(const float *x, int hd, int rotate, uint16_t *dst);

/* el_attention for one query inside a caller's parallel region of nth threads (el_forward_layers' one-token step):
 * el_att_plan fills ctx (el_att_ctx_bytes of memory) and returns the floats of scratch its units need (0: arguments
 * el_attention rejects), el_att_bind gives them; then each thread runs el_att_units(ctx, ith), and once all have,
 * el_att_out writes the heads' outputs, el_attention's values, to any out (the units' own go to `out` of the plan,
 * which el_att_out may read, so every thread can take its own copy). */
size_t el_att_ctx_bytes(void);
size_t el_att_plan(void *ctx, const float *q, const int32_t *q_pos, int n_head, int n_kv_head, int hd, float scale,
                   const el_kvblock *blocks, int n_blocks, float *out, int nth);
void el_att_bind(void *ctx, float *mem);
void el_att_units(void *ctx, int ith);
void el_att_out(const void *ctx, float *out);

#endif
