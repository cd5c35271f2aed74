#!/usr/bin/env python
"""How exact el_matmul's sums are: on the model's quantized layer matrices, the mean relative error of one token's
product against the float64 product of the same weights and the same 8-bit activations (so only the kernel's float
summation is measured, not the activations' quantization).

    python bench/gemv_error.py [--model PATH] [--matrices 40] [--threads 1]
"""
from __future__ import annotations

import argparse
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from edgellm import native as N  # noqa: E402
from edgellm.formats.gguf import GGUFFile  # noqa: E402
from edgellm.quant import dequantize, dequantize_activations, quantize_activations  # noqa: E402


def relative_error(t, rng) -> tuple[float, str]:
    """(the error of one matrix, the layout the kernel ran)"""
    rows, cols = t.shape
    W = np.array(t.data, copy=True).view(np.uint8)
    exact_w = dequantize(W, t.type, rows * cols).reshape(rows, cols).astype(np.float64)
    x = (rng.standard_normal(cols) * rng.uniform(0.2, 5, cols)).astype(np.float32)   # uneven block scales
    xq = dequantize_activations(quantize_activations(x[None])).reshape(cols).astype(np.float64)
    wt = N.repack(W, t.type, rows, cols)   # the layout the model runs
    y = N.matmul(W, wt, rows, cols, x[None])[0].astype(np.float64)
    exact = exact_w @ xq
    return float(np.mean(np.abs(y - exact)) / np.mean(np.abs(exact))), wt.name


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default=os.path.expanduser("~/.cache/edgellm/SmolLM2-135M-Instruct.Q4_1.gguf"))
    ap.add_argument("--matrices", type=int, default=40)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    N.set_threads(args.threads)
    g = GGUFFile(args.model)
    rng = np.random.default_rng(1)
    mats = [t for name, t in g.tensors.items() if name.startswith("blk.") and len(t.shape) == 2][:args.matrices]
    errs, layouts = zip(*(relative_error(t, rng) for t in mats))
    print(f"{len(mats)} layer matrices (layouts run: {', '.join(sorted(set(layouts)))}): mean relative error "
          f"{np.mean(errs):.3e}, worst matrix {np.max(errs):.3e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
