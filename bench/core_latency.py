#!/usr/bin/env python
"""Core-to-core latency beside the 2-thread read: which placement the host gave the two vCPUs this minute.

    python bench/core_latency.py [--samples 5] [--every 20]

The thread pool hands work between cores ~150 times a decode token (each job's start and end, the activations one
thread quantized and the other reads, the outputs the other thread wrote): each handoff moves cache lines from one
core to the other. A standalone C program (compiled with the system cc) bounces one cache line between two threads
pinned to CPUs 0 and 1 (each waits for the other's write, then writes) and prints the round trip in ns, the median
of 7 runs of 200000 bounces; then bench/bandwidth.py's 2-thread read (the best of 3 passes of 300 ms) runs. Both are
printed every --every seconds, --samples times: on this host the 2-thread read is bimodal (50-55 or 77-85 GB/s), and
the round trip shows whether the fast minutes are those whose vCPUs sit farther apart (a longer round trip: each
handoff costs more).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time

import bandwidth

C_SOURCE = r"""
#define _GNU_SOURCE
#include <pthread.h>
#include <sched.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <time.h>

#define BOUNCES 200000
static _Alignas(64) atomic_long line;

static void pin(int cpu) {
    cpu_set_t s;
    CPU_ZERO(&s);
    CPU_SET(cpu, &s);
    pthread_setaffinity_np(pthread_self(), sizeof s, &s);
}

/* thread `side` waits for the line to hold a value of its parity, then writes the next one */
static void *bounce(void *arg) {
    const long side = (long)arg;
    pin((int)side);
    for (long i = side; i < 2 * BOUNCES; i += 2) {
        while (atomic_load_explicit(&line, memory_order_acquire) != i) {}
        atomic_store_explicit(&line, i + 1, memory_order_release);
    }
    return NULL;
}

static int cmp(const void *a, const void *b) { return (*(const double *)a > *(const double *)b) - (*(const double *)a < *(const double *)b); }

int main(void) {
    double ns[7];
    for (int r = 0; r < 7; r++) {
        pthread_t t;
        struct timespec a, b;
        atomic_store(&line, -1);
        pthread_create(&t, NULL, bounce, (void *)1L);
        pin(0);
        clock_gettime(CLOCK_MONOTONIC, &a);
        atomic_store(&line, 0);
        bounce((void *)0L);
        pthread_join(t, NULL);
        clock_gettime(CLOCK_MONOTONIC, &b);
        ns[r] = ((b.tv_sec - a.tv_sec) * 1e9 + (b.tv_nsec - a.tv_nsec)) / BOUNCES;
    }
    qsort(ns, 7, sizeof ns[0], cmp);
    printf("%.1f\n", ns[3]);
    return 0;
}
"""


def build(tmp: str) -> str:
    src, exe = os.path.join(tmp, "lat.c"), os.path.join(tmp, "lat")
    with open(src, "w") as f:
        f.write(C_SOURCE)
    subprocess.run([os.environ.get("CC", "cc"), "-O2", "-pthread", src, "-o", exe], check=True)
    return exe


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--samples", type=int, default=5)
    ap.add_argument("--every", type=float, default=20.0, help="seconds between samples")
    args = ap.parse_args()
    if os.cpu_count() < 2:
        raise SystemExit("one CPU: no core-to-core latency")
    with tempfile.TemporaryDirectory() as tmp:
        lat, bw = build(tmp), bandwidth.build(tmp)
        for i in range(args.samples):
            if i:
                time.sleep(args.every)
            rt = float(subprocess.run([lat], check=True, capture_output=True, text=True).stdout)
            read = max(bandwidth.read_passes(2, passes=3, ms=300, exe=bw))
            print(f"{time.strftime('%H:%M:%S')}  round trip {rt:6.1f} ns   2-thread read {read:5.1f} GB/s", flush=True)


if __name__ == "__main__":
    main()
