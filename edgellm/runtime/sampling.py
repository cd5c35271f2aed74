"""Next-token sampling: greedy, temperature, top-k, top-p, min-p, repetition penalty, seeded."""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from ..native import ffi, lib

INT_MAX = 2**31 - 1   # C int: a larger top_k or window is every token anyway


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
    """Draws tokens by the native el_sample (the same code a native decode run draws with), from one splitmix64
    stream per sampler: seeded, a conversation's draws repeat whether they ran token by token or in runs."""

    def __init__(self, params: SamplingParams):
        p = self.p = params
        self.c = ffi.new("el_sampling *", {"temperature": p.temperature, "top_p": p.top_p, "min_p": p.min_p,
                                           "repeat_penalty": p.repeat_penalty, "top_k": min(p.top_k, INT_MAX),
                                           "repeat_last_n": min(p.repeat_last_n, INT_MAX)})
        seed = p.seed if p.seed is not None else int.from_bytes(os.urandom(8), "little")
        self.state = ffi.new("uint64_t *", seed % 2**64)

    def recent(self, history, then=(), room: int = 0) -> np.ndarray:
        """The tokens the penalty looks at, the last repeat_last_n of history followed by `then` (history is only
        sliced: a whole context is never copied), int32, with `room` more slots after them (for a native run)"""
        n = self.p.repeat_last_n
        tail = list(history[max(len(history) - n, 0):]) + list(then)
        last = tail[max(len(tail) - n, 0):]
        out = np.empty(len(last) + room, np.int32)
        out[:len(last)] = last
        return out

    def __call__(self, logits: np.ndarray, history) -> int:
        logits = np.ascontiguousarray(logits, np.float32).reshape(-1)
        recent = self.recent(history)
        tok = lib.el_sample(self.c, self.state, ffi.from_buffer("float[]", logits), logits.size,
                            ffi.from_buffer("int32_t[]", recent), recent.size)
        if tok < 0:
            raise ValueError("no token to sample: the logits are empty or all NaN")
        return tok
