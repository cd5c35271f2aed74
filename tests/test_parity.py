"""Our logits against the HF transformers reference (fp32, weights dequantized from the same GGUF)."""
import numpy as np
import pytest

from edgellm.runtime.model import Model
from edgellm.runtime.parity import parity_metrics


def _metrics(model, ref, snippets):
    res = []
    for s in snippets:
        logits = model.forward(ref["ids"][s], model.new_cache(len(ref["ids"][s])), logits="all")
        res.append(parity_metrics(logits, ref["top_ids"][s], ref["top_lp"][s]))
    return np.mean(res, axis=0)


def test_native_parity(model_path, parity_ref):
    top1, kl = _metrics(Model(model_path, backend="native"), parity_ref, range(len(parity_ref["ids"])))
    print(f"native parity: top-1 {top1:.4f}, KL {kl:.5f}")
    assert top1 >= 0.97
    assert kl <= 0.003


def test_numpy_reference_parity(model_path, parity_ref):
    top1, kl = _metrics(Model(model_path, backend="numpy"), parity_ref, range(len(parity_ref["ids"])))
    print(f"numpy parity: top-1 {top1:.4f}, KL {kl:.2e}")
    assert top1 >= 0.99
    assert kl <= 1e-4


def test_metrics_detect_disagreement(parity_ref):
    """The metric itself: the reference scores perfectly against itself, a shuffled one does not."""
    top_ids, top_lp = parity_ref["top_ids"][0], parity_ref["top_lp"][0]
    logits = np.full((len(top_ids), 49152), -30.0, np.float32)
    np.put_along_axis(logits, top_ids, top_lp, axis=-1)
    assert parity_metrics(logits, top_ids, top_lp) == pytest.approx((1.0, 0.0), abs=1e-9)
    top1, kl = parity_metrics(logits[::-1].copy(), top_ids, top_lp)
    assert top1 < 0.5 and kl > 0.1


def test_q8_0_kv_cache_parity_close_to_f16(model_path, parity_ref):
    model = Model(model_path, backend="native")
    res = {}
    for dtype in ("f16", "q8_0"):
        m = []
        for s in range(len(parity_ref["ids"])):
            ids = parity_ref["ids"][s]
            logits = model.forward(ids, model.new_cache(len(ids), kv_dtype=dtype), logits="all")
            m.append(parity_metrics(logits, parity_ref["top_ids"][s], parity_ref["top_lp"][s]))
        res[dtype] = np.mean(m, axis=0)
    print(f"kv f16 {res['f16']}, kv q8_0 {res['q8_0']}")
    assert abs(res["q8_0"][0] - res["f16"][0]) <= 0.01
