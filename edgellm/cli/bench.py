"""Prefill / decode throughput of one model, as `edgellm bench` and for scripts under bench/.

The prompt is a list of exactly N token ids (a fixed English text, repeated and truncated), so
runs are comparable across engines and do not depend on how a tokenizer splits the text.
"""
from __future__ import annotations

import math
from pathlib import Path

from edgellm import native
from edgellm.cli import common

TEXT = (
    "The lighthouse keeper climbed the narrow stairs every evening at dusk, carrying a can of oil "
    "and a cloth for the lens. From the gallery he could see the fishing boats returning to the "
    "harbour, their lamps swaying with the swell, and beyond them the dark line where the sea met "
    "the sky. He kept a log of the weather, the ships that passed and the birds that rested on the "
    "rail, and in the long winter nights he read books about distant cities, mountain railways and "
    "the history of clocks. Nobody in the village remembered a night when the light had failed."
)
WARMUP_PROMPT, WARMUP_GEN = 32, 4


def prompt_ids(llm, n: int) -> list[int]:
    """Exactly `n` token ids of English text."""
    per_copy = len(llm.tokenize(TEXT))
    ids = llm.tokenize(" ".join([TEXT] * (math.ceil(n / per_copy) + 1)))
    return ids[:n]


def _timed_generate(llm, ids: list[int], gen_tokens: int) -> dict:
    llm.reset()  # a cached prefix from the previous run would make prefill look free
    llm.generate(ids, max_tokens=gen_tokens, temperature=0.0, ignore_eos=True)
    return llm.stats()


def measure(llm, ids: list[int], gen_tokens: int, repeat: int = 1) -> dict:
    """Best-of-`repeat` prefill and decode tok/s for `ids` then `gen_tokens` greedy tokens,
    after a short warm-up (first-touch page faults, thread start-up)."""
    _timed_generate(llm, ids[:WARMUP_PROMPT], WARMUP_GEN)
    runs = [_timed_generate(llm, ids, gen_tokens) for _ in range(repeat)]
    last = runs[-1]
    return {
        "prompt_tokens": last["prefill_tokens"],
        "gen_tokens": last["decode_tokens"],
        "prefill_tok_s": max(r["prefill_tok_s"] for r in runs),
        "decode_tok_s": max(r["decode_tok_s"] for r in runs),
        "peak_rss_mb": last["peak_rss_mb"],
        "kv_bytes_per_token": last["kv_bytes_per_token"],
        "kv_bytes": last["kv_bytes"],
        "n_threads": last["n_threads"],
        "repeat": repeat,
    }


def run_bench(model: str | None = None, prompt_tokens: int = 512, gen_tokens: int = 128,
              threads: int | None = None, kv_dtype: str = "f16", context: int | None = None,
              repeat: int = 1) -> dict:
    """Open `model` and measure it. `context` N measures decode after N tokens of context,
    i.e. with a prompt of N tokens (it overrides `prompt_tokens`)."""
    n_prompt = context or prompt_tokens
    llm = common.load_llm(model, threads, kv_dtype, n_ctx=n_prompt + gen_tokens + 16)
    try:
        result = measure(llm, prompt_ids(llm, n_prompt), gen_tokens, repeat)
        info = llm.info()
    finally:
        llm.close()
    # the file name says model and quantization; GGUF general.name is often a training-run label
    # the kernel table that ran (llama.cpp's system_info line says the same of its build)
    return {"model": Path(info["path"]).name, "path": info["path"], "kv_dtype": kv_dtype,
            "kernels": native.SIMD_NAMES[native.simd_level()], **result}


def format_bench(r: dict) -> str:
    return "\n".join([
        f"{r['model']}  threads={r['n_threads']}  kv={r['kv_dtype']}  "
        f"prompt={r['prompt_tokens']}  gen={r['gen_tokens']}  best of {r['repeat']}  kernels={r['kernels']}",
        f"  prefill   {r['prefill_tok_s']:9.1f} tok/s",
        f"  decode    {r['decode_tok_s']:9.1f} tok/s",
        f"  peak RSS  {r['peak_rss_mb']:9.1f} MB",
        f"  KV/token  {r['kv_bytes_per_token']:9.0f} bytes",
    ])
