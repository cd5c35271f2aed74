#!/usr/bin/env python
"""Cycles per key of one quantized decode-attention tile with its K/V in L1: the kernel's arithmetic alone.

    python bench/tile_cycles.py [--type q8_0|q4_0] [--rows 3] [--reps 10] [--tree DIR] [--simd avx2]

Timings of whole decode steps and of attention over a cold cache move by +-30% on a shared host from one minute to
the next, and an attention kernel that is faster in the core need not be faster from DRAM. This times the active
SIMD table's `attend_quant` on one 64-key tile (head_dim 64, --rows query rows: 3 is SmolLM2's query heads per kv
head) called again and again, the best of --reps runs, in a C program built with the system cc from the library's
sources, one thread. The same program times a loop of independent FMAs, whose rate is 2 a cycle on the x86-64 parts
seen here (Zen 3 and AVX-512 parts alike), and gives the tile's time in those cycles, so that the figure does not
depend on the clock the host happens to run at. --tree: another checkout's sources (e.g. a `git worktree` of an
older commit; checkouts from before grouped keys, whose kernel reads key rows, work too). --simd: a table below the
detected one (e.g. avx2 on an AVX-512 part), to compare the two in one build.
"""
from __future__ import annotations

import argparse
import os
import platform
import subprocess
import tempfile
from pathlib import Path

from edgellm.native import SIMD_LEVELS

ROOT = Path(__file__).resolve().parent.parent

C_SOURCE = r"""
#define _GNU_SOURCE
#include "kernels.h"
#include <immintrin.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

/* Seconds a cycle, from 12 independent chains of 8-wide FMAs at 2 a cycle (the cores with two FMA pipes) */
__attribute__((target("avx2,fma"))) static double fma_cycle(int reps) {
    double best = 1e9;
    for (int r = 0; r < reps; r++) {
        __m256 a[12];
        for (int i = 0; i < 12; i++) a[i] = _mm256_set1_ps(0.001f * i);
        const __m256 b = _mm256_set1_ps(0.9999f), c = _mm256_set1_ps(1e-4f);
        const long n = 2000000;
        double t = now();
        for (long k = 0; k < n; k++) {
            for (int i = 0; i < 12; i++) a[i] = _mm256_fmadd_ps(a[i], b, c);
            __asm__ volatile("" : "+x"(a[0]), "+x"(a[6]));   /* keeps the chains in registers, unmerged */
        }
        t = now() - t;
        __m256 s = a[0];
        for (int i = 1; i < 12; i++) s = _mm256_add_ps(s, a[i]);
        if (_mm256_cvtss_f32(s) == 12345.0f) puts("");
        t /= n * 12 / 2.0;
        best = t < best ? t : best;
    }
    return best;
}

SIMD_ARG

int main(int argc, char **argv) {
    const int type = atoi(argv[1]), rows = atoi(argv[2]), reps = atoi(argv[3]), hd = 64;
    if (use_simd(atoi(argv[4]))) return 2;
    if (!el_kern->attend_quant) {
        fputs("no attend_quant in the active SIMD table\n", stderr);
        return 2;
    }
    const size_t rb = el_row_bytes(type, hd), tb = (size_t)EL_KT * rb;
    char *k = aligned_alloc(64, tb), *kg = aligned_alloc(64, tb), *v = aligned_alloc(64, tb);
    float x[EL_KT * 64];
    srand(1);
    for (int i = 0; i < EL_KT * hd; i++) x[i] = (float)rand() / RAND_MAX - 0.5f;
    el_quantize_row(x, k, EL_KT * hd, type);
    el_quantize_row(x, v, EL_KT * hd, type);
#ifdef EL_KG
    el_kv_group(type, k, EL_KT, hd, kg);
#else   /* a checkout from before grouped keys: its attend_quant reads rows */
#define EL_ST EL_KT
    memcpy(kg, k, tb);
#endif
    int32_t pos[EL_KT], qpos = 1 << 30;
    for (int i = 0; i < EL_KT; i++) pos[i] = i;
    float *q = calloc((size_t)rows * hd, 4), *o = calloc((size_t)rows * hd, 4), *m = calloc(rows, 4), *l = calloc(rows, 4);
    float *s = calloc((size_t)rows * EL_ST + 16, 4), *pd = calloc((size_t)rows * EL_ST + 16, 4);
    for (int i = 0; i < rows * hd; i++) q[i] = x[i] * 0.5f;
    for (int r = 0; r < rows; r++) m[r] = -INFINITY;
    el_qtile T = {.hd = hd, .rows = rows, .gs = rows, .scale = 0.125f, .q = q, .qpos = &qpos, .o = o, .m = m, .l = l,
                  .s = s, .pd = pd};
    const long n = 20000;
    double best = 1e9;
    for (int r = 0; r < reps; r++) {
        double t = now();
        for (long i = 0; i < n; i++)
#ifdef EL_KG
            el_kern->attend_quant(&T, type, kg, 0, v, rb, pos, EL_KT, 0, NULL, NULL, 0);
#else
            el_kern->attend_quant(&T, type, kg, v, rb, pos, EL_KT, 0, NULL, NULL, 0);
#endif
        t = now() - t;
        best = t < best ? t : best;
    }
    const double per_key = best / n / EL_KT, cycle = fma_cycle(reps);
    printf("%.3f ns a key (%d rows), %.2f FMA cycles\n", per_key * 1e9, rows, per_key / cycle);
    return o[0] == 12345.0f;
}
"""


TYPE_IDS = {"q8_0": 8, "q4_0": 2}

# the harnesses' last argument: a SIMD level to run (-1: the detected one), refused if the build does not have it
SIMD_ARG = r"""
static int use_simd(int level) {
    if (level < 0 || el_set_simd(level) == level) return 0;
    fprintf(stderr, "SIMD level %d is not available here\n", level);
    return 1;
}
"""


def build(tree: Path, c_source: str, tmp: str) -> str:
    """c_source (a harness that includes kernels.h) linked with tree's native sources by the system cc, with the
    library's flags, into tmp; returns the program's path."""
    native = tree / "edgellm" / "native"
    sources = sorted(native.glob("*.c"))
    src, exe = os.path.join(tmp, "harness.c"), os.path.join(tmp, "harness")
    with open(src, "w") as f:
        f.write(c_source.replace("SIMD_ARG", SIMD_ARG))
    flags = ["-O3", "-std=c11", "-pthread", "-ffp-contract=off", "-fno-math-errno", f"-I{native}"]
    subprocess.run([os.environ.get("CC", "cc"), *flags, src, *map(str, sources), "-o", exe, "-lm"], check=True)
    return exe


def measure(tree: Path, kv_type: str = "q8_0", rows: int = 3, reps: int = 10,
            simd: str | None = None) -> tuple[float, float]:
    """(ns, FMA cycles) a key and kv head of the tile, with tree's sources built by the system cc; simd: a table's
    name (None: the detected one)."""
    with tempfile.TemporaryDirectory() as tmp:
        exe = build(tree, C_SOURCE, tmp)
        out = subprocess.run([exe, str(TYPE_IDS[kv_type]), str(rows), str(reps), str(SIMD_LEVELS.get(simd, -1))],
                             capture_output=True, text=True, check=True)
    ns, cycles = out.stdout.split(" ns a key")[0], out.stdout.split("), ")[1].split(" FMA")[0]
    return float(ns), float(cycles)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--type", choices=["q8_0", "q4_0"], default="q8_0")
    ap.add_argument("--rows", type=int, default=3)
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--tree", type=Path, default=ROOT, help="the checkout whose sources are timed")
    ap.add_argument("--simd", choices=sorted(SIMD_LEVELS), help="a SIMD table at or below the detected one")
    args = ap.parse_args()
    if platform.machine() not in ("x86_64", "AMD64"):
        raise SystemExit("bench/tile_cycles.py: x86-64 only (its cycle comes from AVX2 FMAs)")
    ns, cycles = measure(args.tree, args.type, args.rows, args.reps, args.simd)
    print(f"{args.type} tile{f' ({args.simd})' if args.simd else ''}: {ns:.2f} ns a key and kv head "
          f"({args.rows} query rows), {cycles:.1f} FMA cycles")


if __name__ == "__main__":
    main()
