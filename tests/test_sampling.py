"""Sampler against a brute-force enumeration of what each filter must keep."""
import numpy as np
import pytest

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
