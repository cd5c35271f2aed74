"""el_repack's weight layouts (rows: Q4_0R / Q4_1R / Q8_0R; 8-row groups: Q4_0X / Q4_1X): the C repack against its
numpy twin, the kernels on repacked weights against the references of the original weights (AVX2 and scalar tables,
1 and 2 threads), and the model's lazy repack."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
from smaps import mapping_field
from test_native_kernels import QTYPES, check_matmul, random_weights

from edgellm import native as N
from edgellm.quant import (INTERLEAVED, REPACKED, GGMLType, dequantize, interleave_rows, repack_rows, row_bytes,
                           unpack_rows)

BEST = N.lib.el_simd_level()
REPACKS = N.SIMD_NAMES[BEST] in ("avx2", "avx512")   # the tables with kernels for the layout (el_kernels.repacks)
LAYOUTS = {"rows": (repack_rows, REPACKED), "groups": (interleave_rows, INTERLEAVED)}
# (layout, GGUF type) pairs that exist: the groups layout takes Q4 only
LAYOUT_TYPES = [pytest.param(lay, t, id=f"{lay}-{t.name}") for lay, (_, types) in LAYOUTS.items() for t in QTYPES
                if t in types]


def in_layout(W, t, cols, layout):
    """(W in el_repack's layout `layout` by the numpy twin, its type)"""
    twin, types = LAYOUTS[layout]
    return twin(W, t, cols), types[t]


@pytest.mark.parametrize("t", QTYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("cols", [32, 96, 576, 1536])   # 1, 3 (odd: a Q4 block without a pair), 18, 48 blocks
def test_repack_matches_numpy_twin(simd, t, cols):
    rng = np.random.default_rng(cols + int(t))
    rows = 7
    W = random_weights(t, rows, cols, rng)
    twin = repack_rows(W, t, cols)
    assert twin.shape == W.shape and row_bytes(REPACKED[t], cols) == row_bytes(t, cols)   # no byte grows
    np.testing.assert_array_equal(unpack_rows(twin, REPACKED[t], cols), W)
    Wr = W.copy()
    rt = N.repack(Wr, t, rows, cols)
    if simd and REPACKS:
        assert rt == REPACKED[t]
        np.testing.assert_array_equal(Wr, twin)   # byte for byte
    else:   # no kernels for the layout: nothing changes
        assert rt == t
        np.testing.assert_array_equal(Wr, W)
    assert N.repack(twin.copy(), REPACKED[t], rows, cols) == REPACKED[t]   # already repacked: left alone
    ref = dequantize(W, t, rows * cols).reshape(rows, cols)
    for r in range(rows):   # exactly the original values
        np.testing.assert_array_equal(N.dequantize_row(twin[r], REPACKED[t], cols), ref[r])
    ids = [6, 0, 3, 3]   # el_get_rows also checks el_row_bytes' row stride of the repacked type
    np.testing.assert_array_equal(N.get_rows(twin, REPACKED[t], rows, cols, ids), N.get_rows(W, t, rows, cols, ids))


@pytest.mark.parametrize("t", [GGMLType.Q4_0, GGMLType.Q4_1], ids=lambda t: t.name)
@pytest.mark.parametrize("cols", [32, 96, 576, 1536])
def test_interleave_matches_numpy_twin(simd, t, cols):
    """Whole groups of 8 rows: el_repack interleaves them (where it repacks at all), byte for byte as the twin."""
    rng = np.random.default_rng(cols + int(t))
    rows = 24
    W = random_weights(t, rows, cols, rng)
    twin = interleave_rows(W, t, cols)
    assert twin.shape == W.shape and row_bytes(INTERLEAVED[t], cols) == row_bytes(t, cols)
    np.testing.assert_array_equal(unpack_rows(twin, INTERLEAVED[t], cols), W)
    Wr = W.copy()
    rt = N.repack(Wr, t, rows, cols)
    np.testing.assert_array_equal(Wr, twin if simd and REPACKS else W)
    assert rt == (INTERLEAVED[t] if simd and REPACKS else t)
    assert N.repack(twin.copy(), INTERLEAVED[t], rows, cols) == INTERLEAVED[t]   # already repacked: left alone
    ids = [23, 0, 9, 9, 15]   # rows of several groups, at several places in a group
    ref = dequantize(W, t, rows * cols).reshape(rows, cols)
    np.testing.assert_array_equal(N.get_rows(twin, INTERLEAVED[t], rows, cols, ids), ref[ids])
    with pytest.raises(ValueError, match="get_rows"):   # a row of the layout is not contiguous
        N.dequantize_row(twin[0], INTERLEAVED[t], cols)
    with pytest.raises(ValueError, match="groups of 8"):
        interleave_rows(W[:20], t, cols)


@pytest.mark.parametrize("layout,t", LAYOUT_TYPES)
@pytest.mark.parametrize("cols", [64, 96, 288, 576, 1536])   # tails of 2, 3, 1, 2, 0 blocks
@pytest.mark.parametrize("n", [1, 2, 3, 7, 64, 65])
def test_matmul_repacked(simd, threads, t, cols, n, layout):
    """Repacked by the numpy twin, so that the scalar table (which never repacks) runs its kernel for the layout too;
    rows: 37 rows, a slab of 16 rows and a remainder that is not a multiple of 4; groups: 40 rows, 5 groups."""
    rng = np.random.default_rng(cols * 100 + n + int(t))
    rows = 37 if layout == "rows" else 40
    W = random_weights(t, rows, cols, rng)
    Wr, rt = in_layout(W, t, cols, layout)
    X = rng.standard_normal((n, cols)).astype(np.float32)
    X[0, :32] = 0
    check_matmul(W, t, rows, cols, X, N.matmul(Wr, rt, rows, cols, X), N.matmul(Wr, rt, rows, cols, X, hp=True))


@pytest.mark.parametrize("layout,t", LAYOUT_TYPES)
@pytest.mark.parametrize("cols", [64, 96, 576, 1536])   # tails of 2, 3 (odd: a Q4 block without a pair), 2, 0 blocks
def test_gemv_equals_gemm_rows(simd, threads, t, cols, layout):
    """One token's product equals, bit for bit, that token's row of a many-token product (the GEMM kernels take
    tokens in tiles: pairs in the rows layout; 8, then pairs, then one in the groups layout): decode gives the logits
    prefill gives. rows: 45 rows, 4-row tiles and a rest; groups: 48. 11 tokens: a tile of each size."""
    rng = np.random.default_rng(cols + 7 * int(t))
    rows = 45 if layout == "rows" else 48
    Wr, rt = in_layout(random_weights(t, rows, cols, rng), t, cols, layout)
    X = rng.standard_normal((11, cols)).astype(np.float32) * rng.uniform(0.1, 10, cols).astype(np.float32)
    many = N.matmul(Wr, rt, rows, cols, X)
    for i in range(11):
        np.testing.assert_array_equal(N.matmul(Wr, rt, rows, cols, X[i:i + 1])[0], many[i])


@pytest.mark.parametrize("t", QTYPES, ids=lambda t: t.name)
def test_weight_prepare(simd, t):
    rng = np.random.default_rng(int(t))
    rows, cols = 20, 576
    W = random_weights(t, rows, cols, rng)
    W0 = W.copy()
    w = N.ffi.new("el_weight *")
    w.w, w.type, w.rows, w.cols = N.ffi.from_buffer(W), int(t), rows, cols
    N.lib.el_weight_prepare(w)
    N.lib.el_weight_prepare(w)   # once only
    repacked = simd and REPACKS
    assert w.type == (REPACKED[t] if repacked else t)
    np.testing.assert_array_equal(W, repack_rows(W0, t, cols) if repacked else W0)


LAZY = """
import json, sys, numpy as np, psutil
from edgellm.runtime.model import Model
m = Model(sys.argv[1], 1)
b = m.backend
matrices = lambda: [w for lw in b.layers for w in lw.values()] + [b.output]
types = lambda: sorted({w.type for w in matrices()})
t = m.weights.layers[0].wq
before, raw = types(), bytes(t.data[0])
assert not t.data.flags.writeable
m.forward(np.arange(1, 5), m.new_cache(8))
with open(sys.argv[1], "rb") as f:   # the file keeps its bytes (the map is private)
    f.seek(t.data.ctypes.data - np.frombuffer(m.gguf._map, np.uint8).ctypes.data)
    on_disk = f.read(len(raw))
in_arena = b.arena is not None and all(b.arena.holds(w) for w in matrices())
print(json.dumps([before, types(), on_disk == raw, bytes(t.data[0]) == raw, in_arena, psutil.Process().memory_info().rss]))
"""


@pytest.mark.parametrize("force_scalar, huge_pages", [("1", "1"), ("0", "1"), ("0", "0")],
                         ids=["scalar", "arena", "in-place"])
def test_model_repacks_on_first_use(model_path, force_scalar, huge_pages):
    """Loading repacks nothing; the first forward pass repacks every matrix on AVX2 (not under EDGELLM_FORCE_SCALAR):
    into the weight arena (EDGELLM_HUGE_PAGES unset or 1), leaving the file's map as it was, or in the private map
    (EDGELLM_HUGE_PAGES=0). Either way the repacked pages replace the file's pages in RSS instead of adding to them."""
    def run(scalar, huge):
        out = subprocess.run([sys.executable, "-c", LAZY, str(model_path)], capture_output=True, text=True, check=True,
                             env={**os.environ, "EDGELLM_FORCE_SCALAR": scalar, "EDGELLM_HUGE_PAGES": huge}).stdout
        return json.loads(out.splitlines()[-1])

    before, after, disk_same, map_same, in_arena, rss = run(force_scalar, huge_pages)
    assert before == [3, 8]   # Q4_1 layers, Q8_0 output
    repacked = REPACKS and force_scalar == "0"
    assert after == ([108, 113] if repacked else [3, 8])   # Q8_0R output, Q4_1X layers (whole 8-row groups)
    assert disk_same and map_same == (not repacked or huge_pages == "1")
    assert in_arena == (repacked and huge_pages == "1")
    if repacked:
        unpacked_rss = run("1", huge_pages)[-1]
        assert rss < 1.05 * unpacked_rss, (rss, unpacked_rss)


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs Linux's /proc")
def test_weight_arena_asks_for_huge_pages(model_path, monkeypatch):
    """The arena is one map on a 2 MiB boundary with MADV_HUGEPAGE ("hg"), a slot per quantized matrix, in step order."""
    from edgellm.runtime.backend_native import HUGE_PAGE
    from edgellm.runtime.model import Model
    monkeypatch.delenv("EDGELLM_HUGE_PAGES", raising=False)
    b = Model(model_path, 1).backend
    a = b.arena
    base = a._bytes.ctypes.data + a.start
    assert base % HUGE_PAGE == 0 and "hg" in mapping_field(base, "VmFlags")
    homes = [int(N.ffi.cast("uintptr_t", lw[k].home))
             for lw in b.layers for k in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")]
    assert homes[0] == base and homes == sorted(homes)
    assert int(N.ffi.cast("uintptr_t", b.output.home)) > homes[-1]
    monkeypatch.setenv("EDGELLM_HUGE_PAGES", "0")
    assert Model(model_path, 1).backend.arena is None
