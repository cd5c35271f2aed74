#!/usr/bin/env python
"""Decode with the weights in the huge-page arena against the file map's 4 KiB pages, in one process.

    python bench/hugepages.py [--threads 2] [--rounds 10] [--prompt-tokens 512] [--gen-tokens 64] [--kv-dtype q8_0]

edgellm repacks the weights into an anonymous arena that asks for 2 MiB pages (WeightArena); with
EDGELLM_HUGE_PAGES=0 it repacks them in place in the GGUF file's private map, which the kernel backs with 4 KiB
pages only. This loads the model both ways and alternates decode rounds between the two (which goes first swaps
every round), so the host's drift from minute to minute falls on both alike. It prints each round's tok/s, the ratio
of the medians and the median of the rounds' ratios. `python bench/bandwidth.py --huge-pages` measures the plain read
the same two ways.
"""
from __future__ import annotations

import argparse
import os
import statistics

import numpy as np

import edgellm


def load(huge: bool, threads: int, kv_dtype: str) -> edgellm.LLM:
    saved = os.environ.get("EDGELLM_HUGE_PAGES")
    os.environ["EDGELLM_HUGE_PAGES"] = "1" if huge else "0"
    try:
        return edgellm.LLM("smollm2-135m", n_threads=threads, kv=edgellm.KVConfig(kv_dtype=kv_dtype))
    finally:
        if saved is None:
            del os.environ["EDGELLM_HUGE_PAGES"]
        else:
            os.environ["EDGELLM_HUGE_PAGES"] = saved


def huge_kb() -> int:
    """This process's anonymous memory in huge pages, kB (-1 where the kernel does not say)."""
    try:
        with open("/proc/self/smaps_rollup") as f:
            return next((int(line.split()[1]) for line in f if line.startswith("AnonHugePages:")), -1)
    except OSError:
        return -1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=64)
    ap.add_argument("--kv-dtype", default="q8_0")
    args = ap.parse_args()
    llms = {"4k": load(False, args.threads, args.kv_dtype), "huge": load(True, args.threads, args.kv_dtype)}
    prompt = [int(t) for t in np.random.default_rng(0).integers(100, 40000, args.prompt_tokens)]
    rates: dict[str, list[float]] = {k: [] for k in llms}
    for r in range(args.rounds):
        for name in (("4k", "huge") if r % 2 == 0 else ("huge", "4k")):
            llm = llms[name]
            llm.reset()
            llm.generate(prompt, max_tokens=args.gen_tokens, ignore_eos=True)
            rates[name].append(llm.stats()["decode_tok_s"])
    print(f"weights in huge pages: {huge_kb() / 1024:.0f} MiB of this process (both models loaded, "
          f"{args.threads} thread(s), {args.prompt_tokens}-token prompt, {args.gen_tokens} tokens, {args.kv_dtype} KV)")
    for name, v in rates.items():
        print(f"  {name:4s} decode tok/s: median {statistics.median(v):6.1f}, best {max(v):6.1f}; rounds "
              + " ".join(f"{x:.1f}" for x in v))
    paired = [h / s for h, s in zip(rates["huge"], rates["4k"])]
    print(f"huge / 4k: ratio of medians {statistics.median(rates['huge']) / statistics.median(rates['4k']):.3f}, "
          f"median of the rounds' ratios {statistics.median(paired):.3f}")


if __name__ == "__main__":
    main()
