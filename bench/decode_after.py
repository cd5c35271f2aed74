#!/usr/bin/env python
"""Decode tokens/s after a short and after a long document, one budget cache, one process.

    python bench/decode_after.py [--lengths 1024 32768] [--budget 1024] [--policy infinipot] [--threads 2]

With a budget policy the decode step works on the same ≤ budget entries whatever the document's length.
"""
import argparse

import edgellm
from edgellm.cli.passkey import FILLER, passkey_prompt


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1024, 32768])
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--policy", default="infinipot")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--gen-tokens", type=int, default=64)
    args = ap.parse_args()
    llm = edgellm.LLM(n_threads=args.threads, kv=edgellm.KVConfig(policy=args.policy, budget=args.budget))
    first = None
    print("| document tokens | decode tok/s | vs the first row | peak RSS MB |")
    print("|---|---|---|---|")
    for n in args.lengths:
        ids = passkey_prompt(lambda t: llm.tokenize(t, special=False), FILLER, n, 0.5, 12345)
        llm.reset()
        llm.generate(ids, max_tokens=args.gen_tokens, ignore_eos=True)
        s = llm.stats()
        first = first or s["decode_tok_s"]
        print(f"| {n:,} | {s['decode_tok_s']:.1f} | {s['decode_tok_s'] / first:.0%} | {s['peak_rss_mb']:.0f} |", flush=True)


if __name__ == "__main__":
    main()
