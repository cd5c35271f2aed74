/* Run-time dispatch, thread pool, scratch memory, format conversion and the cheap element-wise kernels. */
#define _GNU_SOURCE
#include "kernels.h"

#include <math.h>
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>
#if defined(__x86_64__)
#include <immintrin.h>
#elif defined(__aarch64__)
#include <sys/auxv.h>
#endif

/* ---------------- f16 <-> f32 (bit exact with numpy's astype) ---------------- */

float el_f16_to_f32(uint16_t h) {
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (e == 0x1f) {
        bits = sign | 0x7f800000u | (man << 13);
    } else if (e) {
        bits = sign | ((e + 112) << 23) | (man << 13);
    } else {
        float f = (float)man * 0x1p-24f;   /* subnormal (or zero): exact */
        memcpy(&bits, &f, 4);
        bits |= sign;
    }
    float f;
    memcpy(&f, &bits, 4);
    return f;
}

uint16_t el_f32_to_f16(float f) {
    uint32_t x;
    memcpy(&x, &f, 4);
    uint16_t sign = (uint16_t)((x >> 16) & 0x8000);
    x &= 0x7fffffffu;
    if (x >= 0x7f800000u) return sign | 0x7c00 | (x > 0x7f800000u ? 0x200 : 0);
    if (x >= 0x477ff000u) return sign | 0x7c00;           /* rounds past 65504 */
    if (x < 0x38800000u) {                                /* below 2^-14: subnormal half */
        float a;
        memcpy(&a, &x, 4);
        return sign | (uint16_t)nearbyintf(a * 0x1p24f);
    }
    x += 0xfffu + ((x >> 13) & 1);                        /* round to nearest even */
    return sign | (uint16_t)((x - 0x38000000u) >> 13);
}

int el_is_quant(int type) {
    type = el_base_type(type);
    return type == EL_Q4_0 || type == EL_Q4_1 || type == EL_Q8_0;
}

size_t el_row_bytes(int type, long n) {
    switch (el_base_type(type)) {   /* a repacked row holds the same bytes */
    case EL_F32: return (size_t)n * 4;
    case EL_F16: return (size_t)n * 2;
    case EL_Q4_0: return (size_t)(n / EL_QK) * sizeof(el_block_q4_0);
    case EL_Q4_1: return (size_t)(n / EL_QK) * sizeof(el_block_q4_1);
    case EL_Q8_0: return (size_t)(n / EL_QK) * sizeof(el_block_q8_0);
    default: return 0;
    }
}

/* ---------------- SIMD level ---------------- */

const el_kernels *el_kern = &el_kernels_scalar;
static int el_level, el_detected;

static int detect_level(void) {
#if defined(__x86_64__)
    __builtin_cpu_init();   /* libgcc checks OS (XCR0) support before reporting avx2 / avx512f */
    if (!__builtin_cpu_supports("avx2") || !__builtin_cpu_supports("fma") || !__builtin_cpu_supports("f16c")) return 0;
    if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vl") &&
        __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vnni"))
        return 2;
    return 1;
#elif defined(__aarch64__)
    unsigned long hw = getauxval(AT_HWCAP);   /* HWCAP_ASIMD (1 << 1), HWCAP_ASIMDDP (1 << 20) */
    if (hw & (1UL << 1)) return hw & (1UL << 20) ? 11 : 10;
#endif
    return 0;
}

static const el_kernels *table_for(int level) {
#if defined(__x86_64__)
    if (level == 1) return &el_kernels_avx2;
    if (level == 2) return el_kernels_avx512();
#elif defined(__aarch64__)
    if (level == 10) return &el_kernels_neon;
    if (level == 11) return &el_kernels_neon_dot;
#endif
    (void)level;
    return &el_kernels_scalar;
}

int el_simd_level(void) { return el_level; }

int el_pf_bytes;   /* el_set_simd's, by table */

int el_prefetch_bytes(int bytes) {
    if (bytes > 0) el_pf_bytes = bytes;
    return el_pf_bytes;
}

int el_set_simd(int level) {
    if (level < 0) level = 0;
    /* the detected level or one below it on the same ISA (x86: 1 AVX2, 2 AVX-512; aarch64: 10 NEON, 11 dotprod) */
    el_level = level >= el_detected ? el_detected : table_for(level) != &el_kernels_scalar ? level : 0;
    el_kern = table_for(el_level);
    /* 4 KB measured best of 2-8 KB on Zen 3 (AVX2); on Zen 5 (AVX-512) 16 KB decoded 15% faster at 1 thread (4%
     * after 4096 tokens) and 1% slower at 2 (bench/decode_ab.py --what prefetch): one core keeps more lines in flight */
    el_pf_bytes = el_level == 2 ? 16384 : 4096;
    return el_level;
}

/* ---------------- thread pool ---------------- */

#define EL_SPIN_ROUNDS 200000   /* ~ a few ms of pause loops before a worker blocks */

static struct {
    int nth;                    /* 0 until first use */
    pthread_t th[EL_MAX_THREADS];
    atomic_uint gen;            /* bumped once per job */
    atomic_int pending;         /* slots of the current job not yet done */
    struct {
        atomic_uint gen;        /* the last job whose slot i was claimed (run_slot) */
        char pad[64 - sizeof(atomic_uint)];
    } claim[EL_MAX_THREADS];
    atomic_int stop;
    unsigned start_gen;         /* gen when the workers were created (they must not miss a job bumped before they run) */
    el_task_fn fn;
    void *ctx;
    /* the job's hint (pool_hint): the bytes the next job reads first, and how many. Atomic: a worker late for a job
     * may read the next one's, which costs at most a useless fetch (a prefetch never faults) */
    _Atomic(const char *) next;
    atomic_size_t next_len;
    pthread_mutex_t mu;
    pthread_cond_t cv;
} pool = {.mu = PTHREAD_MUTEX_INITIALIZER, .cv = PTHREAD_COND_INITIALIZER};

/* Serializes el_matmul / el_attention / el_set_threads: they share the pool and the scratch buffers,
 * and cffi releases the GIL around calls. */
static pthread_mutex_t api_mu = PTHREAD_MUTEX_INITIALIZER;

/* Spin-wait step. Every 64th round yields the CPU: when the machine is oversubscribed a pure spin would
 * hold the core the awaited thread needs for a whole time slice. */
static inline void cpu_relax(int round) {
    if ((round & 63) == 63) {
        sched_yield();
        return;
    }
#if defined(__x86_64__)
    _mm_pause();
#elif defined(__aarch64__)
    __asm__ __volatile__("yield");
#endif
}

/* Slot i (fn's ith) of job g runs once, on whichever thread claims it first: its worker, or the caller once its own
 * slot is done. On a busy machine a worker that the scheduler has not run yet then holds nobody up: the caller takes
 * its share instead of waiting up to a time slice for it, at every one of a decode step's ~150 jobs. */
static void run_slot(int i, unsigned g) {
    unsigned c = atomic_load_explicit(&pool.claim[i].gen, memory_order_relaxed);
    if ((int)(g - c) <= 0 || !atomic_compare_exchange_strong(&pool.claim[i].gen, &c, g)) return;
    pool.fn(pool.ctx, i, pool.nth);
    atomic_fetch_sub_explicit(&pool.pending, 1, memory_order_release);
}

static void *worker(void *arg) {
    int ith = (int)(intptr_t)arg;
    unsigned seen = pool.start_gen;
    for (;;) {
        int spins = 0;
        while (atomic_load_explicit(&pool.gen, memory_order_acquire) == seen && !atomic_load(&pool.stop)) {
            if (++spins < EL_SPIN_ROUNDS) {
                cpu_relax(spins);
                continue;
            }
            pthread_mutex_lock(&pool.mu);
            while (atomic_load(&pool.gen) == seen && !atomic_load(&pool.stop)) pthread_cond_wait(&pool.cv, &pool.mu);
            pthread_mutex_unlock(&pool.mu);
        }
        if (atomic_load(&pool.stop)) return NULL;
        seen = atomic_load(&pool.gen);
        const char *next = atomic_load_explicit(&pool.next, memory_order_relaxed);
        const size_t len = ith == pool.nth - 1 ? atomic_load_explicit(&pool.next_len, memory_order_relaxed) : 0;
        run_slot(ith, seen);
        for (size_t o = 0; o < len; o += 64) __builtin_prefetch(next + o, 0, 3);
    }
}

static void pool_stop(void) {
    if (pool.nth <= 1) return;
    pthread_mutex_lock(&pool.mu);
    atomic_store(&pool.stop, 1);
    pthread_cond_broadcast(&pool.cv);
    pthread_mutex_unlock(&pool.mu);
    for (int i = 1; i < pool.nth; i++) pthread_join(pool.th[i], NULL);
    atomic_store(&pool.stop, 0);
}

static void pool_start(int n) {
    if (n < 1) n = 1;
    if (n > EL_MAX_THREADS) n = EL_MAX_THREADS;
    pool.nth = 1;
    pool.start_gen = atomic_load(&pool.gen);
    for (int i = 0; i < n; i++) atomic_store(&pool.claim[i].gen, pool.start_gen);
    for (int i = 1; i < n; i++) {
        if (pthread_create(&pool.th[i], NULL, worker, (void *)(intptr_t)i) != 0) break;
        pool.nth = i + 1;
    }
}

static int want_threads;   /* from el_set_threads; 0: one per online CPU */

static void pool_ensure(void) {
    if (pool.nth) return;
    long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
    pool_start(want_threads ? want_threads : ncpu > 0 ? (int)ncpu : 1);
}

void el_set_threads(int n) {
    pthread_mutex_lock(&api_mu);
    if (pool.nth) pool_stop();
    want_threads = n < 1 ? 1 : n;
    pool_start(want_threads);
    pthread_mutex_unlock(&api_mu);
}

/* A forked child has none of the workers: restart the pool lazily instead of waiting on them forever. */
static void atfork_child(void) {
    pool.nth = 0;
    atomic_store(&pool.stop, 0);
    pthread_mutex_init(&pool.mu, NULL);
    pthread_cond_init(&pool.cv, NULL);
    pthread_mutex_init(&api_mu, NULL);
}

int el_get_threads_locked(void) {
    pool_ensure();
    return pool.nth;
}

int el_get_threads(void) {
    pthread_mutex_lock(&api_mu);
    int n = el_get_threads_locked();
    pthread_mutex_unlock(&api_mu);
    return n;
}

/* The next job's first len bytes, for the job about to run (el_parallel clears it): the worker whose first run of
 * work items is run 0 (runs_take) fetches them once its slot is done, while the caller runs the serial steps between
 * the two products; that worker then starts the next product on its first rows from cache. */
static void pool_hint(const void *next, size_t len) {
    atomic_store_explicit(&pool.next, next, memory_order_relaxed);
    atomic_store_explicit(&pool.next_len, len, memory_order_relaxed);
}

static int next_bytes = 32 << 10;   /* a decode product's hint: ~1 us of one thread's stream, about a serial gap */

int el_next_bytes(int bytes) {
    if (bytes >= 0) next_bytes = bytes;
    return next_bytes;
}

/* el_pool_timing's totals, in seconds; `last`: when the last timed job ended */
typedef struct {
    int on;
    double jobs, in_jobs, own, wait, between, last;
} pool_timing;
static pool_timing timing;

double el_now_s(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + 1e-9 * (double)t.tv_nsec;
}

/* A job that began at t0, whose caller's own slot ended at t1, and which ended at t2 */
static void job_timed(double t0, double t1, double t2) {
    timing.jobs++;
    timing.in_jobs += t2 - t0, timing.own += t1 - t0, timing.wait += t2 - t1;
    if (timing.last > 0) timing.between += t0 - timing.last;
    timing.last = t2;
}

void el_pool_timing(int on, double *out) {
    pthread_mutex_lock(&api_mu);
    if (out) out[0] = timing.jobs, out[1] = timing.in_jobs, out[2] = timing.own, out[3] = timing.wait,
             out[4] = timing.between;
    timing = (pool_timing){.on = on};
    pthread_mutex_unlock(&api_mu);
}

/* caller holds api_mu */
void el_parallel(el_task_fn fn, void *ctx) {
    pool_ensure();
    const double t0 = timing.on ? el_now_s() : 0;
    if (pool.nth == 1) {
        fn(ctx, 0, 1);
        pool_hint(NULL, 0);
        if (timing.on) {
            const double t = el_now_s();
            job_timed(t0, t, t);
        }
        return;
    }
    pool.fn = fn;
    pool.ctx = ctx;
    atomic_store(&pool.pending, pool.nth - 1);
    pthread_mutex_lock(&pool.mu);
    const unsigned g = atomic_fetch_add_explicit(&pool.gen, 1, memory_order_release) + 1;
    pthread_cond_broadcast(&pool.cv);
    pthread_mutex_unlock(&pool.mu);
    fn(ctx, 0, pool.nth);
    const double t1 = timing.on ? el_now_s() : 0;
    for (int i = 1; i < pool.nth; i++) run_slot(i, g);
    for (int spins = 0; atomic_load_explicit(&pool.pending, memory_order_acquire) > 0; spins++) cpu_relax(spins);
    pool_hint(NULL, 0);
    if (timing.on) job_timed(t0, t1, el_now_s());
}

void el_barrier_wait(el_barrier *b, int nth) {
    const int phase = atomic_load_explicit(&b->phase, memory_order_relaxed);
    if (atomic_fetch_add_explicit(&b->arrived, 1, memory_order_acq_rel) == nth - 1) {
        atomic_store_explicit(&b->arrived, 0, memory_order_relaxed);
        atomic_store_explicit(&b->phase, phase + 1, memory_order_release);
        return;
    }
    for (int spins = 0; atomic_load_explicit(&b->phase, memory_order_acquire) == phase; spins++) cpu_relax(spins);
}

static void *scratch_buf[3];
static size_t scratch_size[3];

void *el_scratch(int slot, size_t bytes) {
    if (bytes <= scratch_size[slot]) return scratch_buf[slot];
    free(scratch_buf[slot]);
    scratch_buf[slot] = aligned_alloc(64, (bytes + 63) & ~(size_t)63);
    scratch_size[slot] = scratch_buf[slot] ? bytes : 0;
    return scratch_buf[slot];
}

void el_lock(void) { pthread_mutex_lock(&api_mu); }
void el_unlock(void) { pthread_mutex_unlock(&api_mu); }

__attribute__((constructor)) static void el_init(void) {
    el_detected = detect_level();
    pthread_atfork(NULL, NULL, atfork_child);
    const char *force = getenv("EDGELLM_FORCE_SCALAR");
    el_set_simd(force && strcmp(force, "1") == 0 ? 0 : el_detected);
}

/* ---------------- matmul driver ---------------- */

typedef struct {
    const el_mm *m;
    const float *x;
    el_block_q8a *q;
} quant_ctx;

static void quant_task(void *p, int ith, int nth) {
    quant_ctx *c = p;
    int nb = c->m->cols / EL_QK, n = c->m->n;
    for (int t = ith; t < n; t += nth) el_kern->quant_act(c->x + (size_t)t * c->m->cols, c->q + (size_t)t * nb, nb);
}

/* x (nb blocks of 32) as two 8-bit planes: hi = x, lo = x - dequant(hi); together ~16-bit precision */
static void quant_act2(const float *x, el_block_q8a *hi, el_block_q8a *lo, int nb) {
    float r[EL_QK];
    el_kern->quant_act(x, hi, nb);
    for (int b = 0; b < nb; b++) {
        for (int j = 0; j < EL_QK; j++) r[j] = x[b * EL_QK + j] - hi[b].d * (float)hi[b].qs[j];
        el_kern->quant_act(r, lo + b, 1);
    }
}

/* Two planes per token: q[2t] = 8-bit x_t, q[2t+1] = its 8-bit residual */
static void quant2_task(void *p, int ith, int nth) {
    quant_ctx *c = p;
    const int cols = c->m->cols, nb = cols / EL_QK, n = c->m->n / 2;
    for (int t = ith; t < n; t += nth) {
        el_block_q8a *hi = c->q + (size_t)2 * t * nb;
        quant_act2(c->x + (size_t)t * cols, hi, hi + nb, nb);
    }
}

/* One activation row's block scales as el_mm.act_ds's planes: d[nbp] then s[nbp], zero padded */
static void scale_planes(const el_block_q8a *q, int nb, float *d) {
    const int nbp = el_ds_blocks(nb);
    for (int b = 0; b < nb; b++) d[b] = q[b].d, d[nbp + b] = q[b].s;
    for (int b = nb; b < nbp; b++) d[b] = d[nbp + b] = 0;
}

/* X (n rows of cols) as 8-bit blocks in scratch slot 0, two per row when planes == 2 (quant2_task), followed for
 * row-repacked weights (`ds`, el_uses_act_ds) by every activation row's scale planes (el_mm.act_ds, set in
 * *act_ds). NULL: no memory. */
static const el_block_q8a *quantize_x(const float *X, int n, int cols, int planes, int ds, const float **act_ds) {
    const int nb = cols / EL_QK, nbp = el_ds_blocks(nb), rows = n * planes;
    const size_t qbytes = (size_t)rows * nb * sizeof(el_block_q8a);
    el_mm qm = {.cols = cols, .n = rows};
    quant_ctx qc = {&qm, X, el_scratch(0, qbytes + (ds ? (size_t)rows * 2 * nbp * sizeof(float) : 0))};
    if (!qc.q) return NULL;
    el_task_fn task = planes == 2 ? quant2_task : quant_task;
    if (n >= 8) el_parallel(task, &qc);
    else task(&qc, 0, 1);
    if (ds) {
        float *d = (float *)((char *)qc.q + qbytes);
        for (int i = 0; i < rows; i++) scale_planes(qc.q + (size_t)i * nb, nb, d + (size_t)i * 2 * nbp);
        *act_ds = d;
    }
    return qc.q;
}

void el_quant_row(const float *x, int cols, el_block_q8a *q, float *ds) {
    el_kern->quant_act(x, q, cols / EL_QK);
    if (ds) scale_planes(q, cols / EL_QK, ds);
}

/* Work items in contiguous runs, one per thread (run i: items i * per ...): a thread takes its own run in order, then
 * what is left of the others', so a slow or descheduled thread's items go to the rest, while on an idle machine each
 * thread's items are consecutive rows and its prefetch stream runs on from one item into the next. Thread ith's own
 * run is run ith + 1 (mod nth): run 0, the matrix's first rows, goes to the last worker, which may hold them already
 * (pool_hint), not to the caller, which comes from the serial steps between products. */
typedef struct {
    int items, per;
    struct {
        atomic_int next;
        char pad[64 - sizeof(atomic_int)];   /* a cache line per run: the owner's takes do not bounce */
    } run[EL_MAX_THREADS];
} work_runs;

static void runs_init(work_runs *w, int items, int nth) {
    w->items = items, w->per = (items + nth - 1) / nth;
    for (int i = 0; i < nth; i++) atomic_init(&w->run[i].next, 0);
}

/* The next item for thread ith, or -1 when every run is taken */
static int runs_take(work_runs *w, int ith, int nth) {
    for (int k = 1; k <= nth; k++) {
        const int o = ith + k < nth ? ith + k : ith + k - nth;
        const int i = atomic_fetch_add_explicit(&w->run[o].next, 1, memory_order_relaxed);
        if (i < w->per && o * w->per + i < w->items) return o * w->per + i;
    }
    return -1;
}

typedef struct {
    el_mm m;
    int chunk;          /* rows per work item, a multiple of 8 so tiles stay whole */
    work_runs runs;
} mm_job;

static void mm_task(void *p, int ith, int nth) {
    mm_job *j = p;
    for (int it; (it = runs_take(&j->runs, ith, nth)) >= 0;) {
        const int r0 = it * j->chunk;
        el_kern->mm_rows(&j->m, r0, r0 + j->chunk < j->m.rows ? r0 + j->chunk : j->m.rows);
    }
}

/* Rows per work item (a multiple of 8, so tiles stay whole). One token (decode GEMV): ~4 items per thread, and a
 * thread's run of items is one stream of rows (work_runs). Many tokens: ~4 items per thread, and an item's weights
 * (<= 256 KiB) stay in L2 while every token chunk of the GEMM passes over them. Each weight row is read by one
 * thread either way. */
static int mm_chunk(int rows, size_t rb, int nth, int n) {
    int chunk = ((rows + 4 * nth - 1) / (4 * nth) + 7) & ~7;
    if (n == 1) return chunk;
    int l2_rows = (int)((256 << 10) / rb) & ~7;
    if (chunk > l2_rows) chunk = l2_rows;
    if (chunk < 16) chunk = 16;
    return chunk;
}

/* The job's rows cut into work items (mm_chunk) and the items into runs */
static void mm_items(mm_job *j, int nth, int n) {
    j->chunk = mm_chunk(j->m.rows, j->m.row_bytes, nth, n);
    runs_init(&j->runs, (j->m.rows + j->chunk - 1) / j->chunk, nth);
}

static void matmul(const void *W, int wtype, int rows, int cols, const float *X, int n, float *Y, int ldy, int planes) {
    size_t rb = el_row_bytes(wtype, cols);
    if (rows <= 0 || cols <= 0 || n <= 0 || !rb || (el_is_quant(wtype) && cols % EL_QK)) return;
    el_lock();
    int nth = el_get_threads_locked();
    if (!el_is_quant(wtype)) planes = 1;   /* F16/F32 weights take f32 activations as they are */
    mm_job job = {.m = {W, rb, wtype, rows, cols, n * planes, ldy, X, Y, planes}};
    mm_items(&job, nth, n);
    if (el_is_quant(wtype)) job.m.act = quantize_x(X, n, cols, planes, el_uses_act_ds(wtype), &job.m.act_ds);
    if (job.m.act) el_parallel(mm_task, &job);
    el_unlock();
}

void el_matmul(const void *W, int wtype, int rows, int cols, const float *X, int n, float *Y, int ldy) {
    matmul(W, wtype, rows, cols, X, n, Y, ldy, 1);
}

void el_matmul_hp(const void *W, int wtype, int rows, int cols, const float *X, int n, float *Y, int ldy) {
    matmul(W, wtype, rows, cols, X, n, Y, ldy, 2);
}

/* ---------------- conversions ---------------- */

/* n / 32 GGUF blocks of a quantized type as floats */
static void dequantize_blocks(const void *src, float *y, long n, int type) {
    for (long b = 0; b < n / EL_QK; b++, y += EL_QK) {
        if (type == EL_Q8_0) {
            const el_block_q8_0 *x = (const el_block_q8_0 *)src + b;
            float d = el_f16_to_f32(x->d);
            for (int j = 0; j < 32; j++) y[j] = x->qs[j] * d;
        } else if (type == EL_Q4_0) {
            const el_block_q4_0 *x = (const el_block_q4_0 *)src + b;
            float d = el_f16_to_f32(x->d);
            for (int j = 0; j < 16; j++) {
                y[j] = ((x->qs[j] & 15) - 8) * d;
                y[j + 16] = ((x->qs[j] >> 4) - 8) * d;
            }
        } else if (type == EL_Q4_1) {
            const el_block_q4_1 *x = (const el_block_q4_1 *)src + b;
            float d = el_f16_to_f32(x->d), m = el_f16_to_f32(x->m);
            for (int j = 0; j < 16; j++) {
                y[j] = (x->qs[j] & 15) * d + m;
                y[j + 16] = (x->qs[j] >> 4) * d + m;
            }
        }
    }
}

/* Row r of W (rows of rb bytes, n elements) as floats; repacked types block by block through their GGUF form */
static void dequantize_at(const void *W, int type, size_t rb, long r, float *y, long n) {
    if (!el_is_repacked(type)) {
        el_dequantize_row((const uint8_t *)W + (size_t)r * rb, y, n, type);
        return;
    }
    uint8_t blk[sizeof(el_block_q8_0)];
    for (long b = 0; b < n / EL_QK; b++) {
        el_unpack_block(W, type, rb, r, (int)(n / EL_QK), (int)b, blk);
        dequantize_blocks(blk, y + b * EL_QK, EL_QK, el_base_type(type));
    }
}

void el_dequantize_row(const void *src, float *y, long n, int type) {
    if (type == EL_F32) {
        memcpy(y, src, (size_t)n * 4);
        return;
    }
    if (type == EL_F16) {
        if (el_kern->f16_row) el_kern->f16_row(src, y, n);
        else
            for (long i = 0; i < n; i++) y[i] = el_f16_to_f32(((const uint16_t *)src)[i]);
        return;
    }
    if (el_is_repacked(type)) dequantize_at(src, type, el_row_bytes(type, n), 0, y, n);   /* n: the whole row */
    else dequantize_blocks(src, y, n, type);
}

static inline float inverse(float d) { return d != 0.0f ? 1.0f / d : 0.0f; }

/* roundf for |v| < 2^31 without the libm call, so the block loop vectorizes: v minus its truncation is exact */
static inline int round_half_away(float v) {
    const int t = (int)v;
    const float f = v - (float)t;
    return t + (f >= 0.5f) - (f <= -0.5f);
}

static void to_f16_row(const float *x, uint16_t *y, long n) {
    if (el_kern->to_f16_row) el_kern->to_f16_row(x, y, n);
    else
        for (long i = 0; i < n; i++) y[i] = el_f32_to_f16(x[i]);
}

/* Round-to-nearest quantizers, bit exact with ggml's quantize_row_*_ref. */
void el_quantize_row(const float *x, void *dst, long n, int type) {
    if (type == EL_F32) {
        memcpy(dst, x, (size_t)n * 4);
        return;
    }
    if (type == EL_F16) {
        to_f16_row(x, dst, n);
        return;
    }
    if (type == EL_Q8_0 && el_kern->q8_0_row) {
        el_kern->q8_0_row(x, dst, n);
        return;
    }
    for (long b = 0; b < n / EL_QK; b++, x += EL_QK) {
        if (type == EL_Q8_0) {
            el_block_q8_0 *y = (el_block_q8_0 *)dst + b;
            float amax = 0;
            for (int j = 0; j < 32; j++) amax = fabsf(x[j]) > amax ? fabsf(x[j]) : amax;   /* fmaxf, NaN aside */
            float d = amax / 127.0f, id = inverse(d);
            for (int j = 0; j < 32; j++) y->qs[j] = (int8_t)round_half_away(x[j] * id);
            y->d = el_f32_to_f16(d);
        } else if (type == EL_Q4_0) {
            el_block_q4_0 *y = (el_block_q4_0 *)dst + b;
            float amax = 0, mx = 0;   /* signed value of the first largest magnitude maps to -8 */
            for (int j = 0; j < 32; j++)
                if (fabsf(x[j]) > amax) amax = fabsf(x[j]), mx = x[j];
            float d = mx / -8.0f, id = inverse(d);
            for (int j = 0; j < 16; j++) {
                int lo = (int)(x[j] * id + 8.5f), hi = (int)(x[j + 16] * id + 8.5f);
                y->qs[j] = (uint8_t)((lo < 15 ? lo : 15) | (hi < 15 ? hi : 15) << 4);
            }
            y->d = el_f32_to_f16(d);
        } else if (type == EL_Q4_1) {
            el_block_q4_1 *y = (el_block_q4_1 *)dst + b;
            float lo = x[0], hi = x[0];
            for (int j = 1; j < 32; j++) lo = fminf(lo, x[j]), hi = fmaxf(hi, x[j]);
            float d = (hi - lo) / 15.0f, id = inverse(d);
            for (int j = 0; j < 16; j++) {
                int a = (int)((x[j] - lo) * id + 0.5f), c = (int)((x[j + 16] - lo) * id + 0.5f);
                y->qs[j] = (uint8_t)((a < 15 ? a : 15) | (c < 15 ? c : 15) << 4);
            }
            y->d = el_f32_to_f16(d);
            y->m = el_f32_to_f16(lo);
        }
    }
}

void el_get_rows(const void *W, int wtype, int cols, const int32_t *ids, int n, float *out) {
    size_t rb = el_row_bytes(wtype, cols);
    if (!rb || cols <= 0) return;
    for (int i = 0; i < n; i++) dequantize_at(W, wtype, rb, ids[i], out + (size_t)i * cols, cols);
}

/* ---------------- element-wise kernels ---------------- */

void el_rmsnorm(const float *x, const float *w, int n, int dim, float eps, float *out) {
    for (int i = 0; i < n; i++, x += dim, out += dim) {
        float acc[8] = {0};   /* 8 independent partial sums vectorize at baseline SSE */
        int j = 0;
        for (; j + 8 <= dim; j += 8)
            for (int k = 0; k < 8; k++) acc[k] += x[j + k] * x[j + k];
        float ss = 0;
        for (; j < dim; j++) ss += x[j] * x[j];
        for (int k = 0; k < 8; k++) ss += acc[k];
        float r = 1.0f / sqrtf(ss / (float)dim + eps);
        for (j = 0; j < dim; j++) out[j] = x[j] * r * w[j];
    }
}

#define GATHER_MAX_HD 512   /* head (and rope) dims el_kv_gather and el_rope_cos_sin take */

/* cos / sin of every (position, frequency) pair: cs[i * rope_dim + 2j], cs[i * rope_dim + 2j + 1] for the angle
 * pos[i] * base^(-2j / rope_dim). The frequencies go in `freq` (rope_dim / 2 doubles) once per call, not per position
 * (CR-RoPE turns 3K rows per layer); angles in double: positions reach 1e5+ and f32 would lose the small frequencies'
 * phase */
static void cos_sin_fill(const int32_t *pos, int n, int rope_dim, float freq_base, double *freq, float *cs) {
    const int half = rope_dim / 2;
    for (int j = 0; j < half; j++) freq[j] = pow((double)freq_base, -2.0 * j / rope_dim);
    for (int i = 0; i < n; i++, cs += 2 * half)
        for (int j = 0; j < half; j++) {
            double a = (double)pos[i] * freq[j];
            cs[2 * j] = (float)cos(a);
            cs[2 * j + 1] = (float)sin(a);
        }
}

/* el_rope's table (cos_sin_fill), with its frequencies' scratch after it (the caller frees it) */
float *el_rope_table(int n, int rope_dim, const int32_t *pos, float freq_base) {
    int half = rope_dim / 2;
    float *cs = malloc(sizeof(float) * 2 * half * (size_t)n + sizeof(double) * half);
    if (!cs) return NULL;
    cos_sin_fill(pos, n, rope_dim, freq_base, (double *)(cs + 2 * half * (size_t)n), cs);
    return cs;
}

void el_rope_apply(float *x, int n, int n_heads, int head_dim, int rope_dim, const float *cs_all, int neox) {
    int half = rope_dim / 2;
    for (int i = 0; i < n; i++) {
        const float *cs = cs_all + (size_t)i * half * 2;
        for (int h = 0; h < n_heads; h++) {
            float *v = x + ((size_t)i * n_heads + h) * head_dim;
            for (int j = 0; j < half; j++) {
                int a = neox ? j : 2 * j, b = neox ? j + half : 2 * j + 1;
                float x0 = v[a], x1 = v[b], c = cs[2 * j], s = cs[2 * j + 1];
                v[a] = x0 * c - x1 * s;
                v[b] = x0 * s + x1 * c;
            }
        }
    }
}

void el_rope_cos_sin(const int32_t *pos, int n, int rope_dim, float freq_base, float *cs) {
    if (rope_dim <= 0 || rope_dim % 2 || rope_dim > GATHER_MAX_HD) return;
    double freq[GATHER_MAX_HD / 2];
    cos_sin_fill(pos, n, rope_dim, freq_base, freq, cs);
}

void el_rope(float *x, int n, int n_heads, int head_dim, int rope_dim, const int32_t *pos, float freq_base, int neox) {
    if (!el_rope_applies(rope_dim, head_dim)) return;
    float *cs = el_rope_table(n, rope_dim, pos, freq_base);
    if (!cs) return;
    el_rope_apply(x, n, n_heads, head_dim, rope_dim, cs, neox);
    free(cs);
}

void el_silu_mul(float *gate, const float *up, long n) { el_kern->silu_mul(gate, up, n); }

/* rows of x times the Walsh-Hadamard matrix times norm (dim a power of 2): the table's kernel where it has one */
static void hadamard_rows(float *x, long rows, int dim, float norm) {
    if (el_kern->hadamard && dim >= 8) {
        el_kern->hadamard(x, rows, dim, norm);
        return;
    }
    for (long r = 0; r < rows; r++, x += dim) {
        for (int h = 1; h < dim; h <<= 1)   /* butterflies of the fast Walsh-Hadamard transform */
            for (int i = 0; i < dim; i += 2 * h)
                for (int j = i; j < i + h; j++) {
                    float a = x[j], b = x[j + h];
                    x[j] = a + b;
                    x[j + h] = a - b;
                }
        for (int j = 0; j < dim; j++) x[j] *= norm;
    }
}

void el_hadamard(float *x, long rows, int dim) {
    if (dim <= 0 || (dim & (dim - 1))) return;
    hadamard_rows(x, rows, dim, 1.0f / sqrtf((float)dim));
}

void el_softmax(float *x, int rows, int cols) {
    for (int i = 0; i < rows; i++, x += cols) {
        float mx = -INFINITY;
        for (int j = 0; j < cols; j++) mx = fmaxf(mx, x[j]);
        if (mx == -INFINITY) {   /* nothing visible: all zeros rather than NaN */
            memset(x, 0, sizeof(float) * cols);
            continue;
        }
        float r = 1.0f / el_kern->exp_sum(x, cols, mx);
        for (int j = 0; j < cols; j++) x[j] *= r;
    }
}

/* ---------------- KV append ---------------- */

void el_kv_quantize(const uint16_t *x, void *dst, long n, int type) {
    enum { CHUNK = 1024 };   /* whole blocks of 32 */
    float buf[CHUNK];
    const size_t out_bytes = el_row_bytes(type, CHUNK);
    for (long i = 0; i < n; i += CHUNK) {
        long m = n - i < CHUNK ? n - i : CHUNK;
        el_dequantize_row(x + i, buf, m, EL_F16);
        el_quantize_row(buf, (char *)dst + (size_t)(i / CHUNK) * out_bytes, m, type);
    }
}

/* Where byte p of key row r % EL_KG (rb bytes, blocks of a 2-byte scale and qb value bytes) lies in its group */
static size_t group_at(size_t bb, size_t nb, int r, size_t p) {
    const size_t b = p / bb, i = p % bb;
    return i < 2 ? b * 16 + (size_t)r * 2 + i : nb * 16 + (b * (bb - 2) + i - 2) * EL_KG + (size_t)r;
}

/* group_at's layout, written block by block (a seal groups every key it quantizes: no division per byte) */
void el_kv_group(int type, const void *rows, long n, int hd, void *out) {
    const size_t rb = el_row_bytes(type, hd), bb = el_row_bytes(type, EL_QK), nb = (size_t)hd / EL_QK, qb = bb - 2;
    for (long g = 0; g < n; g += EL_KG) {
        char *o = (char *)out + g * rb;
        for (int r = 0; r < EL_KG; r++) {
            const char *row = (const char *)rows + (g + r) * rb;
            for (size_t b = 0; b < nb; b++, row += bb) {
                o[b * 16 + (size_t)r * 2] = row[0], o[b * 16 + (size_t)r * 2 + 1] = row[1];
                char *vals = o + nb * 16 + b * qb * EL_KG + (size_t)r;
                for (size_t i = 0; i < qb; i++) vals[i * EL_KG] = row[2 + i];
            }
        }
    }
}

void el_kv_ungroup(int type, const void *kg, long j, int n, int hd, void *out) {
    const size_t rb = el_row_bytes(type, hd), bb = el_row_bytes(type, EL_QK), nb = (size_t)hd / EL_QK;
    for (int t = 0; t < n; t++) {
        const long row = j + t;
        const char *g = (const char *)kg + (row - row % EL_KG) * rb;
        for (size_t p = 0; p < rb; p++) ((char *)out)[t * rb + p] = g[group_at(bb, nb, (int)(row % EL_KG), p)];
    }
}

void el_kv_seal_head(const el_kvblock *tail, const el_kvblock *to, int h, int hd) {
    const long values = (long)tail->cap * hd;   /* a head's rows */
    const size_t rb = el_row_bytes(to->dtype, hd);
    char rows[EL_KG * EL_MAX_QROW];   /* 8 quantized keys, then grouped */
    char *k = (char *)to->k + h * to->cap * rb;
    for (int r = 0; r < tail->cap; r += EL_KG) {
        el_kv_quantize((const uint16_t *)tail->k + h * values + (long)r * hd, rows, (long)EL_KG * hd, to->dtype);
        el_kv_group(to->dtype, rows, EL_KG, hd, k + r * rb);
    }
    el_kv_quantize((const uint16_t *)tail->v + h * values, (char *)to->v + h * to->cap * rb, values, to->dtype);
}

void el_kv_seal(el_kvblock *tail, const el_kvblock *to, int n_kv_head, int hd) {
    for (int h = 0; h < n_kv_head; h++) el_kv_seal_head(tail, to, h, hd);
    tail->k = to->k, tail->v = to->v, tail->dtype = to->dtype, tail->cap = to->cap;
}

void el_kv_append_head(const float *x, int hd, int rotate, uint16_t *dst) {
    if (!rotate) {
        to_f16_row(x, dst, hd);
        return;
    }
    float stack[EL_MAX_HD], *buf = hd <= EL_MAX_HD ? stack : malloc(sizeof(float) * hd);
    if (!buf) return;
    memcpy(buf, x, sizeof(float) * hd);
    hadamard_rows(buf, 1, hd, 1.0f / sqrtf((float)hd));
    to_f16_row(buf, dst, hd);
    if (buf != stack) free(buf);
}

void el_kv_append(const float *k, const float *v, const int32_t *pos, int n, int n_kv_head, int hd, int rotate,
                  void *k16, void *v16, int32_t *pos16, int row0, int cap) {
    if (n <= 0 || hd <= 0 || row0 < 0 || row0 + n > cap) return;
    if (rotate && (hd & (hd - 1))) return;
    for (int s = 0; s < 2; s++)
        for (int i = 0; i < n; i++)
            for (int g = 0; g < n_kv_head; g++)
                el_kv_append_head((s ? v : k) + ((size_t)i * n_kv_head + g) * hd, hd, rotate,
                                  (uint16_t *)(s ? v16 : k16) + ((size_t)g * cap + row0 + i) * hd);
    memcpy(pos16 + row0, pos, sizeof(int32_t) * n);
}

/* ---------------- KV gather (compaction) ---------------- */

typedef struct {
    const el_kvblock *blocks;
    const long *start;   /* number of each block's first entry; start[n_blocks] = entries in all */
    int n_blocks, n_kv_head, hd, rotated, keep, rope_dim, neox;
    const int32_t *idx;
    const float *cs;     /* cos / sin per delta d0, d0 + 1, ... (el_rope_cos_sin) */
    int d0, nd;
    float *k, *v;
} gather_ctx;

/* The block holding entry j: the last one whose first entry is <= j (blocks are few: a binary search) */
static int block_of(const long *start, int n_blocks, long j) {
    int lo = 0, hi = n_blocks - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) / 2;
        if (start[mid] <= j) lo = mid; else hi = mid - 1;
    }
    return lo;
}

/* The block holding entry j, and j's row in it */
static const el_kvblock *gather_locate(const gather_ctx *c, long j, int *row) {
    int b = block_of(c->start, c->n_blocks, j);
    *row = (int)(j - c->start[b]);
    return &c->blocks[b];
}

static void gather_task(void *p, int ith, int nth) {
    const gather_ctx *c = p;
    const int hd = c->hd, H = c->n_kv_head;
    const long items = (long)H * c->keep, per = (items + nth - 1) / nth;
    const float norm = 1.0f / sqrtf((float)hd);
    for (long t = ith * per; t < items && t < (ith + 1) * per; t++) {
        const int g = (int)(t / c->keep), i = (int)(t % c->keep);
        int r;
        const el_kvblock *B = gather_locate(c, c->idx[t], &r);
        const size_t rb = el_row_bytes(B->dtype, hd), head = (size_t)g * B->cap * rb;
        float *ko = c->k + ((size_t)i * H + g) * hd, *vo = c->v + ((size_t)i * H + g) * hd;
        char key[EL_MAX_QROW];
        const char *kr = (const char *)B->k + head + r * rb;
        if (el_is_quant(B->dtype)) {   /* grouped keys: the row put back together first */
            el_kv_ungroup(B->dtype, (const char *)B->k + head, r, 1, hd, key);
            kr = key;
        }
        el_dequantize_row(kr, ko, hd, B->dtype);
        el_dequantize_row((const char *)B->v + head + r * rb, vo, hd, B->dtype);
        if (c->rotated) {   /* back to the model's basis: H is its own inverse */
            hadamard_rows(ko, 1, hd, norm);
            hadamard_rows(vo, 1, hd, norm);
        }
        if (c->cs)   /* CR-RoPE: from the entry's position to its rank (the delta was range-checked) */
            el_rope_apply(ko, 1, 1, hd, c->rope_dim, c->cs + (size_t)(i - B->pos[r] - c->d0) * c->rope_dim, c->neox);
    }
}

/* every index inside the blocks, every delta inside the table: 0, else -1 */
static int gather_check(const gather_ctx *c, long entries) {
    for (long t = 0; t < (long)c->n_kv_head * c->keep; t++) {
        if (c->idx[t] < 0 || c->idx[t] >= entries) return -1;
        if (!c->cs) continue;
        int r;
        const el_kvblock *B = gather_locate(c, c->idx[t], &r);
        long d = (long)(t % c->keep) - B->pos[r];
        if (d < c->d0 || d >= (long)c->d0 + c->nd) return -1;
    }
    return 0;
}

int el_kv_gather(const el_kvblock *blocks, int n_blocks, int n_kv_head, int hd, int rotated, const int32_t *idx,
                 int keep, int rope_dim, int neox, const float *cs, int d0, int nd, float *k, float *v) {
    if (n_blocks <= 0 || n_kv_head <= 0 || hd <= 0 || hd > GATHER_MAX_HD || keep < 0 ||
        (cs && (rope_dim <= 0 || rope_dim > hd || rope_dim % 2)) || (rotated && (hd & (hd - 1))))
        return -1;
    long *start = malloc(sizeof(long) * (n_blocks + 1));
    if (!start) return -1;
    start[0] = 0;
    int rc = 0;
    for (int b = 0; b < n_blocks; b++) {
        if (blocks[b].n < 0 || blocks[b].n > blocks[b].cap || !el_row_bytes(blocks[b].dtype, hd)) rc = -1;
        start[b + 1] = start[b] + blocks[b].n;
    }
    gather_ctx c = {blocks, start, n_blocks, n_kv_head, hd, rotated, keep, rope_dim, neox, idx, cs, d0, nd, k, v};
    if (rc == 0) rc = gather_check(&c, start[n_blocks]);
    if (rc == 0) {
        pthread_mutex_lock(&api_mu);
        el_parallel(gather_task, &c);
        pthread_mutex_unlock(&api_mu);
    }
    free(start);
    return rc;
}

/* ---------------- repacked weights (layout: el_repack in kernels.h) ---------------- */

/* Where block b of a repacked row of nb blocks keeps its fields: returns its quantized bytes, sets d and m (Q4_1;
 * else NULL). *shift: -1 where the bytes are the block's own, in GGUF's order (Q8_0, an odd last Q4 block), else the
 * nibble (0 low, 4 high) the block holds in each of the 32 bytes it shares with its pair */
static uint8_t *split_block(const uint8_t *row, int base, int nb, int b, uint8_t **d, uint8_t **m, int *shift) {
    const size_t qb = base == EL_Q8_0 ? 32 : 16;
    uint8_t *r = (uint8_t *)row, *scales = r + nb * qb;
    *d = scales + 2 * b;
    *m = base == EL_Q4_1 ? scales + 2 * (nb + b) : NULL;
    *shift = base == EL_Q8_0 || (nb % 2 && b == nb - 1) ? -1 : 4 * (b & 1);
    return r + (*shift < 0 ? (size_t)b * qb : (size_t)16 * (b & ~1));
}

/* The interleaved layout's (EL_Q4_0X / EL_Q4_1X) fields of row i of the 8-row group at g, block b: d and m (Q4_1;
 * else NULL) set; returns the first of the row's 4 chunks of 4 bytes, 32 bytes apart */
static uint8_t *x_block(const uint8_t *g, int base, int i, int b, uint8_t **d, uint8_t **m) {
    uint8_t *q = (uint8_t *)g + 8 * el_row_bytes(base, EL_QK) * b;
    *d = q + 128 + 2 * i;
    *m = base == EL_Q4_1 ? q + 144 + 2 * i : NULL;
    return q + 4 * i;
}

void el_unpack_block(const uint8_t *W, int type, size_t rb, long r, int nb, int b, uint8_t *blk) {
    const int base = el_base_type(type);
    uint8_t *d, *m, *qs = blk + (base == EL_Q4_1 ? 4 : 2);
    if (el_is_interleaved(type)) {
        const uint8_t *p = x_block(W + (size_t)(r & ~7L) * rb, base, (int)(r & 7), b, &d, &m);
        for (int c = 0; c < 4; c++) memcpy(qs + 4 * c, p + 32 * c, 4);
    } else {
        int sh;
        const uint8_t *p = split_block(W + (size_t)r * rb, base, nb, b, &d, &m, &sh);
        if (sh < 0) memcpy(qs, p, base == EL_Q8_0 ? 32 : 16);
        else
            for (int j = 0; j < 16; j++) qs[j] = (uint8_t)((p[j] >> sh & 15) | (p[j + 16] >> sh & 15) << 4);
    }
    memcpy(blk, d, 2);
    if (m) memcpy(blk + 2, m, 2);
}

/* 8 GGUF rows src -> the interleaved group dst (distinct buffers) */
static void interleave_group(const uint8_t *src, uint8_t *dst, size_t rb, int base, int nb) {
    const size_t bb = el_row_bytes(base, EL_QK), qo = base == EL_Q4_1 ? 4 : 2;
    for (int i = 0; i < 8; i++)
        for (int b = 0; b < nb; b++) {
            const uint8_t *blk = src + i * rb + b * bb;
            uint8_t *d, *m, *p = x_block(dst, base, i, b, &d, &m);
            memcpy(d, blk, 2);
            if (m) memcpy(m, blk + 2, 2);
            for (int c = 0; c < 4; c++) memcpy(p + 32 * c, blk + qo + 4 * c, 4);
        }
}

/* GGUF row src -> repacked row dst (distinct buffers) */
static void repack_row(const uint8_t *src, uint8_t *dst, int base, int nb) {
    const size_t bb = el_row_bytes(base, EL_QK);
    for (int b = 0; b < nb; b++) {
        const uint8_t *blk = src + b * bb, *qs = blk + (base == EL_Q4_1 ? 4 : 2);
        uint8_t *d, *m;
        int sh;
        uint8_t *p = split_block(dst, base, nb, b, &d, &m, &sh);
        memcpy(d, blk, 2);
        if (m) memcpy(m, blk + 2, 2);
        if (sh < 0) {
            memcpy(p, qs, base == EL_Q8_0 ? 32 : 16);
        } else if (sh == 0) {   /* the pair's first block writes both blocks' nibbles */
            const uint8_t *q2 = qs + bb;
            for (int j = 0; j < 16; j++) {
                p[j] = (uint8_t)((qs[j] & 15) | q2[j] << 4);
                p[j + 16] = (uint8_t)(qs[j] >> 4 | (q2[j] & 0xF0));
            }
        }
    }
}

typedef struct {
    const uint8_t *src;
    uint8_t *dst, *buf;   /* dst: src (in place) or a matrix's home; buf: one unit (a row, or 8 interleaved) per thread */
    size_t rb;
    int base, units, nb, interleave;
} repack_job;

#define RELEASE_BYTES (1 << 20)   /* a home's source goes back to the kernel in pieces this large as it is read */

/* Hand the whole pages inside [a, b) back to the kernel (a private file map's clean pages: reading them again
 * would fault the file back in) */
static void release_pages(const uint8_t *a, const uint8_t *b) {
#ifdef MADV_DONTNEED
    static long page;
    if (!page) page = sysconf(_SC_PAGESIZE);
    uintptr_t lo = ((uintptr_t)a + page - 1) / page * page, hi = (uintptr_t)b / page * page;
    if (lo < hi) madvise((void *)lo, hi - lo, MADV_DONTNEED);
#else
    (void)a, (void)b;
#endif
}

static void repack_task(void *p, int ith, int nth) {
    const repack_job *j = p;
    const size_t ub = j->rb * (j->interleave ? 8 : 1);
    uint8_t *buf = j->buf + (size_t)ith * ub;
    const long u0 = (long)j->units * ith / nth, u1 = (long)j->units * (ith + 1) / nth;
    const uint8_t *done = j->src + u0 * ub;   /* the source read so far, not yet released (homes only) */
    for (long u = u0; u < u1; u++) {
        memcpy(buf, j->src + u * ub, ub);
        if (j->interleave) interleave_group(buf, j->dst + u * ub, j->rb, j->base, j->nb);
        else repack_row(buf, j->dst + u * ub, j->base, j->nb);
        const uint8_t *end = j->src + (u + 1) * ub;
        if (j->dst != j->src && (end - done >= RELEASE_BYTES || u + 1 == u1)) release_pages(done, end), done = end;
    }
}

/* Repacks the matrix at src into dst (src itself: in place; else dst takes the same bytes and src's whole pages are
 * released as it goes); returns the new type (type if it stays as it is). Caller holds the lock. */
static int repack_locked(void *src, void *dst, int type, int rows, int cols) {
    if (!el_kern->repacks || !el_is_quant(type) || el_is_repacked(type) || rows <= 0 || cols <= 0 || cols % EL_QK)
        return type;
    const int interleave = type != EL_Q8_0 && rows % 8 == 0;
    repack_job j = {src, dst, NULL, el_row_bytes(type, cols), type, interleave ? rows / 8 : rows, cols / EL_QK,
                    interleave};
    j.buf = malloc(j.rb * (interleave ? 8 : 1) * el_get_threads_locked());
    if (!j.buf) return type;
    el_parallel(repack_task, &j);
    free(j.buf);
    if (dst != src) release_pages(src, (const uint8_t *)src + j.rb * rows);   /* pages that straddled two threads' runs */
    return type + (interleave ? EL_Q4_0X - EL_Q4_0 : EL_Q4_0R - EL_Q4_0);
}

int el_repack(void *W, int type, int rows, int cols) {
    el_lock();
    type = repack_locked(W, W, type, rows, cols);
    el_unlock();
    return type;
}

void el_weight_prepare_locked(el_weight *w) {
    void *dst = w->home ? w->home : w->w;
    const int type = repack_locked(w->w, dst, w->type, w->rows, w->cols);
    if (type != w->type) w->w = dst, w->type = type;
}

void el_weight_prepare(el_weight *w) {
    el_lock();
    el_weight_prepare_locked(w);
    el_unlock();
}

/* ---------------- output layer: 8-bit product, refined where it can matter ---------------- */

/* The bound on |w| in block b of row r of W (rb bytes a row, nb blocks) that the block's scales give
 * (el_weight_l1_ratio) */
static float block_wmax(const uint8_t *W, size_t rb, long r, int type, int nb, int b) {
    const int base = el_base_type(type);
    uint8_t own[sizeof(el_block_q8_0)];
    const uint8_t *blk = W + (size_t)r * rb + (size_t)b * el_row_bytes(type, EL_QK);
    if (el_is_repacked(type)) {
        el_unpack_block(W, type, rb, r, nb, b, own);
        blk = own;
    }
    uint16_t d, m = 0;
    memcpy(&d, blk, 2);
    if (base == EL_Q4_1) memcpy(&m, blk + 2, 2);
    const float ad = fabsf(el_f16_to_f32(d));
    return base == EL_Q8_0 ? 127 * ad : base == EL_Q4_0 ? 8 * ad : 15 * ad + fabsf(el_f16_to_f32(m));
}

void el_row_bounds(const el_mm *m, int r0, int r1, const float *v, float *out) {
    const int nb = m->cols / EL_QK;
    for (int r = r0; r < r1; r++) {
        float s = 0;
        for (int b = 0; b < nb; b++) s += block_wmax(m->W, m->row_bytes, r, m->wtype, nb, b) * v[b];
        out[r] = s;
    }
}

typedef struct {
    const el_weight *w;
    uint8_t *rho;
    atomic_int fail;
} l1_job;

static void l1_task(void *p, int ith, int nth) {
    l1_job *j = p;
    const int cols = j->w->cols, nb = cols / EL_QK, type = j->w->type;
    const size_t rb = el_row_bytes(type, cols);
    float *x = malloc(sizeof(float) * cols);
    if (!x) {
        atomic_store(&j->fail, 1);
        return;
    }
    for (long r = (long)j->w->rows * ith / nth; r < (long)j->w->rows * (ith + 1) / nth; r++) {
        dequantize_at(j->w->w, type, rb, r, x, cols);
        float ratio = 0;
        for (int b = 0; b < nb; b++) {
            float l1 = 0, wmax = block_wmax(j->w->w, rb, r, type, nb, b);
            for (int k = 0; k < EL_QK; k++) l1 += fabsf(x[b * EL_QK + k]);
            if (wmax > 0 && l1 / (EL_QK * wmax) > ratio) ratio = l1 / (EL_QK * wmax);
        }
        /* 1 + 2^-16 covers the float sum of 32 values */
        float q = ceilf(255.0f * ratio * (1.0f + 0x1p-16f));
        j->rho[r] = q > 255 ? 255 : (uint8_t)q;
    }
    free(x);
}

int el_weight_l1_ratio(el_weight *w, uint8_t *rho) {
    if (!el_is_quant(w->type) || w->cols % EL_QK) return -1;
    l1_job j = {w, rho};
    atomic_init(&j.fail, 0);
    el_lock();
    el_parallel(l1_task, &j);
    el_unlock();
    return atomic_load(&j.fail) ? -1 : 0;
}

/* el_logits_refine's passes over the rows after the 8-bit product, each thread over its own whole 4-row tiles (the
 * tiles el_matmul_hp's work items are made of): the rows' bounds scaled and the largest lower bound, then the tiles
 * whose upper bound reaches it recomputed from both planes; per thread, its largest lower bound, its count of rows
 * recomputed and the first largest of them (-1: none). */
typedef struct {
    el_mm hp;
    const uint8_t *rho;
    float *bound, top, lower[EL_MAX_THREADS];
    int refined[EL_MAX_THREADS], best[EL_MAX_THREADS];
} refine_job;

static void tile_range(int rows, int ith, int nth, int *r0, int *r1) {
    const int tiles = (rows + 3) / 4;
    *r0 = tiles * ith / nth * 4;
    *r1 = tiles * (ith + 1) / nth * 4 < rows ? tiles * (ith + 1) / nth * 4 : rows;
}

static void lower_bounds_task(void *p, int ith, int nth) {
    refine_job *j = p;
    int r0, r1;
    tile_range(j->hp.rows, ith, nth, &r0, &r1);
    const float *y = j->hp.Y;
    float top[4] = {-INFINITY, -INFINITY, -INFINITY, -INFINITY};   /* 4 chains: no loop-carried compare */
    for (int r = r0; r < r1; r++) {
        j->bound[r] *= (float)EL_QK / 255.0f * (1.0f + 0x1p-10f) * j->rho[r];
        const float lo = y[r] - j->bound[r];
        top[r & 3] = lo > top[r & 3] ? lo : top[r & 3];
    }
    const float a = top[0] > top[1] ? top[0] : top[1], b = top[2] > top[3] ? top[2] : top[3];
    j->lower[ith] = a > b ? a : b;
}

static void refine_task(void *p, int ith, int nth) {
    refine_job *j = p;
    int r0, r1, refined = 0, best = -1;
    tile_range(j->hp.rows, ith, nth, &r0, &r1);
    for (int r = r0; r < r1; r += 4) {
        const int e = r + 4 < r1 ? r + 4 : r1;
        int hit = 0;
        for (int i = r; i < e; i++) hit |= j->hp.Y[i] + j->bound[i] >= j->top;
        if (!hit) continue;
        el_kern->mm_rows(&j->hp, r, e), refined += e - r;
        for (int i = r; i < e; i++)
            if (best < 0 || j->hp.Y[i] > j->hp.Y[best]) best = i;
    }
    j->refined[ith] = refined, j->best[ith] = best;
}

/* the first largest of y[0..n) (numpy's argmax) */
static int32_t argmax(const float *y, int n) {
    int32_t best = 0;
    for (int i = 1; i < n; i++)
        if (y[i] > y[best]) best = i;
    return best;
}

int el_logits_refine(el_weight *w, const uint8_t *rho, const float *x, float *y, int32_t *best) {
    const int rows = w->rows, cols = w->cols, type = w->type, nb = cols / EL_QK, nbp = el_ds_blocks(nb);
    if (!el_is_quant(type)) {   /* f32 activations: exact already */
        el_matmul(w->w, type, rows, cols, x, 1, y, rows);
        if (best && rows > 0) *best = argmax(y, rows);
        return 0;
    }
    if (rows <= 0 || cols % EL_QK) return -1;
    el_lock();
    const size_t rb = el_row_bytes(type, cols);
    const float *ds = NULL;
    /* q[b]: high, q[nb + b]: residual */
    const el_block_q8a *q = quantize_x(x, 1, cols, 2, el_uses_act_ds(type), &ds);
    float *bound = el_scratch(1, sizeof(float) * ((size_t)rows + nbp));
    if (!q || !bound) {
        el_unlock();
        return -1;
    }
    /* Each product's float sum errs by < (nb + 4) 2^-24 of the sum of its terms' sizes, each <= 32 wmax 127 d_hi */
    float *v = bound + rows;
    const float eps = (float)(nb + 4) * 0x1p-23f;
    for (int b = 0; b < nbp; b++) v[b] = b < nb ? 127.0f * (q[nb + b].d + eps * q[b].d) : 0.0f;
    mm_job job = {.m = {w->w, rb, type, rows, cols, 1, rows, q, y, 1, ds, v, bound}};   /* x's high plane, and bounds */
    mm_items(&job, el_get_threads_locked(), 1);
    el_parallel(mm_task, &job);
    refine_job rj = {.hp = {w->w, rb, type, rows, cols, 2, rows, q, y, 2, ds}, .rho = rho, .bound = bound};
    el_parallel(lower_bounds_task, &rj);
    rj.top = rj.lower[0];
    for (int i = 1; i < el_get_threads_locked(); i++) rj.top = rj.lower[i] > rj.top ? rj.lower[i] : rj.top;
    el_parallel(refine_task, &rj);
    int refined = 0, top = -1;
    for (int i = 0; i < el_get_threads_locked(); i++) {   /* threads in row order: the first largest stays */
        refined += rj.refined[i];
        if (rj.best[i] >= 0 && (top < 0 || y[rj.best[i]] > y[top])) top = rj.best[i];
    }
    el_unlock();
    if (best) *best = top >= 0 ? top : argmax(y, rows);   /* none recomputed: NaN bounds */
    return refined;
}

/* ---------------- fused layer steps ---------------- */

#define EL_MANY 3

/* Products Y_j = X W_j (ldy = rows_j) of up to EL_MANY matrices with the same cols in one pool round: quantized
 * weights share one quantization of X. Each matrix is cut into the same work items as el_matmul's. */
typedef struct {
    el_mm m[EL_MANY];
    int chunk[EL_MANY], first[EL_MANY + 1], count;
    work_runs runs;   /* over the matrices' items in order */
} mm_many_job;

static void mm_many_task(void *p, int ith, int nth) {
    mm_many_job *j = p;
    for (int it; (it = runs_take(&j->runs, ith, nth)) >= 0;) {
        int k = 0;
        while (it >= j->first[k + 1]) k++;
        int r0 = (it - j->first[k]) * j->chunk[k], r1 = r0 + j->chunk[k] < j->m[k].rows ? r0 + j->chunk[k] : j->m[k].rows;
        el_kern->mm_rows(&j->m[k], r0, r1);
    }
}

/* Repacks each weight on first use (el_weight_prepare). Caller holds the lock. */
static void matmul_many(el_weight *const *W, float *const *Y, int count, const float *X, int n) {
    if (n <= 0 || count <= 0 || count > EL_MANY) return;
    int nth = el_get_threads_locked(), cols = W[0]->cols, any_quant = 0, any_ds = 0;
    for (int i = 0; i < count; i++) {
        el_weight_prepare_locked(W[i]);
        any_quant |= el_is_quant(W[i]->type);
        any_ds |= el_uses_act_ds(W[i]->type);
    }
    const void *act = NULL;
    const float *act_ds = NULL;
    if (any_quant && cols > 0 && cols % EL_QK == 0) act = quantize_x(X, n, cols, 1, any_ds, &act_ds);
    mm_many_job job = {.count = 0};
    job.first[0] = 0;
    for (int i = 0; i < count; i++) {
        const el_weight *w = W[i];
        size_t rb = el_row_bytes(w->type, w->cols);
        int quant = el_is_quant(w->type);
        if (w->rows <= 0 || w->cols != cols || cols <= 0 || !rb || (quant && (cols % EL_QK || !act))) continue;
        int c = job.count++;
        job.m[c] = (el_mm){w->w, rb, w->type, w->rows, cols, n, w->rows, quant ? act : X, Y[i], 1, act_ds};
        job.chunk[c] = mm_chunk(w->rows, rb, nth, n);
        job.first[c + 1] = job.first[c] + (w->rows + job.chunk[c] - 1) / job.chunk[c];
    }
    runs_init(&job.runs, job.first[job.count], nth);
    if (n == 1 && job.count) {   /* decode: the weights are laid out in a step's order, the next ones right after */
        const el_mm *last = &job.m[job.count - 1];
        pool_hint(last->W + (size_t)last->rows * last->row_bytes, (size_t)next_bytes);
    }
    if (job.count) el_parallel(mm_many_task, &job);
}

void el_attn_in(const float *x, int n, int dim, const float *norm, float eps,
                el_weight *wq, el_weight *wk, el_weight *wv,
                const int32_t *pos, int n_head, int n_kv_head, int head_dim, int rope_dim, float freq_base, int neox,
                float *h, float *q, float *k, float *v) {
    if (n <= 0) return;
    float *cs = el_rope_applies(rope_dim, head_dim) ? el_rope_table(n, rope_dim, pos, freq_base) : NULL;
    el_attn_in_cs(x, n, dim, norm, eps, wq, wk, wv, cs, n_head, n_kv_head, head_dim, rope_dim, neox, h, q, k, v);
    free(cs);
}

void el_attn_in_cs(const float *x, int n, int dim, const float *norm, float eps, el_weight *wq, el_weight *wk,
                   el_weight *wv, const float *cs, int n_head, int n_kv_head, int head_dim, int rope_dim, int neox,
                   float *h, float *q, float *k, float *v) {
    el_rmsnorm(x, norm, n, dim, eps, h);
    el_weight *W[3] = {wq, wk, wv};
    float *Y[3] = {q, k, v};
    el_lock();
    matmul_many(W, Y, 3, h, n);
    el_unlock();
    if (!cs) return;
    el_rope_apply(q, n, n_head, head_dim, rope_dim, cs, neox);
    el_rope_apply(k, n, n_kv_head, head_dim, rope_dim, cs, neox);
}

void el_attn_out_mlp(float *x, const float *att, int n, int dim, el_weight *wo, const float *norm, float eps,
                     el_weight *gate, el_weight *up, el_weight *down, float *h, float *g, float *u) {
    if (n <= 0) return;
    size_t nx = (size_t)n * dim;
    el_lock();
    matmul_many(&wo, &h, 1, att, n);
    for (size_t i = 0; i < nx; i++) x[i] += h[i];
    el_rmsnorm(x, norm, n, dim, eps, h);
    el_weight *W[2] = {gate, up};
    float *Y[2] = {g, u};
    matmul_many(W, Y, 2, h, n);
    el_kern->silu_mul(g, u, (long)n * gate->rows);
    matmul_many(&down, &h, 1, g, n);
    for (size_t i = 0; i < nx; i++) x[i] += h[i];
    el_unlock();
}
