"""The thread pool: every slot (a task's ith) of a job runs exactly once, on its own worker or on the calling thread
once the caller's slot is done, so a worker the scheduler has not run yet holds nobody up. With far more threads than
cores many slots go to the caller; every result still equals the 1-thread one bit for bit (each output row is one
thread's work whatever the split), and repeated runs agree."""
import numpy as np
import pytest
from test_native_kernels import random_weights

from edgellm import native as N
from edgellm.quant import GGMLType, interleave_rows, quantize

ROWS, COLS = 200, 576


def jobs(rng):
    """Results of the kinds of jobs the pool runs: row-split quantization (n >= 8 tokens), work-run GEMV / GEMM,
    the refined logits' per-slot passes, an in-place repack, and attention units."""
    W = random_weights(GGMLType.Q4_1, ROWS, COLS, rng)
    X = rng.standard_normal((16, COLS)).astype(np.float32)
    x = X[0] * 10
    Wr = W.copy()
    N.repack(Wr, GGMLType.Q4_1, ROWS, COLS)
    rho = N.l1_ratio(W, GGMLType.Q4_1, ROWS, COLS)
    hd, n_kv, n = 64, 3, 700
    k = quantize(rng.standard_normal(n_kv * n * hd).astype(np.float32), GGMLType.Q8_0)
    v = quantize(rng.standard_normal(n_kv * n * hd).astype(np.float32), GGMLType.Q8_0)
    q = rng.standard_normal((1, 9, hd)).astype(np.float32)
    att = N.attention(q, [n], n_kv, [(k, v, np.arange(n), n, GGMLType.Q8_0)])
    return {"gemm": N.matmul(W, GGMLType.Q4_1, ROWS, COLS, X), "gemv": N.matmul(W, GGMLType.Q4_1, ROWS, COLS, X[:1]),
            "hp": N.matmul(W, GGMLType.Q4_1, ROWS, COLS, X, hp=True),
            "refine": N.logits_refine(W, GGMLType.Q4_1, ROWS, COLS, x, rho)[0], "repack": Wr,
            "out": att[0], "lse": att[1]}


@pytest.fixture
def restore_threads():
    before = N.get_threads()
    yield
    N.set_threads(before)


def test_slots_run_once_when_oversubscribed(restore_threads):
    N.set_threads(1)
    one = jobs(np.random.default_rng(5))
    N.set_threads(16)
    first = jobs(np.random.default_rng(5))
    for name in ("gemm", "gemv", "hp", "refine", "repack"):
        np.testing.assert_array_equal(first[name], one[name], err_msg=name)
    if N.SIMD_NAMES[N.lib.el_simd_level()] in ("avx2", "avx512"):   # the repacked layout, where the table has one
        np.testing.assert_array_equal(first["repack"].reshape(ROWS, -1)[:ROWS],
                                      interleave_rows(random_weights(GGMLType.Q4_1, ROWS, COLS,
                                                                     np.random.default_rng(5)), GGMLType.Q4_1, COLS))
    np.testing.assert_allclose(first["out"], one["out"], rtol=1e-5, atol=1e-6)   # key chunks depend on the count
    for _ in range(20):   # the same split every time, whoever ran which slot
        again = jobs(np.random.default_rng(5))
        for name, value in first.items():
            np.testing.assert_array_equal(again[name], value, err_msg=name)
