"""Passkey retrieval through a KV budget: `edgellm bench passkey`.

A 5-digit key is hidden at a given depth of a haystack of N tokens; the model is asked for it at
the end (raw text, greedy) and must say it within its first ANSWER_TOKENS tokens; it then goes on
to DECODE_TOKENS tokens so that decode speed includes distillation as a long generation meets it.
Each (policy, length) runs in its own child process so that its peak RSS is its own.
"""
from __future__ import annotations

import json
import random
import subprocess
import sys
import time

from edgellm.runtime.memory import peak_rss_mb

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
NEEDLE = " The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"
ANSWER_TOKENS, DECODE_TOKENS = 12, 64


def passkey_prompt(tokenize, haystack: str, n_tokens: int, depth: float, key: int) -> list[int]:
    """Exactly n_tokens ids: intro, haystack (repeated as needed) with the needle at `depth`, question."""
    intro, needle, question = tokenize(INTRO), tokenize(NEEDLE.format(key=key)), tokenize(QUESTION)
    body = n_tokens - len(intro) - len(needle) - len(question)
    if body <= 0:
        raise ValueError(f"{n_tokens} tokens cannot hold the passkey prompt")
    hay = tokenize(haystack)
    hay = hay * (body // len(hay) + 1)
    at = int(body * depth)
    return intro + hay[:at] + needle + hay[at:body] + question


def passkey_keys(seed: int, n: int) -> list[int]:
    """The 5-digit keys hidden at n depths, one per depth, drawn from `seed`."""
    rng = random.Random(seed)
    return [rng.randrange(10000, 100000) for _ in range(n)]


def run_case(spec: dict) -> dict:
    """One policy and length over every depth, in this process."""
    import edgellm
    options = spec.get("kv_options", {}) if spec["policy"] != "full" else {}
    kv = edgellm.KVConfig(policy=spec["policy"], budget=spec["budget"], kv_dtype=spec["kv_dtype"], **options)
    llm = edgellm.LLM(spec["model"], n_threads=spec["threads"], kv=kv,
                      **({"n_ctx": spec["length"] + DECODE_TOKENS} if spec["policy"] == "full" else {}))
    haystack = open(spec["text"]).read() if spec["text"] else FILLER
    hits, prefill, decode = [], [], []
    for depth, key in zip(spec["depths"], passkey_keys(spec["seed"], len(spec["depths"]))):
        ids = passkey_prompt(lambda t: llm.tokenize(t, special=False), haystack, spec["length"], depth, key)
        llm.reset()
        pieces = list(llm.generate(ids, max_tokens=DECODE_TOKENS, ignore_eos=True, stream=True))
        s = llm.stats()
        hits.append(str(key) in "".join(pieces[:ANSWER_TOKENS]))
        prefill.append(s["prefill_tok_s"])
        decode.append(s["decode_tok_s"])
    return {"accuracy": sum(hits) / len(hits), "hits": hits, "prefill_tok_s": sum(prefill) / len(prefill),
            "decode_tok_s": sum(decode) / len(decode), "peak_rss_mb": peak_rss_mb()}


def run_table(model, lengths, policies, depths, budget, kv_dtype="f16", threads=None, text=None, seed=0,
              window=8192, progress=sys.stderr, kv_options=None) -> list[dict]:
    rows = []
    for length in lengths:
        for policy in policies:
            spec = dict(model=model, policy=policy, length=length, depths=depths, budget=budget, kv_dtype=kv_dtype,
                        threads=threads, text=text, seed=seed, kv_options=kv_options or {})
            row = dict(length=length, policy=policy)
            if policy == "full" and length + DECODE_TOKENS > window:
                row["skipped"] = f"beyond the model's {window}-token window"
            else:
                t0 = time.time()
                row.update(_child(spec))
                row["seconds"] = time.time() - t0
            rows.append(row)
            if progress:
                progress.write(format_row(row) + "\n")
                progress.flush()
    return rows


def _child(spec: dict) -> dict:
    proc = subprocess.run([sys.executable, "-m", "edgellm.cli.passkey", json.dumps(spec)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"passkey case {spec['policy']} @ {spec['length']} failed:\n{proc.stderr.strip()}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


HEADER = "| context | policy | accuracy | keys found (by depth) | prefill tok/s | decode tok/s | peak RSS MB |"


def format_row(r: dict) -> str:
    if "skipped" in r:
        return f"| {r['length']:,} | {r['policy']} | cannot run: {r['skipped']} | | | | |"
    found = " ".join("✓" if h else "✗" for h in r["hits"])
    return (f"| {r['length']:,} | {r['policy']} | {r['accuracy']:.0%} | {found} | {r['prefill_tok_s']:.0f} | "
            f"{r['decode_tok_s']:.1f} | {r['peak_rss_mb']:.0f} |")


if __name__ == "__main__":
    print(json.dumps(run_case(json.loads(sys.argv[1]))))
