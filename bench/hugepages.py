#!/usr/bin/env python
"""Decode with the weights in transparent huge pages against the file map's 4 KiB pages, in one process.

    python bench/hugepages.py [--threads 2] [--rounds 10] [--prompt-tokens 512] [--gen-tokens 64] [--kv-dtype q8_0]

edgellm maps the GGUF file privately and repacks the weights in that map, so they live in 4 KiB pages (the kernel
gives a private file map no huge pages). This loads the model twice: once as edgellm does, once with the file's bytes
read into an anonymous private map that asks for huge pages (2 MiB), and alternates decode rounds between the two
(which goes first swaps every round), so the host's drift from minute to minute falls on both alike. It prints each
round's tok/s and the ratio of the medians. `python bench/bandwidth.py --huge-pages` measures the plain read the
same two ways, which the decode bound would have to use if the weights lived in huge pages.
"""
from __future__ import annotations

import argparse
import mmap
import os
import statistics

import numpy as np

import edgellm
import edgellm.formats.gguf as gguf_module


class _HugePageMaps:
    """Stands in for the mmap module inside edgellm.formats.gguf: a file's map becomes an anonymous private copy of
    it that asks for transparent huge pages; everything else is the mmap module's."""

    def __getattr__(self, name):
        return getattr(mmap, name)

    @staticmethod
    def mmap(fileno: int, length: int, access: int = mmap.ACCESS_COPY) -> mmap.mmap:
        size = os.fstat(fileno).st_size
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        if hasattr(mmap, "MADV_HUGEPAGE"):
            m.madvise(mmap.MADV_HUGEPAGE)
        with os.fdopen(os.dup(fileno), "rb") as f:
            f.seek(0)
            f.readinto(memoryview(m))
        return m


def load(huge: bool, threads: int, kv_dtype: str) -> edgellm.LLM:
    saved = gguf_module.mmap
    if huge:
        gguf_module.mmap = _HugePageMaps()
    try:
        return edgellm.LLM("smollm2-135m", n_threads=threads, kv=edgellm.KVConfig(kv_dtype=kv_dtype))
    finally:
        gguf_module.mmap = saved


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
