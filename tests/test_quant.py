import numpy as np
import pytest

from edgellm.quant import (ACT_BLOCK_DTYPE, BLOCK_DTYPES, BLOCK_SIZES, GGMLType, dequantize, dequantize_activations,
                           quantize, quantize_activations, row_bytes)

TYPES = [GGMLType.F32, GGMLType.F16, GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0]
QTYPES = [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0]


def random_blocks(t: GGMLType, nblocks: int, rng) -> np.ndarray:
    """Random bytes for every field, with finite f16 scales (any finite f16 works, subnormals included)."""
    raw = rng.integers(0, 256, nblocks * BLOCK_SIZES[t][1], dtype=np.uint8)
    if t == GGMLType.F32:
        return rng.standard_normal(nblocks).astype(np.float32).view(np.uint8)
    b = raw.view(BLOCK_DTYPES[t])
    fields = ["d", "m"] if t == GGMLType.Q4_1 else ["d"] if t != GGMLType.F16 else []
    for f in fields:
        bits = rng.integers(0, 0x7C00, nblocks, dtype=np.uint16) | (rng.integers(0, 2, nblocks, dtype=np.uint16) << 15)
        b[f] = bits.view(np.float16)
    if t == GGMLType.F16:
        raw.view(np.uint16)[:] &= 0xBBFF   # clear one exponent bit: never inf/nan
    raw[: BLOCK_SIZES[t][1]] = 0          # an all-zero block
    return raw


def gguf_quants():
    """gguf's GGMLQuantizationType and quants module; the tests comparing against them skip where gguf is not
    installed (the emulated Raspberry Pi of tools/pi-test.sh)."""
    gguf = pytest.importorskip("gguf")
    return gguf.GGMLQuantizationType, gguf.quants


def test_layout_table():
    assert [int(t) for t in TYPES] == [0, 1, 2, 3, 8]
    for t in TYPES:
        assert BLOCK_DTYPES[t].itemsize == BLOCK_SIZES[t][1]
    assert [BLOCK_SIZES[t] for t in TYPES] == [(1, 4), (1, 2), (32, 18), (32, 20), (32, 34)]
    assert ACT_BLOCK_DTYPE.itemsize == 40
    assert GGMLType.parse("q4_1") is GGMLType.Q4_1 and GGMLType.parse(8) is GGMLType.Q8_0
    with pytest.raises(ValueError):
        GGMLType.parse("q5_k")
    with pytest.raises(ValueError):
        row_bytes(GGMLType.Q4_0, 33)


def test_layout_matches_gguf():
    GQ, gq = gguf_quants()
    for t in TYPES:
        assert BLOCK_DTYPES[t].itemsize == BLOCK_SIZES[t][1] == gq.GGML_QUANT_SIZES[GQ(int(t))][1]
        assert BLOCK_SIZES[t][0] == gq.GGML_QUANT_SIZES[GQ(int(t))][0]


@pytest.mark.parametrize("t", TYPES, ids=lambda t: t.name)
def test_dequantize_bit_exact_vs_gguf(t):
    GQ, gq = gguf_quants()
    rng = np.random.default_rng(int(t))
    raw = random_blocks(t, 257, rng)
    n = 257 * BLOCK_SIZES[t][0]
    ref = gq.dequantize(raw.reshape(1, -1), GQ(int(t))).reshape(-1)
    got = dequantize(raw, t, n)
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got.view(np.uint32), ref.astype(np.float32).view(np.uint32))


@pytest.mark.parametrize("t", [GGMLType.F16] + QTYPES, ids=lambda t: t.name)
def test_quantize_bit_exact_vs_gguf(t):
    GQ, gq = gguf_quants()
    rng = np.random.default_rng(7)
    x = (rng.standard_normal(32 * 300) * rng.uniform(0.01, 100, 300).repeat(32)).astype(np.float32)
    x[:32] = 0                      # all-zero block
    x[32:64] = 3.0                  # constant block (Q4_1 d == 0)
    x[64:96] = np.linspace(-8, 7, 32)  # exact ties for Q4_0
    ref = gq.quantize(x.reshape(1, -1), GQ(int(t))).reshape(-1).view(np.uint8)
    np.testing.assert_array_equal(quantize(x, t), ref)


@pytest.mark.parametrize("t", QTYPES, ids=lambda t: t.name)
def test_quantize_roundtrip_error(t):
    x = np.random.default_rng(1).standard_normal(32 * 64).astype(np.float32)
    y = dequantize(quantize(x, t), t, x.size)
    amax = np.abs(x.reshape(-1, 32)).max(1).repeat(32)
    # half a step, except Q4_0 whose +amax end clips to 7 (a full step); plus the f16 rounding of the scale
    step = {GGMLType.Q8_0: 0.5 / 127, GGMLType.Q4_0: 1 / 8, GGMLType.Q4_1: 1 / 15}[t]
    assert np.all(np.abs(y - x) <= amax * (step + 2.0**-10))


def test_activation_blocks():
    x = np.random.default_rng(2).standard_normal((3, 96)).astype(np.float32)
    x[1, :32] = 0
    a = quantize_activations(x)
    assert a.shape == (3, 3) and a.dtype == ACT_BLOCK_DTYPE
    assert np.all(np.abs(a["qs"]) <= 127) and np.all(a["d"][1, 0] == 0)
    np.testing.assert_allclose(a["s"], a["d"] * a["qs"].astype(np.float32).sum(-1), rtol=1e-6)
    assert np.abs(dequantize_activations(a) - x).max() <= np.abs(x).max() / 127 * 0.5 + 1e-6
    # half-way cases round to even
    t = np.zeros(32, np.float32)
    t[0], t[1], t[2] = 127, 0.5 * 127 / 127, 1.5
    assert list(quantize_activations(t)["qs"][0, :3]) == [127, 0, 2]
