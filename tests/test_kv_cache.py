"""The KV manager: block layout, one-time quantization, truncation, and what attention reads."""
import numpy as np
import pytest

from edgellm.kv.cache import KVCache
from edgellm.native.reference import attention as ref_attention
from edgellm.quant.blocks import GGMLType, group_keys, quantize

H, D, BS = 3, 64, 32


def _fill(cache, n, seed=0):
    rng = np.random.default_rng(seed)
    k = rng.standard_normal((n, H, D)).astype(np.float32)
    v = rng.standard_normal((n, H, D)).astype(np.float32)
    cache.append(0, k, v, np.arange(len(cache), len(cache) + n, dtype=np.int32))
    return k, v


def _stored(cache, which):
    """What the cache holds for layer 0, in the model's basis -> [n, H, D]."""
    k, v, _ = cache.dequantized(0)
    return (k if which == "k" else v).transpose(1, 0, 2)


@pytest.mark.parametrize("dtype,tol", [("f16", 2e-3), ("q8_0", 2e-2), ("q4_0", 0.3)])
def test_blocks_quantized_once_when_full(dtype, tol):
    cache = KVCache(1, H, D, max_tokens=200, kv_dtype=dtype, block_size=BS)
    k1, v1 = _fill(cache, 40)
    k2, v2 = _fill(cache, 50, seed=1)
    blocks = cache.blocks[0]
    if dtype == "f16":   # f16 tails stay as they filled
        assert [b.dtype for b in blocks] == [GGMLType.F16] * 3 and [b.n for b in blocks] == [32, 32, 26]
    else:   # both full tails quantized into one slab, the third still f16
        assert [b.dtype for b in blocks] == [GGMLType[dtype.upper()], GGMLType.F16]
        assert [b.n for b in blocks] == [64, 26] and blocks[0].cap == BS * KVCache.slab_blocks
    np.testing.assert_allclose(_stored(cache, "k"), np.concatenate([k1, k2]), atol=tol * 4, rtol=0)
    assert np.abs(_stored(cache, "v") - np.concatenate([v1, v2])).mean() < tol
    assert len(cache) == 90


@pytest.mark.parametrize("dtype", ["q8_0", "q4_0"])
def test_full_block_is_the_reference_quantization_of_its_f16_rows(dtype):
    """The one-time conversion (el_kv_seal, which el_forward_layers shares) is ggml's quantizer applied to
    the f16 rows the tail held (head_dim 96: no rotation, so those rows are the inputs rounded to f16), the keys
    then grouped as the numpy twin groups them."""
    d, t = 96, GGMLType[dtype.upper()]
    cache = KVCache(1, H, d, max_tokens=BS, kv_dtype=dtype, block_size=BS)
    rng = np.random.default_rng(3)
    k, v = (rng.standard_normal((BS, H, d)).astype(np.float32) * 4 for _ in range(2))
    cache.append(0, k, v, np.arange(BS, dtype=np.int32))
    blk = cache.blocks[0][0]
    assert blk.dtype == t and not cache.rotated
    for x, stored, keys in ((k, blk.k, True), (v, blk.v, False)):
        rows = x.transpose(1, 0, 2).astype(np.float16).astype(np.float32)   # [H, BS, d], as the block lays them out
        want = quantize(rows.ravel(), t)
        if keys:
            want = group_keys(want, t, d)
        np.testing.assert_array_equal(stored[:, :BS].ravel(), want.ravel())


def test_bytes_per_token():
    for dtype, per_row in (("f16", 128), ("q8_0", 68), ("q4_0", 36)):
        assert KVCache(30, 3, 64, 64, dtype).bytes_per_token() == 2 * 30 * 3 * per_row


def _attend_cache(cache, q, q_pos):
    out, lse = np.empty_like(q), np.empty(q.shape[:2], np.float32)
    cache.attend(0, q.copy(), q_pos, out, lse, 1 / np.sqrt(D))
    return out, lse


def _f32_blocks(k, v):
    return [(k.transpose(1, 0, 2).copy(), v.transpose(1, 0, 2).copy(), np.arange(len(k), dtype=np.int32), len(k), 0)]


@pytest.mark.parametrize("dtype,tol", [("f16", 2e-3), ("q8_0", 2e-2), ("q4_0", 0.15)])
def test_attend_equals_attention_over_what_is_stored(dtype, tol):
    cache = KVCache(1, H, D, 200, dtype, BS)
    k, v = _fill(cache, 75)
    q = np.random.default_rng(3).standard_normal((4, 9, D)).astype(np.float32)
    q_pos = np.array([10, 40, 70, 74], np.int32)
    out, lse = _attend_cache(cache, q, q_pos)
    # exact up to float rounding against the values the cache holds (rotation undone)...
    ref_out, ref_lse = ref_attention(q, q_pos, H, _f32_blocks(_stored(cache, "k"), _stored(cache, "v")), 1 / np.sqrt(D))
    np.testing.assert_allclose(out, ref_out, atol=3e-2 if dtype != "f16" else 2e-3)
    np.testing.assert_allclose(lse, ref_lse, atol=3e-2 if dtype != "f16" else 2e-3)
    # ...and close to attention over the original f32 keys and values
    exact_out, _ = ref_attention(q, q_pos, H, _f32_blocks(k, v), 1 / np.sqrt(D))
    assert np.abs(out - exact_out).mean() < tol


def test_rotation_reduces_quantization_error():
    """Keys with an outlier channel: the rotated q8_0 cache keeps them far better than plain blocks would."""
    from edgellm.quant.blocks import dequantize, quantize
    rng = np.random.default_rng(7)
    k = rng.standard_normal((64, H, D)).astype(np.float32)
    k[..., 5] *= 40  # an outlier channel, as real keys have
    plain = dequantize(quantize(k.reshape(-1), GGMLType.Q8_0), GGMLType.Q8_0, k.size).reshape(k.shape)
    cache = KVCache(1, H, D, 64, "q8_0", BS)
    cache.append(0, k, k, np.arange(64, dtype=np.int32))
    assert cache.rotated
    err_rot, err_plain = np.abs(_stored(cache, "k") - k).mean(), np.abs(plain - k).mean()
    assert err_rot < 0.5 * err_plain


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_truncate_then_append_matches_straight_fill(dtype):
    straight = KVCache(1, H, D, 200, dtype, BS)
    k, v = _fill(straight, 70)
    cut = KVCache(1, H, D, 200, dtype, BS)
    _fill(cut, 70, seed=9)  # different tokens past the cut
    cut.truncate(0)
    cut.append(0, k[:40], v[:40], np.arange(40, dtype=np.int32))
    cut.truncate(35)  # cuts inside a quantized block: it comes back as an f16 tail
    assert len(cut) == 35 and [b.n for b in cut.blocks[0]] == [32, 3]
    cut.append(0, k[35:], v[35:], np.arange(35, 70, dtype=np.int32))
    q = np.random.default_rng(4).standard_normal((1, 9, D)).astype(np.float32)
    q_pos = np.array([69], np.int32)
    np.testing.assert_allclose(_attend_cache(cut, q, q_pos)[0], _attend_cache(straight, q, q_pos)[0], atol=0.02)


def test_slabs_hold_runs_of_tails_and_truncate_inside_them():
    """Full tails of a quantized cache go into slabs of slab_blocks tails (a kv head's rows in one run); a cut inside
    a slab keeps its whole tails and turns the rest back into an f16 tail, and filling on matches a straight fill."""
    slab = BS * KVCache.slab_blocks
    straight = KVCache(1, H, D, 4 * slab, "q8_0", BS)
    k, v = _fill(straight, 2 * slab + 2 * BS + 24)
    assert [b.n for b in straight.blocks[0]] == [slab, slab, 2 * BS, 24]
    assert [b.cap for b in straight.blocks[0]] == [slab, slab, slab, BS]
    assert [b.dtype for b in straight.blocks[0]] == [GGMLType.Q8_0] * 3 + [GGMLType.F16]
    np.testing.assert_array_equal(straight.dequantized(0)[2], np.arange(len(straight)))
    cut = KVCache(1, H, D, 4 * slab, "q8_0", BS)
    cut.append(0, k, v, np.arange(len(k), dtype=np.int32))
    cut.truncate(slab + BS + 5)
    assert [b.n for b in cut.blocks[0]] == [slab, BS, 5] and cut.blocks[0][-1].dtype == GGMLType.F16
    n, kept, full = slab + BS + 5, cut.dequantized(0)[0], straight.dequantized(0)[0]
    np.testing.assert_array_equal(kept[:, :slab + BS], full[:, :slab + BS])   # whole tails: the same bytes
    np.testing.assert_allclose(kept[:, slab + BS:], full[:, slab + BS:n], atol=2e-3)   # the rest, as f16
    cut.append(0, k[n:], v[n:], np.arange(n, len(k), dtype=np.int32))
    assert [b.n for b in cut.blocks[0]] == [b.n for b in straight.blocks[0]]
    q = np.random.default_rng(6).standard_normal((1, 9, D)).astype(np.float32)
    q_pos = np.array([len(k) - 1], np.int32)
    np.testing.assert_allclose(_attend_cache(cut, q, q_pos)[0], _attend_cache(straight, q, q_pos)[0], atol=0.02)


def test_overflow_is_refused():
    c = KVCache(1, H, D, 64, "f16", BS)
    _fill(c, 60)
    with pytest.raises(ValueError, match="KV cache full"):
        _fill(c, 5)
