"""KV budget policies against brute-force versions, and the manager's compaction on small caches."""
import numpy as np
import pytest

from edgellm.kv.budget import BudgetKVCache, RopeSpec
from edgellm.kv.policies import (H2OPolicy, InfiniPotPolicy, LayerScores, Policy, SnapKVPolicy, WindowPolicy,
                                 _avg_pool)
from edgellm.native.reference import attention_mass, kv_gather

H, N, KEEP = 3, 40, 16


def _rand_scores(seed):
    rng = np.random.default_rng(seed)
    s = LayerScores(N, H)
    s.history_mass = rng.random((H, N))
    s.seen_by = np.broadcast_to(np.arange(N, 0, -1), (H, N)).astype(float)
    s.window_mass = rng.random((H, N))
    s.catalyst_mass = rng.random((H, N))
    s.novelty = np.broadcast_to(rng.random(N), (H, N)).copy()
    return s


def _best(scores, k, allowed):
    """Brute force: the k allowed indices of highest score, ties to the later entry."""
    return sorted(sorted((i for i in range(len(scores)) if allowed[i]), key=lambda i: (-scores[i], -i))[:k])


def _loop_max_pool(x, k):
    return [max(x[max(0, j - k // 2):j - k // 2 + k]) for j in range(len(x))]


def _check_shape(idx):
    assert idx.shape == (H, KEEP)
    assert all(len(set(row)) == KEEP and list(row) == sorted(row) for row in idx)


def test_window():
    idx = WindowPolicy(sink=4).select(_rand_scores(0), KEEP)
    _check_shape(idx)
    assert all(list(row) == [0, 1, 2, 3] + list(range(N - 12, N)) for row in idx)


@pytest.mark.parametrize("seed", range(3))
def test_h2o_brute_force(seed):
    s = _rand_scores(seed)
    idx = H2OPolicy(recent_ratio=0.25).select(s, KEEP)
    _check_shape(idx)
    recent = list(range(N - 4, N))
    for h in range(H):
        score = s.history_mass[h] / s.seen_by[h]
        heavy = _best(score, KEEP - 4, [i < N - 4 for i in range(N)])
        assert list(idx[h]) == sorted(heavy + recent)


@pytest.mark.parametrize("seed", range(3))
def test_snapkv_brute_force(seed):
    s = _rand_scores(seed)
    idx = SnapKVPolicy(window=5, kernel=5).select(s, KEEP)
    _check_shape(idx)
    for h in range(H):
        pooled = [np.mean(s.window_mass[h][max(0, j - 2):j + 3]) for j in range(N)]
        top = _best(pooled, KEEP - 5, [j < N - 5 for j in range(N)])
        assert list(idx[h]) == sorted(top + list(range(N - 5, N)))


def test_avg_pool_matches_loops():
    x = np.random.default_rng(1).random((2, 11))
    for k in (1, 3, 5):
        ref = [[x[r, max(0, j - k // 2):j + k // 2 + 1].mean() for j in range(11)] for r in range(2)]
        np.testing.assert_allclose(_avg_pool(x, k), ref)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("pool", [1, 2, 5])
def test_infinipot_brute_force(seed, pool):
    s = _rand_scores(seed)
    idx = InfiniPotPolicy(alpha=0.5, sink=2, pool=pool).select(s, KEEP)
    _check_shape(idx)
    # round(0.5 * 14) slots by (pooled) novelty, shared by the heads; pooled ties go to the later entry
    nuc = _best(_loop_max_pool(s.novelty[0], pool), 7, [i >= 2 for i in range(N)])
    for h in range(H):
        cap = _best(_loop_max_pool(s.catalyst_mass[h], pool), KEEP - 2 - 7, [i >= 2 and i not in nuc for i in range(N)])
        assert list(idx[h]) == sorted([0, 1] + nuc + cap)


# -- the manager ---------------------------------------------------------------------------------

D, NH = 64, 6
ROPE = RopeSpec(D, 10000.0, False)


class FixedPolicy(Policy):
    """Keeps given per-head indices: lets a test check exactly what compaction keeps."""

    def __init__(self, idx, reposition):
        self.idx, self.reposition = idx, reposition

    def select(self, s, keep):
        return self.idx


def _stream(cache, n, rng, pos0=0):
    k = rng.standard_normal((n, H, D)).astype(np.float32)
    v = rng.standard_normal((n, H, D)).astype(np.float32)
    cache.append(0, k, v, np.arange(pos0, pos0 + n, dtype=np.int32))
    return k, v


@pytest.mark.parametrize("dtype", ["f16", "q8_0", "q4_0"])
@pytest.mark.parametrize("reposition", [False, True])
@pytest.mark.parametrize("n", [96, 80])   # 80: the last block is a part-filled f16 tail beside quantized ones
def test_compaction_keeps_exactly_the_selected_entries(dtype, reposition, n):
    rng = np.random.default_rng(3)
    idx = np.sort(np.stack([rng.choice(n, 32, replace=False) for _ in range(H)]), axis=1)
    cache = BudgetKVCache(1, NH, H, D, budget=96, keep=32, policy=FixedPolicy(idx, reposition), rope=ROPE,
                          kv_dtype=dtype, block_size=32)
    k, v = _stream(cache, n, rng)   # keys as stored: already rotated at positions 0..n-1
    cache.compact()
    assert len(cache) == 32
    assert cache.next_pos == (32 if reposition else n)
    got_k, got_v, pos = cache.dequantized(0)
    assert list(pos) == list(range(32))
    tol = {"f16": 2e-3, "q8_0": 4e-2, "q4_0": 0.6}[dtype]
    # the numpy twin of el_kv_gather, on what was streamed in (CR-RoPE: each survivor re-rotated to its rank)
    want_k, want_v = kv_gather(k.transpose(1, 0, 2), v.transpose(1, 0, 2), np.arange(n), idx, D if reposition else 0)
    np.testing.assert_allclose(got_k, want_k.transpose(1, 0, 2), atol=tol)
    np.testing.assert_allclose(got_v, want_v.transpose(1, 0, 2), atol=tol)


def test_compaction_refuses_an_entry_past_the_cache():
    idx = np.tile(np.arange(31, -1, -1), (H, 1))
    idx[1, 0] = 40   # only 40 entries streamed in
    cache = BudgetKVCache(1, NH, H, D, budget=96, keep=32, policy=FixedPolicy(idx, True), rope=ROPE, block_size=32)
    _stream(cache, 40, np.random.default_rng(0))
    with pytest.raises(ValueError, match="outside"):
        cache.compact()


def test_positions_never_exceed_the_budget_with_cr_rope():
    rng = np.random.default_rng(4)
    cache = BudgetKVCache(1, NH, H, D, budget=64, keep=32, policy=WindowPolicy(sink=4), rope=ROPE, block_size=32)
    for _ in range(20):   # 20 chunks of 16 = 5x the budget
        if cache.needs_compaction(16):
            cache.compact()
        _stream(cache, 16, rng, cache.next_pos)
        assert len(cache) <= 64 and cache.next_pos <= 64
        assert cache.dequantized(0)[2].max() < 64
    assert cache.compactions > 5


def test_history_mass_matches_reference_attention():
    """H2O's accumulated scores equal the reference attention probabilities summed over queries and heads."""
    rng = np.random.default_rng(5)
    cache = BudgetKVCache(1, NH, H, D, budget=128, keep=64, policy=H2OPolicy(), rope=ROPE, block_size=32)
    total = np.zeros((H, 50))
    for n0, n in ((0, 30), (30, 20)):
        _stream(cache, n, rng, n0)
        q = rng.standard_normal((n, NH, D)).astype(np.float32)
        q_pos = np.arange(n0, n0 + n, dtype=np.int32)
        out, lse = np.empty_like(q), np.empty((n, NH), np.float32)
        cache.attend(0, q.copy(), q_pos, out, lse, 1 / np.sqrt(D))
        k, v, pos = cache.dequantized(0)
        blocks = [(k.copy(), v.copy(), pos, len(pos), 0)]
        total[:, :n0 + n] += attention_mass(q, q_pos, H, blocks, 1 / np.sqrt(D))
    np.testing.assert_allclose(cache.history[0][:, :50], total, rtol=2e-3, atol=1e-5)
    assert cache.seen_by[0][0, 0] == 50 and cache.seen_by[0][0, 49] == 1
