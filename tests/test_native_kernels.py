"""Native kernels vs their numpy references, on the SIMD path and the scalar path, at 1 and 2 threads."""
import numpy as np
import pytest

from edgellm import native as N
from edgellm.native import reference as R
from edgellm.quant import (BLOCK_DTYPES, INTERLEAVED, GGMLType, dequantize, group_keys, quantize, row_bytes,
                           ungroup_keys)

QTYPES = [GGMLType.Q4_0, GGMLType.Q4_1, GGMLType.Q8_0]
WTYPES = QTYPES + [GGMLType.F16, GGMLType.F32]
KVTYPES = [GGMLType.F32, GGMLType.F16, GGMLType.Q8_0, GGMLType.Q4_0]

def random_weights(t: GGMLType, rows: int, cols: int, rng) -> np.ndarray:
    """Random bytes for quant blocks (finite f16 scales of moderate size), a zero row, normal floats otherwise."""
    if t in (GGMLType.F32, GGMLType.F16):
        W = quantize(rng.standard_normal(rows * cols).astype(np.float32), t)
    else:
        W = rng.integers(0, 256, rows * row_bytes(t, cols), dtype=np.uint8)
        b = W.view(BLOCK_DTYPES[t])
        b["d"] = rng.uniform(-0.05, 0.05, b.size).astype(np.float16)
        if t == GGMLType.Q4_1:
            b["m"] = rng.uniform(-0.2, 0.2, b.size).astype(np.float16)
    W = W.reshape(rows, -1)
    W[rows // 2] = 0   # all-zero blocks
    return W


def check_matmul(W, t, rows, cols, X, Y, Yh):
    """Y and Yh, el_matmul and el_matmul_hp of X by W (type t, GGUF layout), against the numpy references."""
    scale = np.abs(R.matmul_exact(W, t, rows, cols, np.abs(X))).max() + 1e-6   # magnitude of the sums
    # same activation quantization as the C path: only float summation order differs
    assert np.abs(Y - R.matmul(W, t, rows, cols, X)).max() <= 2e-6 * scale
    # vs exact f32: 8-bit activations lose ~1/254 of each block's max
    tol = 1e-5 if t in (GGMLType.F32, GGMLType.F16) else 2e-2
    assert np.abs(Y - R.matmul_exact(W, t, rows, cols, X)).max() <= tol * scale
    # two 8-bit planes: ~16-bit activations, ~100x closer to exact than one plane
    assert np.abs(Yh - R.matmul_exact(W, t, rows, cols, X)).max() <= (1e-5 if tol == 1e-5 else 2e-4) * scale


@pytest.mark.parametrize("t", WTYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("rows,cols,n", [(1, 32, 1), (13, 64, 2), (64, 576, 3), (37, 96, 5), (70, 160, 17), (9, 64, 64)])
def test_matmul(simd, threads, t, rows, cols, n):
    rng = np.random.default_rng(rows * 1000 + cols + n)
    W = random_weights(t, rows, cols, rng)
    X = rng.standard_normal((n, cols)).astype(np.float32)
    X[0, :32] = 0
    check_matmul(W, t, rows, cols, X, N.matmul(W, t, rows, cols, X), N.matmul(W, t, rows, cols, X, hp=True))


def test_matmul_ldy_and_1d(simd):
    rng = np.random.default_rng(3)
    t, rows, cols = GGMLType.Q4_1, 20, 64
    W = random_weights(t, rows, cols, rng)
    X = rng.standard_normal((3, cols)).astype(np.float32)
    Y = np.full((3, 32), 7.0, np.float32)
    N.lib.el_matmul(N.ffi.from_buffer(W), int(t), rows, cols, N.ffi.from_buffer("float[]", X), 3,
                    N.ffi.from_buffer("float[]", Y), 32)
    np.testing.assert_array_equal(Y[:, :rows], N.matmul(W, t, rows, cols, X))
    assert np.all(Y[:, rows:] == 7.0)   # nothing written past `rows` of each ldy stride
    np.testing.assert_array_equal(N.matmul(W, t, rows, cols, X[1]), Y[1, :rows])


def test_matmul_rejects_bad_args():
    W = np.zeros((4, 40), np.uint8)
    X = np.zeros((2, 64), np.float32)
    with pytest.raises(ValueError):
        N.matmul(W, GGMLType.Q4_1, 4, 64, X.astype(np.float64))
    with pytest.raises(ValueError):
        N.matmul(W, GGMLType.Q4_1, 8, 64, X)          # W too small
    with pytest.raises(ValueError):
        N.matmul(W, GGMLType.Q4_1, 4, 48, X[:, :48])   # not whole blocks
    with pytest.raises(ValueError):
        N.matmul(W, GGMLType.Q4_1, 4, 64, np.zeros((2, 128), np.float32)[:, ::2])
    with pytest.raises(ValueError):
        N.matmul(W, "q5_k", 4, 64, X)


@pytest.mark.parametrize("t", WTYPES, ids=lambda t: t.name)
def test_get_rows_and_row_conversions(simd, t):
    rng = np.random.default_rng(int(t))
    rows, cols = 11, 96
    W = random_weights(t, rows, cols, rng)
    ids = [3, 0, 10, 3]
    ref = dequantize(W, t, rows * cols).reshape(rows, cols)
    np.testing.assert_array_equal(N.get_rows(W, t, rows, cols, ids), ref[ids])
    np.testing.assert_array_equal(N.dequantize_row(W[2], t, cols), ref[2])
    x = (rng.standard_normal(cols * 4) * 3).astype(np.float32)
    x[:32] = 0
    np.testing.assert_array_equal(N.quantize_row(x, t), quantize(x, t))   # bit exact with ggml's reference
    with pytest.raises(ValueError):
        N.get_rows(W, t, rows, cols, [rows])


@pytest.mark.parametrize("shape", [(1, 576), (5, 64), (3, 100)])
def test_rmsnorm(simd, shape):
    rng = np.random.default_rng(shape[1])
    x = rng.standard_normal(shape).astype(np.float32)
    x[0] = 0
    w = rng.standard_normal(shape[1]).astype(np.float32)
    ref = R.rmsnorm(x, w, 1e-5)
    np.testing.assert_allclose(N.rmsnorm(x, w, 1e-5), ref, rtol=2e-6, atol=2e-6)
    y = x.copy()
    N.rmsnorm(y, w, 1e-5, out=y)   # in place
    np.testing.assert_allclose(y, ref, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("neox", [False, True])
@pytest.mark.parametrize("rope_dim", [64, 32])
def test_rope(simd, neox, rope_dim):
    rng = np.random.default_rng(5)
    x = rng.standard_normal((6, 3, 64)).astype(np.float32)
    pos = np.array([0, 1, 7, 100, 4095, 131071])
    ref = R.rope(x, pos, rope_dim, 10000.0, neox)
    y = N.rope(x.copy(), pos, rope_dim, 10000.0, neox)
    np.testing.assert_allclose(y, ref, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(y[..., rope_dim:], x[..., rope_dim:])
    with pytest.raises(ValueError):
        N.rope(x.copy(), pos, 63)


def test_silu_mul_softmax(simd):
    rng = np.random.default_rng(6)
    g = (rng.standard_normal(1543) * 8).astype(np.float32)
    g[:3] = [-100, 100, 0]
    u = rng.standard_normal(1543).astype(np.float32)
    np.testing.assert_allclose(N.silu_mul(g.copy(), u), R.silu_mul(g, u), rtol=3e-6, atol=1e-30)
    x = (rng.standard_normal((4, 37)) * 10).astype(np.float32)
    x[1, 5:] = -np.inf     # masked entries
    x[2] = -np.inf         # nothing visible -> zeros
    np.testing.assert_allclose(N.softmax(x.copy()), R.softmax(x), rtol=3e-6, atol=1e-7)


# ---------------- attention ----------------

def kv_block(t: GGMLType, n_kv: int, cap: int, hd: int, n: int, pos, rng):
    x = rng.standard_normal((n_kv, cap, hd)).astype(np.float32)
    raw = lambda: quantize((x * rng.uniform(0.5, 2)).reshape(-1), t).reshape(n_kv, cap, -1)  # noqa: E731
    return raw(), raw(), np.asarray(pos, np.int32), n, t


def check_attention(q, q_pos, n_kv, blocks, tol=3e-6):
    scale = 1 / np.sqrt(q.shape[-1])
    o, l = N.attention(q, q_pos, n_kv, blocks, scale)
    ro, rl = R.attention(q, q_pos, n_kv, blocks, scale)
    np.testing.assert_allclose(o, ro, atol=tol, rtol=0)
    np.testing.assert_allclose(l, rl, atol=tol * 4, rtol=0)
    return o, l


@pytest.mark.parametrize("t", KVTYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("n_head,n_kv,hd", [(9, 3, 64), (8, 2, 128), (4, 4, 32)])
@pytest.mark.parametrize("n_q", [1, 3, 17])
def test_attention(simd, threads, t, n_head, n_kv, hd, n_q):
    rng = np.random.default_rng(n_head * 100 + hd + n_q)
    # two blocks, the second partly filled, positions not in storage order
    b1 = kv_block(t, n_kv, 48, hd, 40, rng.permutation(40), rng)
    b2 = kv_block(t, n_kv, 80, hd, 70, np.arange(40, 110), rng)
    q = rng.standard_normal((n_q, n_head, hd)).astype(np.float32)
    q_pos = np.sort(rng.integers(-1, 120, n_q))   # -1: no visible key
    q_pos[0] = -1 if n_q > 1 else 109
    o, l = check_attention(q, q_pos, n_kv, [b1, b2])
    if n_q > 1:
        assert np.all(o[0] == 0) and np.all(np.isneginf(l[0]))


@pytest.mark.parametrize("t", KVTYPES, ids=lambda t: t.name)
def test_attention_lse_merge(simd, threads, t):
    rng = np.random.default_rng(11)
    n_head, n_kv, hd = 9, 3, 64
    A = kv_block(t, n_kv, 300, hd, 300, np.arange(300), rng)
    B = kv_block(t, n_kv, 64, hd, 50, np.arange(300, 350), rng)
    q = rng.standard_normal((2, n_head, hd)).astype(np.float32) * 3
    q_pos = np.array([120, 349])
    o, l = N.attention(q, q_pos, n_kv, [A, B])
    oa, la = N.attention(q, q_pos, n_kv, [A])
    ob, lb = N.attention(q, q_pos, n_kv, [B])   # nothing visible for query 0
    mo, ml = R.merge(oa, la, ob, lb)
    np.testing.assert_allclose(o, mo, atol=2e-6, rtol=0)
    np.testing.assert_allclose(l, ml, atol=2e-6, rtol=0)


def test_attention_mixed_dtypes_and_empty(simd):
    rng = np.random.default_rng(12)
    blocks = [kv_block(t, 3, 40, 64, 33, np.arange(i * 40, i * 40 + 33), rng) for i, t in enumerate(KVTYPES)]
    q = rng.standard_normal((2, 9, 64)).astype(np.float32)
    check_attention(q, np.array([100, 200]), 3, blocks)
    o, l = N.attention(q, [5, 6], 3, [])
    assert np.all(o == 0) and np.all(np.isneginf(l))


def test_attention_decode_long(simd, threads):
    """Decode over 2k keys: the key range is split across threads and merged."""
    rng = np.random.default_rng(13)
    for t in (GGMLType.F16, GGMLType.Q8_0):
        blk = kv_block(t, 3, 2048, 64, 2048, np.arange(2048), rng)
        q = rng.standard_normal((1, 9, 64)).astype(np.float32) * 2
        check_attention(q, [2047], 3, [blk])


def test_attention_tiles_inside_key_groups(simd, threads):
    """A 37-key block first: the decode chunks of the next block start inside its 8-key groups (and tiles end
    inside them), so the grouped kernels score whole groups and keep only the tile's keys."""
    rng = np.random.default_rng(14)
    for t in (GGMLType.Q8_0, GGMLType.Q4_0):
        blocks = [kv_block(t, 3, 40, 64, 37, np.arange(37), rng), kv_block(t, 3, 1000, 64, 999, np.arange(37, 1036), rng)]
        q = rng.standard_normal((1, 9, 64)).astype(np.float32) * 2
        check_attention(q, [1035], 3, blocks)


@pytest.mark.parametrize("t", [GGMLType.Q8_0, GGMLType.Q4_0], ids=lambda t: t.name)
@pytest.mark.parametrize("hd", [32, 64, 96])
def test_kv_group_matches_numpy(t, hd):
    """el_kv_group / el_kv_ungroup (the seal's and the gather's) against their numpy twins group_keys / ungroup_keys."""
    rng = np.random.default_rng(hd)
    rows = quantize(rng.standard_normal(24 * hd).astype(np.float32), t).reshape(24, -1)
    grouped = np.empty_like(rows)
    N.lib.el_kv_group(int(t), N.ffi.from_buffer(rows), 24, hd, N.ffi.from_buffer(grouped))
    np.testing.assert_array_equal(grouped, group_keys(rows, t, hd))
    np.testing.assert_array_equal(ungroup_keys(grouped, t, hd), rows)
    back = np.empty((5, rows.shape[1]), np.uint8)   # rows 11..15: across a group boundary
    N.lib.el_kv_ungroup(int(t), N.ffi.from_buffer(grouped), 11, 5, hd, N.ffi.from_buffer(back))
    np.testing.assert_array_equal(back, rows[11:16])


@pytest.mark.skipif(N.SIMD_NAMES[N.lib.el_simd_level()] != "avx512", reason="no AVX-512 here")
@pytest.mark.parametrize("t", [GGMLType.Q8_0, GGMLType.Q4_0], ids=lambda t: t.name)
@pytest.mark.parametrize("n_head,n_kv,hd", [(9, 3, 64), (8, 2, 128), (4, 4, 32), (6, 2, 96)])
@pytest.mark.parametrize("n_q", [1, 5, 17])
def test_avx512_attention_is_avx2s_bit_for_bit(threads, t, n_head, n_kv, hd, n_q):
    """The AVX-512 quantized tile does each lane's arithmetic in AVX2's order: the same outputs to the bit, for tiles
    that start inside key groups (a 37-key block first), partial tiles, masked keys and odd group counts."""
    rng = np.random.default_rng(n_head + hd + n_q)
    blocks = [kv_block(t, n_kv, 40, hd, 37, rng.permutation(37), rng),
              kv_block(t, n_kv, 1000, hd, 997, np.arange(37, 1034), rng)]
    q = rng.standard_normal((n_q, n_head, hd)).astype(np.float32) * 2
    q_pos = np.sort(rng.integers(-1, 1034, n_q))
    q_pos[-1] = 1033
    out = {}
    for name in ("avx2", "avx512"):
        N.set_simd(N.SIMD_LEVELS[name])
        out[name] = N.attention(q, q_pos, n_kv, blocks)
    for a, b in zip(out["avx2"], out["avx512"]):
        np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(N.SIMD_NAMES[N.lib.el_simd_level()] != "avx512", reason="no AVX-512 here")
@pytest.mark.parametrize("t", [GGMLType.Q4_0, GGMLType.Q4_1], ids=lambda t: t.name)
@pytest.mark.parametrize("rows,cols", [(1536, 576), (576, 1536), (40, 96), (8, 64)])
def test_avx512_interleaved_matmul_is_avx2s_bit_for_bit(threads, t, rows, cols):
    """The AVX-512 table's VNNI kernels for interleaved Q4 weights (prefill: two 8-row groups a vector, an odd group
    alone; decode, one token: a group at a time; two planes: AVX2's) sum each row's terms in AVX2's order: the same
    outputs to the bit, one plane or two."""
    rng = np.random.default_rng(rows + cols)
    W = random_weights(t, rows, cols, rng)
    wt = N.repack(W, t, rows, cols)
    assert wt == INTERLEAVED[t]
    for n in (1, 2, 3, 9, 17, 70):
        X = rng.standard_normal((n, cols)).astype(np.float32)
        out = {}
        for name in ("avx2", "avx512"):
            N.set_simd(N.SIMD_LEVELS[name])
            out[name] = [N.matmul(W, wt, rows, cols, X, hp=hp) for hp in (False, True)]
        for a, b in zip(out["avx2"], out["avx512"]):
            np.testing.assert_array_equal(a, b)


@pytest.mark.skipif(N.SIMD_NAMES[N.lib.el_simd_level()] != "avx512", reason="no AVX-512 here")
@pytest.mark.parametrize("rows,cols", [(6144, 576), (1536, 576), (13, 288), (9, 544), (7, 32), (10, 2048)])
def test_avx512_q8_0_gemv_is_avx2s_bit_for_bit(threads, rows, cols):
    """The AVX-512 table's VNNI GEMV for row-repacked Q8_0 (the output matrix; w + 128 against a, 128 sum a taken off)
    gives AVX2's outputs to the bit: whole and partial groups of 8 blocks, rows in fours and alone, and the bounds
    el_logits_refine takes from it."""
    rng = np.random.default_rng(rows + cols)
    W = random_weights(GGMLType.Q8_0, rows, cols, rng)
    rho = N.l1_ratio(W, GGMLType.Q8_0, rows, cols)
    wt = N.repack(W, GGMLType.Q8_0, rows, cols)
    x = rng.standard_normal(cols).astype(np.float32)
    out = {}
    for name in ("avx2", "avx512"):
        N.set_simd(N.SIMD_LEVELS[name])
        out[name] = [N.matmul(W, wt, rows, cols, x[None]), *N.logits_refine(W, wt, rows, cols, x, rho)]
    for a, b in zip(out["avx2"], out["avx512"]):
        np.testing.assert_array_equal(a, b)


def test_attention_rejects_bad_args():
    rng = np.random.default_rng(14)
    q = np.zeros((1, 9, 64), np.float32)
    blk = kv_block(GGMLType.F16, 3, 8, 64, 8, np.arange(8), rng)
    with pytest.raises(ValueError):
        N.attention(q, [0], 2, [blk])                        # 9 heads, 2 kv heads
    with pytest.raises(ValueError):
        N.attention(q, [0], 3, [blk[:2] + (blk[2], 9, blk[4])])   # n > cap
    with pytest.raises(ValueError):
        N.attention(q, [0], 3, [blk[:4] + (GGMLType.Q4_1,)])     # unsupported KV type
    with pytest.raises(ValueError):
        N.attention(q, [0, 1], 3, [blk])                     # q_pos length
    with pytest.raises(ValueError):
        N.attention(np.zeros((1, 9, 48), np.float32), [0], 3, [kv_block(GGMLType.Q8_0, 3, 8, 64, 8, np.arange(8), rng)])


def test_simd_controls():
    best = N.lib.el_simd_level()
    assert N.set_simd(0) == 0 and N.simd_level() == 0
    assert N.set_simd(99) == best
    assert best in N.SIMD_NAMES
    for lv in N.SIMD_NAMES:   # a level above the detected one gives that; one of another ISA, scalar
        assert N.set_simd(lv) in ({best} if lv >= best else {lv, 0})
    N.set_simd(best)
    with pytest.raises(ValueError):
        N.set_threads(0)


def test_prefetch_distance_is_a_knob_only():
    """el_prefetch_bytes moves the decode GEMVs' software prefetch, not their results; set_simd restores the table's."""
    best = N.lib.el_simd_level()
    default = N.prefetch_bytes()
    W = random_weights(GGMLType.Q4_1, 256, 576, np.random.default_rng(16))
    wt = N.repack(W, GGMLType.Q4_1, 256, 576)
    x = np.random.default_rng(17).standard_normal((1, 576)).astype(np.float32)
    ref = N.matmul(W, wt, 256, 576, x)
    assert N.prefetch_bytes(1 << 16) == 1 << 16 and N.prefetch_bytes() == 1 << 16
    np.testing.assert_array_equal(N.matmul(W, wt, 256, 576, x), ref)
    assert N.set_simd(best) == best and N.prefetch_bytes() == default


def test_pool_timing_counts_jobs():
    """el_pool_timing (bench/pool_split.py's tool) counts the jobs run while on and splits their time consistently."""
    N.set_threads(2)
    W = random_weights(GGMLType.Q4_1, 64, 64, np.random.default_rng(18))
    x = np.ones((1, 64), np.float32)
    out = N.ffi.new("double[5]")
    N.lib.el_pool_timing(1, N.ffi.NULL)
    for _ in range(3):
        N.matmul(W, GGMLType.Q4_1, 64, 64, x)   # one job each (one row's activations quantize on the caller)
    N.lib.el_pool_timing(0, out)
    jobs, in_jobs, own, wait, between = (out[i] for i in range(5))
    assert jobs == 3 and in_jobs > 0 and between > 0
    assert abs(in_jobs - own - wait) < 1e-9 and own > 0 and wait >= 0
    N.matmul(W, GGMLType.Q4_1, 64, 64, x)   # timing off: not counted
    N.lib.el_pool_timing(0, out)
    assert out[0] == 0


def test_pool_survives_fork():
    import os
    N.set_threads(2)
    W = random_weights(GGMLType.Q4_1, 64, 64, np.random.default_rng(15))
    X = np.ones((3, 64), np.float32)
    ref = N.matmul(W, GGMLType.Q4_1, 64, 64, X)
    pid = os.fork()
    if pid == 0:   # the child has no workers: the pool must restart instead of hanging
        os._exit(0 if np.array_equal(N.matmul(W, GGMLType.Q4_1, 64, 64, X), ref) and N.get_threads() == 2 else 1)
    assert os.waitpid(pid, 0)[1] == 0


@pytest.mark.parametrize("dim", [2, 8, 16, 32, 64, 128, 256])
def test_hadamard(dim, simd):
    rng = np.random.default_rng(dim)
    x = rng.standard_normal((7, dim)).astype(np.float32)
    y = N.hadamard(x.copy())
    np.testing.assert_allclose(y, R.hadamard(x), atol=1e-5)
    np.testing.assert_allclose(N.hadamard(y.copy()), x, atol=1e-5)   # its own inverse
    np.testing.assert_allclose(np.linalg.norm(y, axis=1), np.linalg.norm(x, axis=1), rtol=1e-5)  # orthogonal
    with pytest.raises(ValueError):
        N.hadamard(np.zeros((2, 48), np.float32))


@pytest.mark.parametrize("dim", [8, 16, 64, 256])
def test_hadamard_simd_is_bit_identical(dim):
    # quantized KV caches rotate keys at append and queries at attention: every table must rotate alike
    x = np.random.default_rng(dim).standard_normal((5, dim)).astype(np.float32) * 100
    best = N.lib.el_simd_level()
    try:
        N.set_simd(0)
        ref = N.hadamard(x.copy())
    finally:
        N.set_simd(best)
    np.testing.assert_array_equal(N.hadamard(x.copy()), ref)


@pytest.mark.parametrize("t", KVTYPES, ids=lambda t: t.name)
@pytest.mark.parametrize("reduce_max", [False, True], ids=["sum", "max"])
def test_attention_mass(simd, threads, t, reduce_max):
    rng = np.random.default_rng(21)
    n_head, n_kv, hd = 9, 3, 64
    blocks = [kv_block(t, n_kv, 64, hd, 64, np.arange(64), rng), kv_block(t, n_kv, 64, hd, 37, np.arange(64, 101), rng)]
    q = rng.standard_normal((5, n_head, hd)).astype(np.float32) * 2
    q_pos = np.array([10, 63, 80, 100, 100])
    _, lse = N.attention(q, q_pos, n_kv, blocks)
    mass = N.attention_mass(q, q_pos, n_kv, blocks, lse, reduce_max=reduce_max)
    ref = R.attention_mass(q, q_pos, n_kv, blocks, 1 / np.sqrt(hd), reduce_max=reduce_max)
    assert mass.shape == (n_kv, 101)
    np.testing.assert_allclose(mass, ref, atol=2e-5, rtol=1e-4)
    assert np.all(mass[:, 101:] == 0) and mass[:, 11:].max() > 0
    if not reduce_max:   # every query head's probabilities sum to one
        np.testing.assert_allclose(mass.sum(), 5 * n_head, rtol=1e-4)


# ---- fused entry points: bitwise equal to the unfused sequence of calls they replace ----

def _fp(a):
    return N.ffi.from_buffer("float[]", a)


def _weight(W, t, rows, cols):
    w = N.ffi.new("el_weight *")
    w.w, w.type, w.rows, w.cols = N.ffi.from_buffer(W), int(t), rows, cols
    return w


@pytest.mark.parametrize("rotate", [0, 1])
@pytest.mark.parametrize("n,row0", [(1, 0), (1, 13), (5, 3), (16, 0)])
def test_kv_append(rotate, n, row0):
    rng = np.random.default_rng(n * 100 + row0 + rotate)
    H, hd, cap = 3, 64, 16
    k = rng.standard_normal((n, H, hd)).astype(np.float32)
    v = rng.standard_normal((n, H, hd)).astype(np.float32)
    k0, v0 = k.copy(), v.copy()
    pos = rng.integers(0, 1000, n).astype(np.int32)
    K = np.full((H, cap, hd), 7, np.float16)
    V = np.full((H, cap, hd), 7, np.float16)
    P = np.full(cap, -1, np.int32)
    N.lib.el_kv_append(_fp(k), _fp(v), N.ffi.from_buffer("int32_t[]", pos), n, H, hd, rotate,
                       N.ffi.from_buffer(K), N.ffi.from_buffer(V), N.ffi.from_buffer("int32_t[]", P), row0, cap)
    np.testing.assert_array_equal(k, k0)   # inputs untouched
    np.testing.assert_array_equal(v, v0)
    rk, rv = (N.hadamard(k.copy()), N.hadamard(v.copy())) if rotate else (k, v)
    Kr, Vr = np.full_like(K, 7), np.full_like(V, 7)
    Kr[:, row0:row0 + n] = rk.transpose(1, 0, 2)   # numpy's f32 -> f16 rounding
    Vr[:, row0:row0 + n] = rv.transpose(1, 0, 2)
    np.testing.assert_array_equal(K.view(np.uint16), Kr.view(np.uint16))
    np.testing.assert_array_equal(V.view(np.uint16), Vr.view(np.uint16))
    np.testing.assert_array_equal(P[row0:row0 + n], pos)
    assert np.all(P[:row0] == -1) and np.all(P[row0 + n:] == -1)


@pytest.mark.parametrize("t", [GGMLType.Q4_1, GGMLType.Q4_0, GGMLType.Q8_0, GGMLType.F16], ids=lambda t: t.name)
@pytest.mark.parametrize("n", [1, 3, 9])
def test_fused_layer_steps_equal_unfused(simd, threads, t, n):
    rng = np.random.default_rng(n + 10 * int(t))
    dim, n_head, n_kv, hd, ff = 128, 4, 2, 32, 96
    lib, eps, base, rope_dim, neox = N.lib, 1e-5, 10000.0, 32, 0
    shapes = {"wq": (n_head * hd, dim), "wk": (n_kv * hd, dim), "wv": (n_kv * hd, dim), "wo": (dim, n_head * hd),
              "gate": (ff, dim), "up": (ff, dim), "down": (dim, ff)}
    Ws = {name: random_weights(t, r, c, rng) for name, (r, c) in shapes.items()}
    ws = {name: _weight(Ws[name], t, *shapes[name]) for name in shapes}
    for w in ws.values():   # the fused steps would repack on first use: both sides take the same kernels
        lib.el_weight_prepare(w)
    x0 = rng.standard_normal((n, dim)).astype(np.float32)
    an, fn = rng.standard_normal(dim).astype(np.float32), rng.standard_normal(dim).astype(np.float32)
    pos = np.arange(50, 50 + n, dtype=np.int32)
    ppos = N.ffi.from_buffer("int32_t[]", pos)

    def mm(name, X, Y):
        r, c = shapes[name]
        lib.el_matmul(N.ffi.from_buffer(Ws[name]), ws[name].type, r, c, _fp(X), n, _fp(Y), r)

    # unfused: the sequence NativeBackend.layer ran before the fused steps
    x, h = x0.copy(), np.empty((n, dim), np.float32)
    q, k, v = (np.empty((n, shapes[w][0]), np.float32) for w in ("wq", "wk", "wv"))
    lib.el_rmsnorm(_fp(x), _fp(an), n, dim, eps, _fp(h))
    mm("wq", h, q), mm("wk", h, k), mm("wv", h, v)
    lib.el_rope(_fp(q), n, n_head, hd, rope_dim, ppos, base, neox)
    lib.el_rope(_fp(k), n, n_kv, hd, rope_dim, ppos, base, neox)
    att = rng.standard_normal((n, n_head * hd)).astype(np.float32)   # stands in for attention's output
    g, u = np.empty((n, ff), np.float32), np.empty((n, ff), np.float32)
    mm("wo", att, h)
    x += h
    lib.el_rmsnorm(_fp(x), _fp(fn), n, dim, eps, _fp(h))
    mm("gate", h, g), mm("up", h, u)
    lib.el_silu_mul(_fp(g), _fp(u), n * ff)
    mm("down", g, h)
    x += h

    # fused
    xf, hf = x0.copy(), np.empty((n, dim), np.float32)
    qf, kf, vf = np.empty_like(q), np.empty_like(k), np.empty_like(v)
    lib.el_attn_in(_fp(xf), n, dim, _fp(an), eps, ws["wq"], ws["wk"], ws["wv"], ppos, n_head, n_kv, hd, rope_dim,
                   base, neox, _fp(hf), _fp(qf), _fp(kf), _fp(vf))
    for a, b in ((qf, q), (kf, k), (vf, v)):
        np.testing.assert_array_equal(a, b)
    gf, uf = np.empty_like(g), np.empty_like(u)
    lib.el_attn_out_mlp(_fp(xf), _fp(att), n, dim, ws["wo"], _fp(fn), eps, ws["gate"], ws["up"], ws["down"],
                        _fp(hf), _fp(gf), _fp(uf))
    np.testing.assert_array_equal(xf, x)
    np.testing.assert_array_equal(gf, g)


def test_f16_rows_convert_exactly(simd):
    """Every f16 bit pattern: the f16 -> f32 conversion (F16C in the AVX2 table) equals numpy's; NaN stays NaN."""
    h = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    got, ref = N.dequantize_row(h, GGMLType.F16, h.size), h.view(np.float16).astype(np.float32)
    nan = np.isnan(ref)
    np.testing.assert_array_equal(got[~nan].view(np.uint32), ref[~nan].view(np.uint32))
    assert np.isnan(got[nan]).all()


def test_f32_to_f16_rounds_as_numpy(simd):
    """f32 -> f16 (F16C in the AVX2 table): every exponent, the halfway cases between neighbouring f16 values, the
    overflow edge, subnormals and zeros equal numpy's round-to-nearest-even; a NaN becomes the quiet NaN of its sign."""
    rng = np.random.default_rng(7)
    bits = rng.integers(0, 1 << 32, 1 << 18, dtype=np.uint64).astype(np.uint32)
    h = np.arange(0x7C01, dtype=np.uint32).astype(np.uint16)   # every positive f16 and +inf (NaNs are set below)
    mid = (h.view(np.float16).astype(np.float64)[:-1] + h.view(np.float16).astype(np.float64)[1:]) / 2
    edges = np.array([0.0, -0.0, 65504.0, 65519.99, 65520.0, np.inf, -np.inf, 2.0 ** -24, 2.0 ** -25, 1e-30])
    x = np.concatenate([bits.view(np.float32), mid.astype(np.float32), -mid.astype(np.float32),
                        edges.astype(np.float32)])
    x[5::4099] = np.nan   # NaN lanes among finite ones
    got = N.quantize_row(x, GGMLType.F16).view(np.uint16)
    nan = np.isnan(x)
    with np.errstate(over="ignore"):   # numpy warns as it rounds the overflow cases to inf, which is the expectation
        ref = x[~nan].astype(np.float16)
    np.testing.assert_array_equal(got[~nan], ref.view(np.uint16))
    np.testing.assert_array_equal(got[nan], np.where(np.signbit(x[nan]), 0xFE00, 0x7E00).astype(np.uint16))


def test_q8_0_rounds_halves_away_from_zero(simd):
    """ggml's roundf on exact halves (amax 127 makes the scale 1, so each value is its own quotient)."""
    x = np.concatenate([[127.0], np.arange(-15.5, 15.5, 1.0)]).astype(np.float32)
    q = N.quantize_row(x, GGMLType.Q8_0)
    np.testing.assert_array_equal(q, quantize(x, GGMLType.Q8_0))
    away = np.concatenate([[127], np.arange(-16, 0), np.arange(1, 16)])
    np.testing.assert_array_equal(q[2:].view(np.int8), away)


def test_q8_0_blocks_at_every_scale(simd):
    """Each table's Q8_0 quantizer (AVX2's own loop where it has one) against ggml's reference, bit for bit: blocks
    from 1e-20 to 1e6, one all zero, one with its largest value negative, values that land on halves of the scale."""
    rng = np.random.default_rng(7)
    scales = 10.0 ** np.arange(-20, 7)
    x = (rng.standard_normal((scales.size, 32)) * scales[:, None]).astype(np.float32)
    x[3] = 0
    x[4, 9] = -40 * np.abs(x[4]).max()
    x[5] = (np.arange(32) - 15.5) * 127 / 15.5   # the scale is 1: every value a half
    x = x.reshape(-1)
    np.testing.assert_array_equal(N.quantize_row(x, GGMLType.Q8_0), quantize(x, GGMLType.Q8_0))
