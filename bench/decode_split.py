#!/usr/bin/env python
"""Where a decode token's wall time goes: the one-call layer step, the next-token logits, the rest (Python, sampling).

    python bench/decode_split.py [--threads 1] [--kv-dtype q8_0] [--prompt-tokens 512] [--gen-tokens 128] [--rounds 2]
    python bench/decode_split.py --attention --prompt-tokens 4096 ...   # attention's share of a token

Times the native backend's `step` / `next_logits` / `embed` per generated token (time.perf_counter around each call)
after a random prompt of --prompt-tokens ids, greedy, EOS ignored. The first token (the prompt's prefill) is left out.
Greedy runs are off (LLM.run_tokens = 0): a run's tokens come from one native call that has no parts to time.
--attention runs the layers one native call each instead of the one-call step (the same kernels and numerics, plus
~30 Python round trips per token) and times each layer's `el_attention` call, the parts then being layer, attention
(inside layer), next_logits, embed.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

import edgellm
from edgellm.kv import cache as kv_cache

PARTS = ("step", "next_logits", "embed")


class TimedLib:
    """The native library as the KV cache calls it, with el_attention's time and calls added to spent / calls."""

    def __init__(self, lib, spent: dict, calls: dict):
        self._lib, self._spent, self._calls = lib, spent, calls

    def __getattr__(self, name):
        return getattr(self._lib, name)

    def el_attention(self, *a):
        t0 = time.perf_counter()
        try:
            return self._lib.el_attention(*a)
        finally:
            self._spent["attention"] += time.perf_counter() - t0
            self._calls["attention"] += 1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--kv-dtype", default="q8_0")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--attention", action="store_true", help="layer by layer, el_attention timed")
    args = ap.parse_args()
    llm = edgellm.LLM(args.model, n_threads=args.threads, kv=edgellm.KVConfig(kv_dtype=args.kv_dtype))
    llm.run_tokens = 0
    backend = llm.model.backend
    parts = ("layer", "next_logits", "embed") if args.attention else PARTS
    spent, calls = dict.fromkeys(parts + ("attention",), 0.0), dict.fromkeys(parts + ("attention",), 0)
    if args.attention:
        backend.step = lambda *a, **k: False   # the model then calls backend.layer for each layer
        kv_cache.lib = TimedLib(kv_cache.lib, spent, calls)
    for name in parts:   # wrap each backend call with a timer
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
        for name in spent:
            spent[name], calls[name] = 0.0, 0
        t0 = time.perf_counter()
        for _ in stream:
            pass
        total = time.perf_counter() - t0
        n = calls["next_logits"]   # one per generated token
        if calls[parts[0]] != n * (llm.model.config.n_layer if args.attention else 1):
            raise SystemExit(f"{calls[parts[0]]} {parts[0]} calls for {n} tokens: not one per token (and layer)")
        per = {name: spent[name] / n * 1e3 for name in spent if calls[name]}
        att = f" ({spent['attention'] / calls['attention'] * 1e6:.1f} us a layer)" if calls["attention"] else ""
        print(f"decode {n / total:6.1f} tok/s, ms per token: total {total / n * 1e3:.3f}, "
              + ", ".join(f"{name} {ms:.3f}" for name, ms in per.items()) + att
              + f", other {(total - sum(spent[p] for p in parts)) / n * 1e3:.3f}")


if __name__ == "__main__":
    main()
