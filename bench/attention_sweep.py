#!/usr/bin/env python
"""Decode attention over a cold KV cache, driven from C: the time a layer, against the time to read its K/V.

    python bench/attention_sweep.py [--keys 4096] [--threads 1 2] [--layers 30] [--sweeps 15] [--type q8_0] [--tree DIR]
                                    [--simd avx2]

A C program built with the system cc from the library's sources (as bench/tile_cycles.py builds its harness; --tree:
another checkout, e.g. a throwaway one whose kernel only loads its K/V) fills --layers layers of --keys quantized
keys and values (SmolLM2-135M's attention: 3 kv heads of 9 query heads, head_dim 64) in slabs of 512 as the KV
manager keeps them, then --sweeps times: reads a 96 MiB buffer (more than any L3 here, as a decode token's weights
evict the cache) and runs one decode query through every layer with el_attention, timing each call. No Python
between the calls, unlike bench/kernels.py's cold line. Prints the median sweep's time a layer and the rate its K/V
bytes went at; set beside bench/bandwidth.py's plain read (what memory allows) and bench/tile_cycles.py's tile in L1
times the keys (what the arithmetic takes). --simd: a table below the detected one, as in tile_cycles.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import tempfile
from pathlib import Path

from tile_cycles import ROOT, SIMD_LEVELS, TYPE_IDS, build

from edgellm.quant import GGMLType, row_bytes

C_SOURCE = r"""
#define _GNU_SOURCE
#include "kernels.h"
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

enum { N_KV = 3, N_HEAD = 9, HD = 64, SLAB = 512 };

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* n rows of hd random values quantized to type (keys then grouped as the KV manager stores them) */
static void *random_rows(int type, long n, int keys) {
    const size_t rb = el_row_bytes(type, HD);
    float *x = malloc(sizeof(float) * n * HD);
    char *rows = malloc(n * rb), *out = malloc(n * rb);
    for (long i = 0; i < n * HD; i++) x[i] = (float)rand() / RAND_MAX - 0.5f;
    el_quantize_row(x, rows, n * HD, type);
    if (keys) el_kv_group(type, rows, n, HD, out);
    else memcpy(out, rows, n * rb);
    free(x), free(rows);
    return out;
}

SIMD_ARG

/* argv: type, keys (a multiple of SLAB), layers, threads, sweeps, SIMD level; prints each sweep's seconds a layer */
int main(int argc, char **argv) {
    if (argc != 7 || use_simd(atoi(argv[6]))) return 1;
    const int type = atoi(argv[1]), keys = atoi(argv[2]), layers = atoi(argv[3]), sweeps = atoi(argv[5]);
    const int nb = keys / SLAB;
    el_set_threads(atoi(argv[4]));
    el_kvblock *blk = malloc(sizeof(el_kvblock) * layers * nb);
    int32_t *pos = malloc(sizeof(int32_t) * keys);
    for (int i = 0; i < keys; i++) pos[i] = i;
    for (int b = 0; b < layers * nb; b++)   /* slab by slab, K then V, as a prefill fills them */
        blk[b] = (el_kvblock){.k = random_rows(type, (long)N_KV * SLAB, 1), .v = random_rows(type, (long)N_KV * SLAB, 0),
                              .pos = pos + b % nb * SLAB, .n = SLAB, .cap = SLAB, .dtype = type};
    const size_t junk_bytes = (size_t)96 << 20;
    volatile char *junk = malloc(junk_bytes);
    memset((char *)junk, 1, junk_bytes);
    float q[N_HEAD * HD], out[N_HEAD * HD], lse[N_HEAD];
    for (int i = 0; i < N_HEAD * HD; i++) q[i] = (float)rand() / RAND_MAX - 0.5f;
    const int32_t qpos = keys;
    for (int s = 0; s < sweeps; s++) {
        for (size_t i = 0; i < junk_bytes; i += 64) junk[i]++;
        double spent = 0;
        for (int l = 0; l < layers; l++) {
            const double t = now();
            el_attention(q, 1, &qpos, N_HEAD, N_KV, HD, 0.125f, blk + l * nb, nb, out, lse);
            spent += now() - t;
        }
        printf("%.9f\n", spent / layers);
    }
    return out[0] != out[0];   /* a NaN output fails the run */
}
"""


def sweep(tree: Path, kv_type: str = "q8_0", keys: int = 4096, layers: int = 30, threads: int = 1,
          sweeps: int = 15, exe: str | None = None, simd: str | None = None) -> list[float]:
    """Seconds a layer of each sweep; exe: the program from build() (default: build tree's now); simd: a table's
    name (None: the detected one)."""
    if keys % 512:
        raise ValueError("keys: a multiple of 512 (the slabs)")
    if exe is None:
        with tempfile.TemporaryDirectory() as tmp:
            return sweep(tree, kv_type, keys, layers, threads, sweeps, build(tree, C_SOURCE, tmp), simd)
    out = subprocess.run([exe, str(TYPE_IDS[kv_type]), str(keys), str(layers), str(threads), str(sweeps),
                          str(SIMD_LEVELS.get(simd, -1))], capture_output=True, text=True, check=True)
    return [float(x) for x in out.stdout.split()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--keys", type=int, default=4096)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--layers", type=int, default=30)
    ap.add_argument("--sweeps", type=int, default=15)
    ap.add_argument("--type", choices=sorted(TYPE_IDS), default="q8_0")
    ap.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose sources are timed")
    ap.add_argument("--simd", choices=sorted(SIMD_LEVELS), help="a SIMD table at or below the detected one")
    args = ap.parse_args()
    kv_bytes = 2 * 3 * args.keys * row_bytes(GGMLType.parse(args.type), 64)   # K and V of 3 kv heads, head_dim 64
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(args.tree, C_SOURCE, tmp)
        for t in args.threads:
            s = sweep(args.tree, args.type, args.keys, args.layers, t, args.sweeps, exe, args.simd)
            med = statistics.median(s)
            print(f"{args.type}{f' ({args.simd})' if args.simd else ''}, {args.keys} keys, {t} thread(s): {med * 1e6:7.1f} us a layer (median of {len(s)} cold "
                  f"sweeps of {args.layers} layers; fastest {min(s) * 1e6:.1f}), K/V read at {kv_bytes / med / 1e9:.2f} GB/s")


if __name__ == "__main__":
    main()
