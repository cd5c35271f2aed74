"""el_forward_layers (every layer in one C call) against the per-layer path: the same logits bit for bit and the
same cache contents, for full caches and a distilling budget cache."""
import numpy as np
import pytest

import edgellm
from edgellm.quant import GGMLType
from edgellm.runtime.model import Model

CHUNKS = [20] + [1] * 50 + [3, 64, 1, 1]   # decode steps across block boundaries, chunks that fit a tail or not


@pytest.fixture(scope="module")
def model(model_path):
    return Model(model_path, n_threads=2)


def _cache(model, kind):
    if kind == "infinipot":
        cache = model.new_budget_cache(edgellm.KVConfig(policy="infinipot", budget=96, compress_ratio=0.5), 96)
        cache.catalyst_ids = [504, 3120, 281, 260]
        return cache
    return model.new_cache(256, kind)


def _stream(model, ids, cache, one_call: bool):
    """Per-chunk last logits; counts the chunks the one-call step took."""
    step, taken = model.backend.step, []
    model.backend.step = (lambda x, pos, c: taken.append(step(x, pos, c)) or taken[-1]) if one_call else \
        (lambda x, pos, c: False)
    try:
        out, s = [], 0
        for n in CHUNKS:
            out.append(model.forward(ids[s:s + n], cache, logits="last", chunk=n))
            s += n
    finally:
        model.backend.step = step
    return np.concatenate(out), sum(taken)


@pytest.mark.parametrize("kind", ["f16", "q8_0", "q4_0", "infinipot"])
def test_one_call_step_equals_layer_by_layer(model, parity_ref, kind):
    ids = np.concatenate(parity_ref["ids"])[:sum(CHUNKS)]
    ref_cache, fast_cache = _cache(model, kind), _cache(model, kind)
    ref, _ = _stream(model, ids, ref_cache, one_call=False)
    fast, steps = _stream(model, ids, fast_cache, one_call=True)
    if kind == "infinipot":
        assert steps >= 50   # the decode steps went through el_forward_layers
    else:   # every chunk that fits its tail, the ones that fill a quantized tail included
        starts = np.cumsum([0] + CHUNKS[:-1])
        assert steps == sum(s % 64 + n <= 64 for s, n in zip(starts, CHUNKS))
    np.testing.assert_array_equal(fast, ref)
    assert len(fast_cache) == len(ref_cache)
    for layer in (0, 29):
        for a, b in zip(fast_cache.dequantized(layer), ref_cache.dequantized(layer)):
            np.testing.assert_array_equal(a, b)
    if kind == "infinipot":
        assert fast_cache.compactions == ref_cache.compactions > 0
        np.testing.assert_array_equal(fast_cache.origin[5], ref_cache.origin[5])


@pytest.mark.parametrize("threads", [1, 3, 5])
def test_one_token_step_at_any_thread_count(model, parity_ref, threads):
    """A one-token step runs every layer in one pool job, each thread its share of every product and its own heads
    (uneven at 3 threads: 9 query and 3 kv heads; 5 threads on this machine's cores: oversubscribed, threads meet at
    barriers): the per-layer path's logits and cache, bit for bit."""
    from edgellm import native as N
    before = N.get_threads()
    N.set_threads(threads)
    try:
        ids = np.concatenate(parity_ref["ids"])[:sum(CHUNKS)]
        ref_cache, fast_cache = _cache(model, "q8_0"), _cache(model, "q8_0")
        ref, _ = _stream(model, ids, ref_cache, one_call=False)
        fast, steps = _stream(model, ids, fast_cache, one_call=True)
    finally:
        N.set_threads(before)
    assert steps > 50
    np.testing.assert_array_equal(fast, ref)
    for a, b in zip(fast_cache.dequantized(29), ref_cache.dequantized(29)):
        np.testing.assert_array_equal(a, b)


def test_slabs_change_the_layout_not_the_numbers(model, parity_ref):
    """A q8_0 cache's tails gathered into slabs (runs of 8 tails a kv head) against a slab per tail: the same logits
    bit for bit, through prefill chunks and one-call decode steps that seal tails into a slab and start the next."""
    ids = np.concatenate(parity_ref["ids"])[:600]
    chunks = [300, 212] + [1] * 88   # decode crosses 512 (the first slab full) and 576 (a tail sealed into the next)
    out = []
    for slab_blocks in (1, 8):
        cache = model.new_cache(640, "q8_0")
        cache.slab_blocks = slab_blocks
        s, logits = 0, []
        for n in chunks:
            logits.append(model.forward(ids[s:s + n], cache, logits="last", chunk=n))
            s += n
        out.append(np.concatenate(logits))
        assert [b.n for b in cache.blocks[0]] == ([64] * 9 if slab_blocks == 1 else [512, 64]) + [24]
    np.testing.assert_array_equal(out[1], out[0])


def test_step_timing_counts_the_one_token_steps(model, parity_ref):
    """el_step_timing (bench/step_stages.py's timer): as many steps as one-token steps ran (every decoded token, the
    one that fills a quantized tail too), each thread's stages non-negative, the stages that compute positive on
    every thread, and their sum within the wall time."""
    import time

    from edgellm.native import ffi, lib
    ids = np.concatenate(parity_ref["ids"])[:80]
    cache = model.new_cache(256, "q8_0")
    model.forward(ids[:20], cache, logits="last")
    threads = 2
    out = ffi.new(f"double[{lib.EL_STEP_STAGES * threads}]")
    lib.el_step_timing(1, ffi.NULL, 0)
    t0 = time.perf_counter()
    for i in range(20, 80):   # the token at 63 fills the first tail
        model.forward(ids[i:i + 1], cache, logits="last")
    wall = time.perf_counter() - t0
    steps = lib.el_step_timing(0, out, threads)
    assert steps == 60 and cache.blocks[0][0].dtype == GGMLType.Q8_0
    stages = np.array([out[i] for i in range(lib.EL_STEP_STAGES * threads)]).reshape(threads, -1)
    assert (stages >= 0).all()
    assert (stages[:, 0::2] > 0).all()   # QKV, attention, wo, gate/up, down
    assert (stages.sum(axis=1) <= wall).all()
    assert lib.el_step_timing(0, out, threads) == 0   # timing off: nothing counted, totals reset
    assert not any(out[i] for i in range(lib.EL_STEP_STAGES * threads))
