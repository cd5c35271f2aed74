#!/usr/bin/env python
"""How fast the decode GEMVs stream a token's layer matrices, with and without the pool's per-product handoffs.

    python bench/stream_sync.py [--threads 1 2] [--sweeps 15] [--tree DIR]

A C program (built with the system cc from the library's sources, as bench/tile_cycles.py builds its harness) lays
out 30 layers of SmolLM2-135M's matrices in Q4_1, interleaved as el_repack leaves them (QKV 960 x 576, O 576 x 576,
gate/up 3072 x 576, down 576 x 1536: 66.4 MB, twice L3, so every sweep reads from DRAM), in a step's order in one
huge-page arena, and sweeps them as one token's products, one token's worth of bytes a sweep, three ways:

- `matmul`: el_matmul per product, as a decode step runs them (the activations quantized, one pool job a product);
- `barrier`: one pool job for the whole sweep; each thread takes a fixed share of every product's rows (its half,
  in whole 8-row groups) and meets the other threads at a spin barrier after each product (what a step with the
  products' handoffs but none of the pool's jobs would pay);
- `free`: the same shares with no barrier (the threads' streams never wait on each other: the products' stream
  rate with no handoff at all).

Prints each way's median and best sweep in GB/s (of 66.4 MB a sweep). The gap between `free` and `barrier` is what the handoffs cost the
stream; between `barrier` and `matmul`, the pool's jobs and the serial steps around them.
"""
from __future__ import annotations

import argparse
import subprocess
import tempfile
from pathlib import Path

from tile_cycles import ROOT, build

C_SOURCE = r"""
#define _GNU_SOURCE
#include "kernels.h"
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <immintrin.h>

#define LAYERS 30
#define PRODUCTS 4
static const int ROWS[PRODUCTS] = {960, 576, 3072, 576}, COLS[PRODUCTS] = {576, 576, 576, 1536};

typedef struct {
    el_mm m[LAYERS * PRODUCTS];
    int barrier, read;
    unsigned long sink[64];
    atomic_int arrived, phase;
} sweep;

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* sense-reversing spin barrier over nth threads */
static void barrier_wait(sweep *s, int nth) {
    const int phase = atomic_load_explicit(&s->phase, memory_order_relaxed);
    if (atomic_fetch_add_explicit(&s->arrived, 1, memory_order_acq_rel) == nth - 1) {
        atomic_store_explicit(&s->arrived, 0, memory_order_relaxed);
        atomic_store_explicit(&s->phase, phase + 1, memory_order_release);
        return;
    }
    while (atomic_load_explicit(&s->phase, memory_order_acquire) == phase) __builtin_ia32_pause();
}

/* a plain read of the bytes (4 independent chains of 32-byte loads) */
__attribute__((target("avx2"))) static unsigned long read_bytes(const uint8_t *p, size_t n) {
    __m256i a[4] = {_mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256(), _mm256_setzero_si256()};
    size_t i = 0;
    for (; i + 128 <= n; i += 128)
        for (int k = 0; k < 4; k++) a[k] = _mm256_xor_si256(a[k], _mm256_loadu_si256((const __m256i *)(p + i + 32 * k)));
    for (int k = 1; k < 4; k++) a[0] = _mm256_xor_si256(a[0], a[k]);
    return (unsigned long)_mm256_extract_epi64(a[0], 0) + i;
}

/* thread ith's fixed share of every product: its part of the 8-row groups */
static void sweep_task(void *p, int ith, int nth) {
    sweep *s = p;
    for (int i = 0; i < LAYERS * PRODUCTS; i++) {
        const int groups = s->m[i].rows / 8, r0 = groups * ith / nth * 8, r1 = groups * (ith + 1) / nth * 8;
        if (s->read)
            s->sink[8 * ith] += read_bytes(s->m[i].W + r0 * s->m[i].row_bytes, (size_t)(r1 - r0) * s->m[i].row_bytes);
        else
            el_kern->mm_rows(&s->m[i], r0, r1);
        if (s->barrier && nth > 1) barrier_wait(s, nth);
    }
}

int main(int argc, char **argv) {
    const int threads = atoi(argv[1]), sweeps = atoi(argv[2]);
    el_set_threads(threads);
    size_t total = 0;
    for (int p = 0; p < PRODUCTS; p++) total += (size_t)ROWS[p] * el_row_bytes(EL_Q4_1, COLS[p]);
    total *= LAYERS;
    const size_t huge = 2u << 20;
    char *raw = mmap(NULL, total + huge, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (raw == MAP_FAILED) return 1;
    uint8_t *arena = (uint8_t *)(((size_t)raw + huge - 1) & ~(huge - 1));
    madvise(arena, total, MADV_HUGEPAGE);
    memset(arena, 0x11, total);   /* nibbles 1, scales f16 0x1111 (normal): any bytes are a valid interleaved Q4_1 */
    float x[1536], *y = calloc(3072, sizeof(float));
    for (int i = 0; i < 1536; i++) x[i] = (float)((i * 37) % 101) / 101.0f - 0.5f;
    el_block_q8a act[2][1536 / 32];
    el_kern->quant_act(x, act[0], 576 / 32);
    el_kern->quant_act(x, act[1], 1536 / 32);
    static sweep s;
    uint8_t *w = arena;
    for (int l = 0; l < LAYERS; l++)
        for (int p = 0; p < PRODUCTS; p++) {
            const size_t rb = el_row_bytes(EL_Q4_1, COLS[p]);
            s.m[l * PRODUCTS + p] = (el_mm){w, rb, EL_Q4_1X, ROWS[p], COLS[p], 1, ROWS[p], act[p == 3], y, 1};
            w += ROWS[p] * rb;
        }
    const char *names[4] = {"matmul", "barrier", "free", "read"};
    for (int way = 0; way < 4; way++) {
        double t[64];
        for (int r = 0; r < sweeps && r < 64; r++) {
            const double t0 = now();
            if (way == 0) {
                for (int i = 0; i < LAYERS * PRODUCTS; i++)
                    el_matmul(s.m[i].W, EL_Q4_1X, s.m[i].rows, s.m[i].cols, x, 1, y, s.m[i].rows);
            } else {
                s.barrier = way == 1, s.read = way == 3;
                el_lock();
                el_parallel(sweep_task, &s);
                el_unlock();
            }
            t[r] = now() - t0;
        }
        for (int i = 0; i < sweeps; i++)   /* sort: median and best */
            for (int j = i + 1; j < sweeps; j++)
                if (t[j] < t[i]) { double u = t[i]; t[i] = t[j]; t[j] = u; }
        printf("%d thread(s) %-8s %7.2f GB/s median, %7.2f best (%.0f us a sweep of %.1f MB)\n", threads, names[way],
               total / t[sweeps / 2] * 1e-9, total / t[0] * 1e-9, t[sweeps / 2] * 1e6, total * 1e-6);
    }
    return 0;
}
"""


def measure(tree: Path, threads: int, sweeps: int) -> dict[str, tuple[float, float]]:
    """way -> (median, best) GB/s of `sweeps` sweeps at `threads` threads, tree's sources built by the system cc."""
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([build(tree, C_SOURCE, tmp), str(threads), str(min(sweeps, 64))], capture_output=True,
                             text=True, check=True).stdout
    rates = {}
    for line in out.splitlines():   # "2 thread(s) barrier    75.00 GB/s median,   77.75 best (...)"
        words = line.split()
        rates[words[2]] = (float(words[3]), float(words[6]))
    return rates


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--sweeps", type=int, default=15)
    ap.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose sources are timed")
    args = ap.parse_args()
    for t in args.threads:
        for way, (median, best) in measure(args.tree, t, args.sweeps).items():
            print(f"{t} thread(s) {way:8s} {median:7.2f} GB/s median, {best:7.2f} best")


if __name__ == "__main__":
    main()
