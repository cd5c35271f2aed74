#!/usr/bin/env python
"""What one draw of the sampler (el_sample, through Sampler) costs, on the model's own next-token logits.

    python bench/sample_cost.py [--model smollm2-135m] [--draws 50]

Takes the logits of the last 8 positions of a short English text (LLM.logits) and times --draws draws from each with
greedy decoding, `edgellm chat`'s sampling, a temperature alone (no top-k: the whole vocabulary is weighed) and a
temperature with top-p; the history is the text's tokens. Prints microseconds a draw, the Python call included.
"""
from __future__ import annotations

import argparse
import time

import edgellm
from edgellm.cli.common import CHAT_SAMPLING
from edgellm.runtime.sampling import Sampler, SamplingParams

TEXT = "The three primary colors are red, yellow and blue. In painting, artists mix them to get"
WAYS = {"greedy": {}, "chat": {**CHAT_SAMPLING, "seed": 0}, "temperature 0.8": {"temperature": 0.8, "seed": 0},
        "temperature 1, top-p 0.9": {"temperature": 1.0, "top_p": 0.9, "seed": 0}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--draws", type=int, default=50)
    args = ap.parse_args()
    with edgellm.LLM(args.model, n_threads=1) as llm:
        ids = llm.tokenize(TEXT)
        rows = llm.logits(ids)[-8:]
    for name, kw in WAYS.items():
        s = Sampler(SamplingParams(**kw))
        t0 = time.perf_counter()
        for row in rows:
            for _ in range(args.draws):
                s(row, ids)
        print(f"{name:26s} {(time.perf_counter() - t0) / (len(rows) * args.draws) * 1e6:7.1f} us a draw")


if __name__ == "__main__":
    main()
