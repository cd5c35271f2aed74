#!/usr/bin/env python
"""Where a decode token's wall time goes between the thread pool's jobs and the serial steps between them.

    python bench/pool_split.py [--threads 1 2] [--kv-dtype q8_0] [--prompt-tokens 512] [--gen-tokens 128] [--rounds 3]

Greedy decoding in runs (as `generate` decodes) after a random prompt, EOS ignored, with the native pool's timing on
(el_pool_timing) for the decoded tokens only. Per token: the pool's jobs (each product, attention, the logits passes),
the time inside them, of which the calling thread's own share and its wait for the other threads to finish theirs,
and the time between one job's end and the next one's start: the serial steps (norms, activation quantization, RoPE,
the KV append, sampling; and Python at the runs' edges), where at 2 threads the worker idles. The best round by
tok/s is printed for each thread count.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import edgellm
from edgellm.native import ffi, lib


def timed_decode(llm, ids: list[int], gen: int, timer):
    """Decodes gen tokens after ids (greedy runs, EOS ignored), a native timer on for them alone: timer(1) as they
    start, timer(0) once they are done. Returns (seconds, timer(0)'s result)."""
    llm.reset()
    stream = llm.generate(ids, max_tokens=gen + 1, ignore_eos=True, stream=True)
    next(stream)   # the prompt's prefill and first token
    timer(1)
    t0 = time.perf_counter()
    for _ in stream:
        pass
    total = time.perf_counter() - t0
    return total, timer(0)


def split(llm, ids: list[int], gen: int) -> dict:
    out = ffi.new("double[5]")
    total, _ = timed_decode(llm, ids, gen, lambda on: lib.el_pool_timing(on, out if not on else ffi.NULL))
    jobs, in_jobs, own, wait, between = (out[i] for i in range(5))
    ms = 1e3 / gen
    return {"tok/s": gen / total, "total": total * ms, "jobs": jobs / gen, "in jobs": in_jobs * ms,
            "own": own * ms, "wait": wait * ms, "between jobs": between * ms}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--kv-dtype", default="q8_0")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    ids = [int(i) for i in np.random.default_rng(0).integers(100, 40000, args.prompt_tokens)]
    for threads in args.threads:
        llm = edgellm.LLM(args.model, n_threads=threads, kv=edgellm.KVConfig(kv_dtype=args.kv_dtype))
        llm.generate(ids, max_tokens=4, ignore_eos=True)   # warm-up: weights repacked, buffers made
        best = max((split(llm, ids, args.gen_tokens) for _ in range(args.rounds)), key=lambda r: r["tok/s"])
        print(f"{threads} thread(s): {best['tok/s']:.1f} tok/s, per token {best['jobs']:.0f} jobs; ms: total "
              f"{best['total']:.3f}, in jobs {best['in jobs']:.3f} (the caller's share {best['own']:.3f}, its wait for the "
              f"others {best['wait']:.3f}), between jobs {best['between jobs']:.3f}")
        llm.close()


if __name__ == "__main__":
    main()
