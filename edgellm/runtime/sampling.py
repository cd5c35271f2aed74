"""Next-token sampling: greedy, temperature, top-k, top-p, min-p, repetition penalty, seeded."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class SamplingParams:
    temperature: float = 0.0   # 0 = greedy
    top_k: int = 0             # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repeat_penalty: float = 1.0
    repeat_last_n: int = 64
    seed: int | None = None

    def __post_init__(self):
        checks = [(self.temperature >= 0, "temperature must be >= 0"), (self.top_k >= 0, "top_k must be >= 0"),
                  (0 < self.top_p <= 1, "top_p must be in (0, 1]"), (0 <= self.min_p < 1, "min_p must be in [0, 1)"),
                  (self.repeat_penalty > 0, "repeat_penalty must be > 0"),
                  (self.repeat_last_n >= 0, "repeat_last_n must be >= 0")]
        for ok, msg in checks:
            if not ok:
                raise ValueError(msg)


class Sampler:
    def __init__(self, params: SamplingParams):
        self.p = params
        self._rng = None

    @property
    def rng(self) -> np.random.Generator:
        """Made on the first draw: numpy.random's import pulls in OpenSSL (through `secrets`, ~4 MB of RSS), which a
        greedy run never needs."""
        if self._rng is None:
            self._rng = np.random.default_rng(self.p.seed)
        return self._rng

    @property
    def greedy(self) -> bool:
        """Whether every draw is the logits' argmax (the first largest), whatever the history."""
        p = self.p
        return p.temperature == 0.0 and (p.repeat_penalty == 1.0 or not p.repeat_last_n)

    def __call__(self, logits: np.ndarray, history) -> int:
        p = self.p
        logits = np.asarray(logits, np.float32).reshape(-1)
        if p.repeat_penalty != 1.0 and p.repeat_last_n and len(history):
            logits = _penalize(logits, history[-p.repeat_last_n:], p.repeat_penalty)
        if p.temperature == 0.0:
            return int(np.argmax(logits))
        return self._sample(logits)

    def _sample(self, logits: np.ndarray) -> int:
        """A draw at the temperature from the filtered candidates. Every filter ranks the logits the same before and
        after dividing by the temperature, so only the candidates are divided (a chat draws once a token: the
        vocabulary-wide passes were most of its cost)."""
        p = self.p
        n = logits.size
        k = n if p.top_k == 0 else min(p.top_k, n)
        cand = np.argpartition(logits, n - k)[n - k:] if k < n else np.arange(n)
        cand = cand[np.argsort(-logits[cand], kind="stable")]
        z = logits[cand] / np.float32(p.temperature)
        probs = np.exp(z - z[0])
        probs /= probs.sum()
        keep = probs >= p.min_p * probs[0]
        if p.top_p < 1.0:  # smallest prefix whose mass reaches top_p
            keep &= np.arange(probs.size) <= np.searchsorted(np.cumsum(probs), p.top_p)
        cdf = np.cumsum(probs[keep])   # kept candidates stay a prefix: inverse CDF of one uniform draw
        return int(cand[min(int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right")), cdf.size - 1)])


def _penalize(logits: np.ndarray, recent, penalty: float) -> np.ndarray:
    """llama.cpp/CTRL style: divide positive logits of recently seen tokens by the penalty, multiply negative ones.
    A token seen twice gets its new value twice (from the same old one), not the penalty twice."""
    out = logits.copy()
    ids = np.asarray(recent, np.int64)
    v = logits[ids]
    out[ids] = np.where(v > 0, v / penalty, v * penalty)
    return out
