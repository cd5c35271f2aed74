#!/usr/bin/env python
"""Memory read bandwidth, and the decode speed it allows (bytes read per token / bandwidth).

    python bench/bandwidth.py [--threads 1 2] [--mb 512] [--pass-ms 300] [--model PATH] [--context 512 4096]
                              [--kv-dtype q8_0]

A standalone C program (below, compiled with the system cc into a temporary directory) streams a buffer
much larger than the last-level cache with AVX2 loads (SSE2 elsewhere) from 1..N threads, each thread its
own contiguous slice, and reports the best of several passes (STREAM's convention). A pass reads for --pass-ms
(sweeping the slices again as often as that takes): as long as one decode measurement runs (64 tokens take
0.3-0.6 s), because on a shared host the rate moves from one 20 ms sweep to the next and the fastest short sweep
is a rate no decode run keeps up for its whole length. The best single sweep (the old short pass) is printed
beside it. Decode reads every weight once per token plus the KV cache of the context; the bound is those bytes
over the bandwidth of the best long pass.
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile

C_SOURCE = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#if defined(__AVX2__)
#include <immintrin.h>
typedef __m256i vec;
#define LOAD(p) _mm256_load_si256(p)
#define ADD(a, b) _mm256_add_epi64(a, b)
#define SHR(a) _mm256_srli_epi64(a, 1)
#define ZERO() _mm256_setzero_si256()
#else
#include <emmintrin.h>
typedef __m128i vec;
#define LOAD(p) _mm_load_si128(p)
#define ADD(a, b) _mm_add_epi64(a, b)
#define SHR(a) _mm_srli_epi64(a, 1)
#define ZERO() _mm_setzero_si128()
#endif

typedef struct {
    const vec *p;
    size_t n;
    double ms;               /* read for this long (whole sweeps stop at a 1 MiB chunk); 0: one sweep */
    int ops;                 /* vector ALU instructions after each load (a kernel's arithmetic), even */
    long pf;                 /* with ops: software prefetch this many bytes ahead of the loads (0: none) */
    vec sum;
    size_t bytes;
    double t0, t1;
    pthread_barrier_t *bar;
} job;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

static void *reader(void *arg) {
    job *j = arg;
    const size_t chunk = (1 << 20) / sizeof(vec);
    vec a = ZERO(), b = ZERO(), c = ZERO(), d = ZERO();   /* 4 chains: loads, not adds, set the pace */
    pthread_barrier_wait(j->bar);
    j->t0 = now();
    const double until = j->t0 + j->ms * 1e-3;
    for (int done = 0; !done;) {
        for (size_t s = 0; s < j->n && !done; s += chunk) {
            const size_t e = s + chunk < j->n ? s + chunk : j->n;
            if (j->ops == 0) {
                for (size_t i = s; i + 4 <= e; i += 4) {
                    a = ADD(a, LOAD(j->p + i));
                    b = ADD(b, LOAD(j->p + i + 1));
                    c = ADD(c, LOAD(j->p + i + 2));
                    d = ADD(d, LOAD(j->p + i + 3));
                }
            } else {   /* each loaded vector shifted and summed ops / 2 times, four independent chains */
                for (size_t i = s; i + 4 <= e; i += 4) {
                    if (j->pf)   /* the lines these four loads span, pf bytes on (as the decode kernels do) */
                        for (size_t b = 0; b < 4 * sizeof(vec); b += 64)
                            __builtin_prefetch((const char *)(j->p + i) + j->pf + b, 0, 3);
                    vec w0 = LOAD(j->p + i), w1 = LOAD(j->p + i + 1), w2 = LOAD(j->p + i + 2), w3 = LOAD(j->p + i + 3);
                    for (int k = 0; k < j->ops; k += 2) {
                        w0 = SHR(w0), w1 = SHR(w1), w2 = SHR(w2), w3 = SHR(w3);
                        a = ADD(a, w0), b = ADD(b, w1), c = ADD(c, w2), d = ADD(d, w3);
                    }
                }
            }
            j->bytes += (e - s) / 4 * 4 * sizeof(vec);
            done = j->ms > 0 && now() >= until;
        }
        done |= j->ms <= 0;
    }
    j->t1 = now();
    j->sum = ADD(ADD(a, b), ADD(c, d));
    return NULL;
}

#define HUGE_PAGE (2UL << 20)

/* The buffer: heap memory (4 KiB pages, as the weights get, unless transparent huge pages are on for all memory), or
 * with huge an anonymous map on a 2 MiB boundary that asks for them (the kernel may still give small pages: the first
 * line of output says how many kB are huge) */
static vec *buffer(size_t bytes, int huge) {
    if (!huge) return aligned_alloc(64, bytes);
    char *p = mmap(NULL, bytes + HUGE_PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (p == MAP_FAILED) return NULL;
    vec *buf = (vec *)(((unsigned long)p + HUGE_PAGE - 1) & ~(HUGE_PAGE - 1));
#ifdef MADV_HUGEPAGE
    madvise(buf, bytes, MADV_HUGEPAGE);
#endif
    return buf;
}

/* kB of this process's memory in huge pages (AnonHugePages), -1 where the kernel does not say */
static long huge_kb(void) {
    FILE *f = fopen("/proc/self/smaps_rollup", "r");
    char line[256];
    long kb = -1;
    while (f && fgets(line, sizeof line, f))
        if (sscanf(line, "AnonHugePages: %ld kB", &kb) == 1) break;
    if (f) fclose(f);
    return kb;
}

/* argv: threads, MiB, passes, ms per pass (0: one sweep), ALU instructions per load, prefetch distance in bytes,
 * huge pages (0 / 1); prints the buffer's kB in huge pages, then each pass's GB/s (all threads' bytes over the time
 * from the first thread's start to the last one's end) */
int main(int argc, char **argv) {
    if (argc != 8) return 1;
    int nth = atoi(argv[1]), passes = atoi(argv[3]), ops = atoi(argv[5]);
    long pf = atol(argv[6]);
    size_t bytes = (size_t)atol(argv[2]) << 20, n = bytes / sizeof(vec);
    double ms = atof(argv[4]);
    vec *buf = buffer(bytes + pf, atoi(argv[7]));   /* prefetches past the end stay inside the allocation */
    if (!buf || nth < 1 || nth > 64) return 1;
    memset(buf, 1, bytes);   /* fault every page in before timing */
    printf("%ld\n", huge_kb());
    pthread_barrier_t bar;
    pthread_barrier_init(&bar, NULL, nth);
    for (int pass = 0; pass < passes; pass++) {
        pthread_t th[64];
        job jobs[64];
        for (int t = 0; t < nth; t++) {
            jobs[t] = (job){buf + n / nth * t, n / nth, ms, ops, pf, ZERO(), 0, 0, 0, &bar};
            pthread_create(&th[t], NULL, reader, &jobs[t]);
        }
        double t0 = 0, t1 = 0, moved = 0;
        for (int t = 0; t < nth; t++) {
            pthread_join(th[t], NULL);
            t0 = t == 0 || jobs[t].t0 < t0 ? jobs[t].t0 : t0;
            t1 = jobs[t].t1 > t1 ? jobs[t].t1 : t1;
            moved += (double)jobs[t].bytes;
        }
        printf("%.3f\n", moved / (t1 - t0) / 1e9);
    }
    return 0;
}
"""


def build(tmp: str) -> str:
    src, exe = os.path.join(tmp, "bw.c"), os.path.join(tmp, "bw")
    with open(src, "w") as f:
        f.write(C_SOURCE)
    flags = ["-O2", "-pthread"] + (["-mavx2"] if _has_avx2() else [])
    subprocess.run([os.environ.get("CC", "cc"), *flags, src, "-o", exe], check=True)
    return exe


def _has_avx2() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return " avx2" in f.read()
    except OSError:
        return False


def read_passes(threads: int, mb: int = 512, passes: int = 5, ms: float = 0, exe: str | None = None,
                ops: int = 0, prefetch: int = 0, huge: bool = False) -> list[float]:
    """Read bandwidth in GB/s (1e9 bytes/s) of each of `passes` passes over an `mb` MiB buffer, each pass reading for
    `ms` milliseconds (0: one sweep of the buffer), with `ops` vector ALU instructions after each load (shift-add
    pairs: an odd count rounds up) and then, if `prefetch`, a software prefetch that many bytes ahead of each line;
    `huge`: the buffer in transparent huge pages (RuntimeError if the kernel gave none); `exe`: the program build()
    made (default: build it now)."""
    if exe is None:
        with tempfile.TemporaryDirectory() as tmp:
            return read_passes(threads, mb, passes, ms, build(tmp), ops, prefetch, huge)
    out = subprocess.run([exe, str(threads), str(mb), str(passes), str(ms), str(ops), str(prefetch), str(int(huge))],
                         check=True, capture_output=True, text=True).stdout.split()
    if huge and int(out[0]) <= 0:
        raise RuntimeError("the kernel gave the buffer no huge pages (transparent_hugepage disabled or memory too "
                           "fragmented)")
    return [float(x) for x in out[1:]]


def best_read(threads: int, passes: int, ms: float, exe: str) -> float:
    """The best pass, GB/s, of `passes` passes of `ms` ms over a buffer in 4 KiB pages and of as many over one in
    huge pages (where the kernel gives them): edgellm's weights sit in huge pages, so a bound set by the small pages'
    read alone could be lower than the machine allows."""
    rates = read_passes(threads, passes=passes, ms=ms, exe=exe)
    try:
        rates += read_passes(threads, passes=passes, ms=ms, exe=exe, huge=True)
    except RuntimeError:
        pass
    return max(rates)


def bytes_per_token(model: str, context: int, kv_dtype: str) -> tuple[int, int]:
    """(weight bytes, KV bytes) read to decode one token after `context` tokens: every layer's matrices and
    the output matrix (not the embedding table: one row of it), and all K/V rows of the context."""
    from edgellm.formats.gguf import GGUFFile
    from edgellm.kv.cache import DTYPES
    from edgellm.quant.blocks import row_bytes
    from edgellm.runtime.config import ModelConfig
    from edgellm.runtime.weights import Weights

    g = GGUFFile(model)
    cfg = ModelConfig.from_gguf(g)
    w = Weights.from_gguf(g, cfg)
    names = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")
    weights = sum(getattr(lw, n).data.nbytes for lw in w.layers for n in names) + w.output.data.nbytes
    kv = 2 * cfg.n_layer * cfg.n_head_kv * row_bytes(DTYPES[kv_dtype], cfg.head_dim) * context
    return weights, kv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--mb", type=int, default=512, help="buffer size in MiB (far above the last-level cache)")
    ap.add_argument("--passes", type=int, default=5)
    ap.add_argument("--pass-ms", type=float, default=300,
                    help="length of a pass, about one decode measurement (0: one sweep of the buffer)")
    ap.add_argument("--ops", type=int, nargs="*", default=[], metavar="N",
                    help="also read with N vector ALU instructions after each 32-byte load (a kernel's arithmetic "
                         "density): how much of the read a stream that also computes gets")
    ap.add_argument("--prefetch", type=int, nargs="*", default=[0], metavar="BYTES",
                    help="with --ops: software prefetch this far ahead of the loads (0: none; the decode kernels use "
                         "4096), one line of output per distance")
    ap.add_argument("--huge-pages", action="store_true",
                    help="also read a buffer in transparent huge pages (2 MiB) and print its rates beside the plain read")
    ap.add_argument("--model", help="GGUF file: also print the decode bound for it")
    ap.add_argument("--context", type=int, nargs="+", default=[512, 4096])
    ap.add_argument("--kv-dtype", default="q8_0")
    args = ap.parse_args()
    # The bound takes the best pass (STREAM's convention) of passes as long as a decode run; the best single sweep
    # beside it shows how far the host's short bursts go above that
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(tmp)
        long = {t: read_passes(t, args.mb, args.passes, args.pass_ms, exe) for t in args.threads}
        sweeps = {t: read_passes(t, args.mb, args.passes, 0, exe) for t in args.threads}
        for t in args.threads:
            r, w = long[t], sweeps[t]
            print(f"read bandwidth, {t} thread(s): {max(r):6.2f} GB/s (best of {len(r)} passes of {args.pass_ms:g} ms; "
                  f"median {statistics.median(r):.2f}, slowest {min(r):.2f}); single sweeps of {args.mb} MiB: best "
                  f"{max(w):.2f}, median {statistics.median(w):.2f}, slowest {min(w):.2f}")
            if args.huge_pages:
                h = read_passes(t, args.mb, args.passes, args.pass_ms, exe, huge=True)
                print(f"  in huge pages: {max(h):6.2f} GB/s (best), median {statistics.median(h):.2f}")
            for ops in args.ops:
                for pf in args.prefetch:
                    r = read_passes(t, args.mb, args.passes, args.pass_ms, exe, ops, pf)
                    ahead = f", prefetch {pf} B ahead" if pf else ""
                    print(f"  with {ops + ops % 2} ALU instructions per load{ahead}: {max(r):6.2f} GB/s (best), "
                          f"median {statistics.median(r):.2f}")
    if args.model:
        for ctx in args.context:
            wb, kvb = bytes_per_token(args.model, ctx, args.kv_dtype)
            for t in args.threads:
                print(f"decode bound at {ctx} tokens ({args.kv_dtype} KV), {t} thread(s): "
                      f"{(wb + kvb) / 1e6:6.1f} MB/token -> {max(long[t]) * 1e9 / (wb + kvb):6.1f} tok/s "
                      f"(from the best single sweep: {max(sweeps[t]) * 1e9 / (wb + kvb):.1f})")


if __name__ == "__main__":
    sys.exit(main())
