"""Agreement of our logits with reference log-probs (the parity test and `bench/parity.py`)."""
from __future__ import annotations

import numpy as np


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def parity_metrics(logits: np.ndarray, top_ids: np.ndarray, top_lp: np.ndarray) -> tuple[float, float]:
    """(top-1 agreement, mean KL(ref || ours)) with KL restricted to the reference's top-k tokens,
    both distributions renormalised over those k tokens.
    logits [N, vocab]; top_ids, top_lp [N, k] best first."""
    top1 = float(np.mean(logits.argmax(-1) == top_ids[:, 0]))
    ref = _log_softmax(top_lp.astype(np.float64))
    ours = _log_softmax(np.take_along_axis(logits.astype(np.float64), top_ids.astype(np.int64), axis=-1))
    kl = float(np.mean(np.sum(np.exp(ref) * (ref - ours), axis=-1)))
    return top1, kl
