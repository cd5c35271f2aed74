#!/usr/bin/env python
"""What distillation costs in prefill: tokens/s of InfiniPot against plain chunked prefill of the same document,
in one process, the policies taking turns (best of --repeat runs each).

    python bench/distill_cost.py [--lengths 2000 8000] [--budget 1024] [--threads 2]

`full` is plain chunked prefill of the whole document (up to the model's window); `window` is plain chunked
prefill streaming through the same budget (StreamingLLM eviction, no scoring).
"""
import argparse
import time

import edgellm
from edgellm.cli.passkey import FILLER, passkey_prompt

POLICIES = ("full", "window", "infinipot")


def prefill_tok_s(llm, ids) -> float:
    llm.reset()
    t0 = time.perf_counter()
    llm.generate(ids, max_tokens=1)
    return len(ids) / (time.perf_counter() - t0)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lengths", type=int, nargs="+", default=[2000, 8000])
    ap.add_argument("--budget", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    print("| tokens | full tok/s | window tok/s | infinipot tok/s | infinipot / full | infinipot / window |")
    print("|---|---|---|---|---|---|")
    for n in args.lengths:
        llms = {p: edgellm.LLM(n_threads=args.threads, kv=edgellm.KVConfig(policy=p, budget=args.budget),
                               **({"n_ctx": n + 1} if p == "full" else {}))
                for p in POLICIES}
        ids = passkey_prompt(lambda t: llms["full"].tokenize(t, special=False), FILLER, n, 0.5, 12345)
        best = {p: 0.0 for p in POLICIES}
        for _ in range(args.repeat):
            for p, llm in llms.items():
                best[p] = max(best[p], prefill_tok_s(llm, ids))
        f, w, i = (best[p] for p in POLICIES)
        print(f"| {n:,} | {f:.0f} | {w:.0f} | {i:.0f} | {i / f:.0%} | {i / w:.0%} |", flush=True)
        for llm in llms.values():
            llm.close()


if __name__ == "__main__":
    main()
