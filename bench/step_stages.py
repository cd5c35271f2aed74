#!/usr/bin/env python
"""Where a decode token's time goes inside the one-token step (el_forward_layers' one pool job for all layers).

    python bench/step_stages.py [--threads 2] [--kv-dtype q8_0] [--prompt-tokens 512] [--gen-tokens 128] [--rounds 3]

Greedy decoding in runs (as `generate` decodes) after a random prompt, EOS ignored, with the step's stage timing on
(el_step_timing) for the decoded tokens only. Prints, for the best round by tok/s, each thread's microseconds a token
in each stage of the one-token steps (QKV with its norm, RoPE and K/V appends; attention's units; the merge with the
output projection; gate/up; down; each ends with the fetch of the first bytes of the thread's next share,
el_next_bytes), each beside the barrier wait after it, and what a token spent outside the steps (the next-token
logits, sampling, Python at the runs' edges, the KV manager's bookkeeping when a token fills the tails).
The timer reads the clock ~300 times a token (~20 ns each).
"""
from __future__ import annotations

import argparse

import numpy as np

import edgellm
from edgellm.native import ffi, lib
from pool_split import timed_decode   # bench/pool_split.py, beside this file

STAGES = ("qkv", "attention", "wo", "gate/up", "down")


def timed(llm, ids: list[int], gen: int, threads: int) -> dict:
    out = ffi.new(f"double[{lib.EL_STEP_STAGES * threads}]")
    total, steps = timed_decode(llm, ids, gen, lambda on: lib.el_step_timing(on, out if not on else ffi.NULL, threads))
    per = np.array([out[i] for i in range(lib.EL_STEP_STAGES * threads)]).reshape(threads, -1) * 1e6 / steps
    return {"tok/s": gen / total, "total": total * 1e6 / gen, "stages": per, "steps": steps}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-dtype", default="q8_0")
    ap.add_argument("--prompt-tokens", type=int, default=512)
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    ids = [int(i) for i in np.random.default_rng(0).integers(100, 40000, args.prompt_tokens)]
    llm = edgellm.LLM(args.model, n_threads=args.threads, kv=edgellm.KVConfig(kv_dtype=args.kv_dtype))
    llm.generate(ids, max_tokens=4, ignore_eos=True)   # warm-up: weights repacked, buffers made
    best = max((timed(llm, ids, args.gen_tokens, args.threads) for _ in range(args.rounds)), key=lambda r: r["tok/s"])
    llm.close()
    per = best["stages"]
    print(f"{args.threads} thread(s), {args.prompt_tokens}-token prompt, {args.kv_dtype} KV: {best['tok/s']:.1f} tok/s, "
          f"{best['total']:.0f} us a token ({best['steps']} of {args.gen_tokens} tokens in one-token steps)")
    print("us a token   " + " ".join(f"{s:>9} {'wait':>6}" for s in STAGES) + f" {'step':>7} {'outside':>8}")
    for t, row in enumerate(per):
        print(f"  thread {t:<3} " + " ".join(f"{row[2 * i]:9.1f} {row[2 * i + 1]:6.1f}" for i in range(len(STAGES)))
              + f" {row.sum():7.1f} {best['total'] - row.sum():8.1f}")


if __name__ == "__main__":
    main()
