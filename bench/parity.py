#!/usr/bin/env python
"""Agreement of edgellm's logits with the HF transformers reference, per backend and KV cache type.

    python bench/parity.py [--kv-dtype f16 q8_0 q4_0] [--backend native numpy]
"""
import argparse
from pathlib import Path

import numpy as np

from edgellm.runtime.model import Model
from edgellm.runtime.parity import parity_metrics
from edgellm.runtime.registry import DEFAULT_MODEL, resolve

REF = Path(__file__).resolve().parent.parent / "tests" / "data" / "SmolLM2-135M-Instruct.Q4_1.parity.npz"


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--kv-dtype", nargs="+", default=["f16", "q8_0", "q4_0"])
    ap.add_argument("--backend", nargs="+", default=["native"])
    args = ap.parse_args()
    ref = np.load(REF)
    print("| backend | KV cache | top-1 agreement | KL(ref‖ours), ref top-32 |")
    print("|---|---|---|---|")
    for backend in args.backend:
        model = Model(resolve(DEFAULT_MODEL), backend=backend)
        for dtype in args.kv_dtype if backend == "native" else ["f32"]:
            m = [parity_metrics(model.forward(ids, model.new_cache(len(ids), dtype), logits="all"), ti, tl)
                 for ids, ti, tl in zip(ref["ids"], ref["top_ids"], ref["top_lp"])]
            top1, kl = np.mean(m, axis=0)
            print(f"| {backend} | {dtype} | {top1:.4f} | {kl:.5f} |", flush=True)


if __name__ == "__main__":
    main()
