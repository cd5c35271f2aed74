"""Chunked prefill: a long prompt runs in bounded memory and equals shorter chunking."""
import tracemalloc

import numpy as np

from edgellm.runtime.model import Model


def test_long_prompt_memory_is_bounded_by_chunk_not_length(model_path):
    model = Model(model_path)
    n, chunk = 3000, 512
    ids = np.random.default_rng(0).integers(100, 40000, n).astype(np.int32)
    cache = model.new_cache(n, kv_dtype="q8_0")
    tracemalloc.start()
    model.forward(ids, cache, logits="last", chunk=chunk)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    # everything beyond the KV cache itself is per-chunk scratch: far below one n x n score matrix
    scratch = peak - cache.nbytes()
    assert scratch < 40 * 2**20, f"{scratch / 2**20:.1f} MiB of scratch"
    assert scratch < n * n * 4
    assert len(cache) == n
