#!/usr/bin/env python
"""Decode speed of two ways of running edgellm, rounds alternating in one process.

    python bench/decode_ab.py --what huge-pages|runs|slabs|simd|prefetch|next|sampling|token [--threads 2] [--rounds 10]
                              [--prompt-tokens 512] [--gen-tokens 64] [--kv-dtype q8_0] [--old-simd avx2]
                              [--old-prefetch 4096] [--old-next 0] [--sampling greedy|chat]

--what huge-pages: the weights in the huge-page arena (WeightArena, the default) against EDGELLM_HUGE_PAGES=0, where
they are repacked in place in the GGUF file's private map, which the kernel backs with 4 KiB pages only.
--what runs: decoding in runs of LLM.run_tokens tokens per native call (the default) against one call per token
(run_tokens = 0).
--what slabs: a quantized cache's full tails gathered into slabs of KVCache.slab_blocks tails (the default) against
a slab per tail (slab_blocks = 1: each kv head's rows in runs of one block).
--what simd: the detected kernel table against --old-simd (default avx2, e.g. on an AVX-512 part), one model, the
table switched before each round.
--what prefetch: the decode GEMVs' software prefetch distance of the detected table (el_prefetch_bytes) against
--old-prefetch bytes, one model, set before each round.
--what next: the bytes of the next decode product that a thread fetches ahead (el_next_bytes, the default) against
--old-next bytes (default 0: none), one model, set before each round.
--what token: one-token steps as one pool job for all layers (el_token_step, the default) against per-layer jobs,
one model, switched before each round.
--what sampling: decoding sampled as `edgellm chat` samples (its temperature, top-k, top-p, min-p, repeat penalty; a
fixed seed) against greedy decoding, one model: what a chat's draws cost.
--sampling chat: every way samples as `edgellm chat` does (its temperature, top-k, top-p, min-p, repeat penalty; a
fixed seed) instead of greedy.
The model is loaded once per way and decode rounds alternate between the two (which goes first swaps every round),
so the host's drift from minute to minute falls on both alike. It prints each round's tok/s, the ratio of the
medians and the median of the rounds' ratios (new / old), and the two ways' median prefill rates (the prompt's).
`python bench/bandwidth.py --huge-pages` measures the plain read over both page sizes.
"""
from __future__ import annotations

import argparse
import os
import statistics

import numpy as np

import edgellm
from edgellm import native as N
from edgellm.cli.common import CHAT_SAMPLING


def load(threads: int, kv_dtype: str, huge_pages: bool = True, run_tokens: int | None = None,
         slab_blocks: int | None = None) -> edgellm.LLM:
    saved = os.environ.get("EDGELLM_HUGE_PAGES")
    os.environ["EDGELLM_HUGE_PAGES"] = "1" if huge_pages else "0"
    try:
        llm = edgellm.LLM("smollm2-135m", n_threads=threads, kv=edgellm.KVConfig(kv_dtype=kv_dtype))
    finally:
        if saved is None:
            del os.environ["EDGELLM_HUGE_PAGES"]
        else:
            os.environ["EDGELLM_HUGE_PAGES"] = saved
    if run_tokens is not None:
        llm.run_tokens = run_tokens
    if slab_blocks is not None:
        llm._cache.slab_blocks = slab_blocks
    return llm


def huge_kb() -> int:
    """This process's anonymous memory in huge pages, kB (-1 where the kernel does not say)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("AnonHugePages:")), -1)
    except OSError:
        return -1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--what", choices=("huge-pages", "runs", "slabs", "simd", "prefetch", "next", "sampling", "token"), required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--kv-dtype", default="q8_0")
    ap.add_argument("--old-simd", default="avx2", choices=sorted(N.SIMD_LEVELS), help="--what simd's old")
    ap.add_argument("--old-prefetch", type=int, default=4096, help="--what prefetch's old, bytes")
    ap.add_argument("--old-next", type=int, default=0, help="--what next's old, bytes")
    ap.add_argument("--sampling", choices=("greedy", "chat"), default="greedy")
    args = ap.parse_args()
    levels = {"new": N.simd_level(), "old": N.simd_level()}
    distances = {"new": N.prefetch_bytes(), "old": N.prefetch_bytes()}
    nexts = {"new": None, "old": None}   # el_next_bytes, set for --what next only
    steps = {"new": N.token_step(), "old": N.token_step()}   # el_token_step: --what token's old is off
    if args.what == "huge-pages":
        llms = {"new": load(args.threads, args.kv_dtype), "old": load(args.threads, args.kv_dtype, huge_pages=False)}
    elif args.what == "runs":
        llms = {"new": load(args.threads, args.kv_dtype), "old": load(args.threads, args.kv_dtype, run_tokens=0)}
    elif args.what == "slabs":
        llms = {"new": load(args.threads, args.kv_dtype), "old": load(args.threads, args.kv_dtype, slab_blocks=1)}
    elif args.what == "next":
        llms = dict.fromkeys(("new", "old"), load(args.threads, args.kv_dtype))
        nexts = {"new": N.next_bytes(), "old": args.old_next}
    elif args.what == "token":
        llms = dict.fromkeys(("new", "old"), load(args.threads, args.kv_dtype))
        steps["old"] = 0
    elif args.what == "sampling":
        llms = dict.fromkeys(("new", "old"), load(args.threads, args.kv_dtype))
    elif args.what == "prefetch":
        llms = dict.fromkeys(("new", "old"), load(args.threads, args.kv_dtype))
        distances["old"] = args.old_prefetch
    else:
        llms = dict.fromkeys(("new", "old"), load(args.threads, args.kv_dtype))
        levels["old"] = N.SIMD_LEVELS[args.old_simd]
        if N.set_simd(levels["old"]) != levels["old"]:
            raise SystemExit(f"no {args.old_simd} kernels on this machine")
    chat = {**CHAT_SAMPLING, "seed": 0}
    sampling = {"new": chat if args.sampling == "chat" or args.what == "sampling" else {},
                "old": chat if args.sampling == "chat" else {}}
    prompt = [int(t) for t in np.random.default_rng(0).integers(100, 40000, args.prompt_tokens)]
    rates: dict[str, list[float]] = {k: [] for k in llms}
    prefill: dict[str, list[float]] = {k: [] for k in llms}
    for r in range(args.rounds):
        for name in (("old", "new") if r % 2 == 0 else ("new", "old")):
            llm = llms[name]
            N.set_simd(levels[name])
            N.prefetch_bytes(distances[name])
            N.token_step(steps[name])
            if nexts[name] is not None:
                N.next_bytes(nexts[name])
            llm.reset()
            llm.generate(prompt, max_tokens=args.gen_tokens, ignore_eos=True, **sampling[name])
            rates[name].append(llm.stats()["decode_tok_s"])
            prefill[name].append(llm.stats()["prefill_tok_s"])
    N.set_simd(levels["new"])
    N.token_step(steps["new"])
    if nexts["new"] is not None:
        N.next_bytes(nexts["new"])
    print(f"{args.what}: new against old, {args.threads} thread(s), {args.prompt_tokens}-token prompt, "
          f"{args.gen_tokens} tokens (new {'chat' if sampling['new'] else 'greedy'}, old {'chat' if sampling['old'] else 'greedy'}), {args.kv_dtype} KV; weights in huge pages: {huge_kb() / 1024:.0f} MiB of the "
          f"process")
    if args.what == "prefetch":
        print(f"  prefetch distance: new {distances['new']} bytes, old {distances['old']}")
    if args.what == "next":
        print(f"  next-product fetch: new {nexts['new']} bytes, old {nexts['old']}")
    for name, v in rates.items():
        print(f"  {name} decode tok/s: median {statistics.median(v):6.1f}, best {max(v):6.1f}; rounds "
              + " ".join(f"{x:.1f}" for x in v))
    paired = [a / b for a, b in zip(rates["new"], rates["old"])]
    print(f"  prefill tok/s: new median {statistics.median(prefill['new']):7.1f}, old "
          f"{statistics.median(prefill['old']):7.1f}; new / old {statistics.median(prefill['new']) / statistics.median(prefill['old']):.3f}")
    print(f"new / old: ratio of medians {statistics.median(rates['new']) / statistics.median(rates['old']):.3f}, "
          f"median of the rounds' ratios {statistics.median(paired):.3f}")


if __name__ == "__main__":
    main()
