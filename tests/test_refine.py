"""el_logits_refine (the next-token logits): every row is el_matmul's 8-bit product or el_matmul_hp's two-plane
product, bit for bit; a row left at 8 bits could not have been the largest by the residual plane's error bound
(computed here in float64 from the dequantized weights); so the argmax is always el_matmul_hp's."""
import numpy as np
import pytest
from test_native_kernels import QTYPES, random_weights
from test_repack import LAYOUT_TYPES, in_layout

from edgellm import native as N
from edgellm.quant import BLOCK_DTYPES, INTERLEAVED, GGMLType, REPACKED, dequantize, interleave_rows, repack_rows
from edgellm.quant.blocks import dequantize_activations, quantize_activations


def scale_bound(W, t, rows, cols):
    """Per row and block, the bound on |w| that the block's scales give (el_weight_l1_ratio's wmax)."""
    b = W.reshape(-1).view(BLOCK_DTYPES[t]).reshape(rows, cols // 32)
    d = np.abs(b["d"].astype(np.float64))
    if t == GGMLType.Q8_0:
        return 127 * d
    if t == GGMLType.Q4_0:
        return 8 * d
    return 15 * d + np.abs(b["m"].astype(np.float64))


def block_l1(W, t, rows, cols):
    return np.abs(dequantize(W, t, rows * cols).astype(np.float64)).reshape(rows, cols // 32, 32).sum(-1)


def activations(cols, rng):
    """Normal values with two outlier dims, as the final norm's output has"""
    x = rng.standard_normal(cols).astype(np.float32)
    x[[5, cols // 2 + 3]] *= 40
    return x


@pytest.mark.parametrize("t", QTYPES, ids=lambda t: t.name)
def test_l1_ratio_matches_numpy(t):
    rng = np.random.default_rng(int(t))
    rows, cols = 23, 576
    W = random_weights(t, rows, cols, rng)
    wmax = scale_bound(W, t, rows, cols)
    nz = wmax > 0
    ratio = np.where(nz, block_l1(W, t, rows, cols) / (32 * np.where(nz, wmax, 1)), 0).max(1)
    rho = N.l1_ratio(W, t, rows, cols)
    assert (rho >= 255 * ratio - 1e-9).all() and (rho <= 255 * ratio + 1).all()
    np.testing.assert_array_equal(N.l1_ratio(repack_rows(W, t, cols), REPACKED[t], rows, cols), rho)
    if t in INTERLEAVED:   # the first 16 rows in the 8-row groups layout
        Wg = interleave_rows(W.reshape(rows, -1)[:16], t, cols)
        np.testing.assert_array_equal(N.l1_ratio(Wg, INTERLEAVED[t], 16, cols), rho[:16])


@pytest.mark.parametrize("layout,t", [pytest.param("gguf", t, id=f"gguf-{t.name}") for t in QTYPES] + LAYOUT_TYPES)
@pytest.mark.parametrize("rows", [203, 4096])   # a last tile of 3 rows; many rows near the top
@pytest.mark.parametrize("cols", [288, 576])      # 9 and 18 blocks: 4-row tiles share one tail group of 1 / 2
def test_refine_exact_where_it_matters(simd, threads, t, layout, rows, cols):
    """Refined tiles are 4 rows in every layout (half a group of the groups layout, whose matrices have whole
    groups: 203 rows go to 200 there)."""
    rng = np.random.default_rng(rows + cols + int(t))
    W = random_weights(t, rows, cols, rng)
    if layout == "groups":
        W, rows = np.ascontiguousarray(W.reshape(rows, -1)[:rows - rows % 8]).reshape(-1), rows - rows % 8
    Wt, wt = in_layout(W, t, cols, layout) if layout != "gguf" else (W, t)
    rho = N.l1_ratio(Wt, wt, rows, cols)
    # bound on what the residual plane adds, from the dequantized weights (tighter than the C side's)
    wl1 = block_l1(W, t, rows, cols)
    for trial in range(4):
        x = activations(cols, rng)
        hi = dequantize_activations(quantize_activations(x[None])).reshape(cols)
        lo = dequantize_activations(quantize_activations((x - hi)[None])).reshape(cols)
        bound = wl1 @ np.abs(lo.astype(np.float64)).reshape(-1, 32).max(1)
        y, refined, best = N.logits_refine(Wt, wt, rows, cols, x, rho)
        y1 = N.matmul(Wt, wt, rows, cols, x[None])[0]
        yh = N.matmul(Wt, wt, rows, cols, x[None], hp=True)[0]
        exact = y == yh
        assert (exact | (y == y1)).all()   # each row is one of the two products, bit for bit
        assert exact.sum() >= refined and refined % 4 in (0, 3) and refined < rows / 4   # whole tiles, few of them
        assert np.abs(yh - y1).max() <= bound.max() * 1.001 + 1e-5
        left = ~exact
        assert (y1[left] + bound[left] < yh.max()).all()   # none of them could have been the largest
        assert np.argmax(y) == np.argmax(yh) == best and y.max() == yh.max()   # best: found among refined rows


@pytest.mark.parametrize("t", [GGMLType.F16, GGMLType.F32], ids=lambda t: t.name)
def test_refine_float_weights_are_the_product(t):
    rng = np.random.default_rng(3)
    rows, cols = 37, 64
    W = random_weights(t, rows, cols, rng)
    x = rng.standard_normal(cols).astype(np.float32)
    y, refined, best = N.logits_refine(W, t, rows, cols, x, np.zeros(rows, np.uint8))
    assert refined == 0 and best == np.argmax(y)
    np.testing.assert_array_equal(y, N.matmul(W, t, rows, cols, x[None])[0])
    with pytest.raises(ValueError, match="quantized"):
        N.l1_ratio(W, t, rows, cols)
