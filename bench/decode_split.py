#!/usr/bin/env python
"""Where a decode token's wall time goes: the one-call layer step, the next-token logits, the rest (Python, sampling).

    python bench/decode_split.py [--threads 1] [--kv-dtype q8_0] [--prompt-tokens 512] [--gen-tokens 128] [--rounds 2]

Times the native backend's `step` / `next_logits` / `embed` per generated token (time.perf_counter around each call)
after a random prompt of --prompt-tokens ids, greedy, EOS ignored. The first token (the prompt's prefill) is left out.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import edgellm

PARTS = ("step", "next_logits", "embed")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kv-dtype", default="q8_0")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    llm = edgellm.LLM(args.model, n_threads=args.threads, kv=edgellm.KVConfig(kv_dtype=args.kv_dtype))
    backend = llm.model.backend
    spent, calls = dict.fromkeys(PARTS, 0.0), dict.fromkeys(PARTS, 0)
    for name in PARTS:   # wrap each backend call with a timer
        def timed(*a, _f=getattr(backend, name), _name=name, **k):
            t0 = time.perf_counter()
            try:
                return _f(*a, **k)
            finally:
                spent[_name] += time.perf_counter() - t0
                calls[_name] += 1
        setattr(backend, name, timed)
    ids = [int(i) for i in np.random.default_rng(0).integers(100, 40000, args.prompt_tokens)]
    llm.generate(ids, max_tokens=4, ignore_eos=True)   # warm-up: weights repacked, buffers made
    for _ in range(args.rounds):
        stream = llm.generate(ids, max_tokens=args.gen_tokens + 1, ignore_eos=True, stream=True)
        next(stream)   # the prompt's prefill and first token
        for name in PARTS:
            spent[name], calls[name] = 0.0, 0
        t0 = time.perf_counter()
        for _ in stream:
            pass
        total = time.perf_counter() - t0
        n = calls["next_logits"]   # one per generated token
        per = {name: spent[name] / n * 1e3 for name in PARTS}
        print(f"decode {n / total:6.1f} tok/s, ms per token: total {total / n * 1e3:.3f}, "
              + ", ".join(f"{name} {ms:.3f}" for name, ms in per.items())
              + f", other {(total - sum(spent.values())) / n * 1e3:.3f}")


if __name__ == "__main__":
    main()
