"""Sampler against a brute-force enumeration of what each filter must keep."""
import numpy as np
import pytest

from edgellm.native import ffi, lib
from edgellm.runtime.sampling import Sampler, SamplingParams


def _support(params, logits, n=3000):
    s = Sampler(params)
    return {s(logits, []) for _ in range(n)}


def _probs(logits):
    p = np.exp(logits - logits.max())
    return p / p.sum()


LOGITS = np.log(np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04], np.float32))


def test_greedy():
    assert Sampler(SamplingParams())(LOGITS, []) == 0


def test_top_k():
    assert _support(SamplingParams(temperature=1.0, top_k=3, seed=0), LOGITS) == {0, 1, 2}


def test_top_p_brute_force():
    p = _probs(LOGITS)
    for top_p in (0.3, 0.5, 0.7, 0.85, 0.95):
        # smallest prefix of the sorted distribution whose mass reaches top_p
        expect = {i for i in range(len(p)) if p[:i].sum() < top_p}
        assert _support(SamplingParams(temperature=1.0, top_p=top_p, seed=1), LOGITS) == expect


def test_min_p():
    assert _support(SamplingParams(temperature=1.0, min_p=0.3, seed=2), LOGITS) == {0, 1, 2}


def test_temperature_frequencies():
    s = Sampler(SamplingParams(temperature=1.0, seed=3))
    counts = np.bincount([s(LOGITS, []) for _ in range(20000)], minlength=6) / 20000
    np.testing.assert_allclose(counts, _probs(LOGITS), atol=0.015)


def test_repeat_penalty():
    logits = np.array([2.0, 1.9, -1.0], np.float32)
    s = Sampler(SamplingParams(repeat_penalty=1.5))
    assert s(logits, [0]) == 1          # 2.0/1.5 < 1.9
    assert s(np.array([-1.0, -1.2], np.float32), [0]) == 1  # -1.5 < -1.2


def test_invalid_params():
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0)
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)


# -- the native sampler against reference.sample, draw by draw ------------------------------------------------------

from edgellm.native import reference  # noqa: E402

CASES = [
    dict(temperature=0.0),
    dict(temperature=0.0, repeat_penalty=1.3),
    dict(temperature=0.8, top_k=40, top_p=0.95, min_p=0.05, repeat_penalty=1.1),   # the chat defaults
    dict(temperature=1.0),
    dict(temperature=1.5, top_p=0.9),
    dict(temperature=0.7, min_p=0.1),
    dict(temperature=1.2, top_k=5),
    dict(temperature=0.9, top_k=3000, top_p=0.5, repeat_penalty=0.8, repeat_last_n=10),
]


def _vocab_logits(rng, n):
    """Logits on a grid of 1/4 (many ties, which rank by id) with a few NaNs"""
    x = np.round(rng.normal(0, 3, n) * 4) / 4
    x[rng.integers(0, n, 3)] = np.nan
    return x.astype(np.float32)


@pytest.mark.parametrize("case", CASES, ids=[",".join(f"{k}={v}" for k, v in c.items()) for c in CASES])
@pytest.mark.parametrize("n", [1000, 49152])
def test_native_sampler_equals_reference(case, n):
    rng = np.random.default_rng(n)
    s = Sampler(SamplingParams(seed=7, **case))
    draws = 300 if n == 1000 else 40
    us = iter(reference.uniforms(7, draws))
    for _ in range(draws):
        logits, history = _vocab_logits(rng, n), rng.integers(0, 50, rng.integers(0, 100)).tolist()
        u = next(us) if case["temperature"] else 0.0
        assert s(logits, history) == reference.sample(logits, history, u=u, **case)


def test_uniform_stream_is_splitmix64():
    state = ffi.new("uint64_t *", 12345)
    assert [lib.el_uniform(state) for _ in range(5)] == reference.uniforms(12345, 5)


def test_all_nan_logits_raise():
    with pytest.raises(ValueError, match="NaN"):
        Sampler(SamplingParams(temperature=1.0))(np.full(4, np.nan, np.float32), [])


def test_sampling_leaves_logits_unchanged():
    logits = np.array([2.0, 1.9, -1.0], np.float32)
    Sampler(SamplingParams(temperature=0.5, repeat_penalty=1.5, seed=0))(logits, [0, 2])
    assert logits.tolist() == [2.0, 1.899999976158142, -1.0]


def test_penalized_token_far_above_the_rest():
    """A recent token whose raw logit stands far above every other one, at a low temperature: its raw weight (e^20
    here) must not enter the vocabulary's sum, whose float rounding would then outweigh everything else."""
    rng = np.random.default_rng(5)
    logits = (rng.normal(0, 1, 1000) + 25).astype(np.float32)
    logits[0] = 30
    case = dict(temperature=0.1, top_p=0.9, repeat_penalty=1.1)
    s = Sampler(SamplingParams(seed=9, **case))
    for u in reference.uniforms(9, 200):
        assert s(logits, [0]) == reference.sample(logits, [0], u=u, **case)


def test_recent_is_the_penalty_window():
    s = Sampler(SamplingParams(repeat_last_n=3))
    assert s.recent([1, 2, 3, 4]).tolist() == [2, 3, 4]
    assert s.recent([1, 2, 3, 4], then=(5,), room=2)[:3].tolist() == [3, 4, 5] and s.recent([1], room=2).size == 3
    assert Sampler(SamplingParams(repeat_last_n=0)).recent([1, 2], then=(3,)).size == 0
