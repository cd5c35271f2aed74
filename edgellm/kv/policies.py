"""KV budget policies: each scores entries and selects which to keep. They never move bytes.

A policy sees one layer at a time through `LayerScores` and returns, per KV head, the sorted indices
of the entries to keep (an int array [n_head_kv, keep]). The KV manager gathers those entries,
re-assigns positions when `reposition` is set (CR-RoPE) and rebuilds its blocks.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class LayerScores:
    """What a policy may score one layer's n entries by (arrays are [n_head_kv, n] unless noted)."""
    n: int
    n_head_kv: int
    history_mass: np.ndarray | None = None   # H2O: attention received from every query so far
    seen_by: np.ndarray | None = None        # how many queries could attend to each entry (H2O's normaliser)
    window_mass: np.ndarray | None = None    # SnapKV: attention from the last `window` queries
    catalyst_mass: np.ndarray | None = None  # InfiniPot CaP: max attention from the catalyst prompt
    novelty: np.ndarray | None = None        # InfiniPot NuC: -log p(token | kept context), per head copy


def _same_for_heads(idx: np.ndarray, n_head: int) -> np.ndarray:
    return np.broadcast_to(np.sort(idx), (n_head, len(idx))).copy()


def _top(score: np.ndarray, k: int, exclude: np.ndarray | None = None) -> np.ndarray:
    """Indices of the k largest scores per row, excluding a mask; ties go to the later (more recent) entry."""
    s = np.where(exclude, -np.inf, score) if exclude is not None else score
    order = np.argsort(-s[..., ::-1], axis=-1, kind="stable")[..., :k]
    return s.shape[-1] - 1 - order


class Policy:
    name = "full"
    reposition = False        # CR-RoPE: survivors get positions 0..keep-1 after each compaction
    needs: frozenset = frozenset()  # which LayerScores fields the manager must maintain

    def select(self, s: LayerScores, keep: int) -> np.ndarray:
        raise NotImplementedError


class WindowPolicy(Policy):
    """StreamingLLM: the first `sink` entries and the most recent ones."""
    name, reposition = "window", True

    def __init__(self, sink: int = 4):
        self.sink = sink

    def select(self, s, keep):
        sink = min(self.sink, keep)
        return _same_for_heads(np.r_[np.arange(sink), np.arange(s.n - (keep - sink), s.n)], s.n_head_kv)


class H2OPolicy(Policy):
    """Heavy hitters: a recent window plus the entries with the most (normalised) attention received."""
    name, needs = "h2o", frozenset({"history_mass"})

    def __init__(self, recent_ratio: float = 0.5):
        self.recent_ratio = recent_ratio

    def select(self, s, keep):
        recent = min(int(keep * self.recent_ratio), keep)
        score = s.history_mass / np.maximum(s.seen_by, 1)
        is_recent = np.arange(s.n) >= s.n - recent
        heavy = _top(score, keep - recent, np.broadcast_to(is_recent, score.shape))
        return np.sort(np.concatenate([heavy, np.broadcast_to(np.arange(s.n - recent, s.n), (s.n_head_kv, recent))],
                                      axis=1), axis=1)


class SnapKVPolicy(Policy):
    """The observation window (last `window` entries) plus the entries its queries attend to most, after
    averaging the scores over `kernel` neighbours (keeps clusters of context, not isolated spikes)."""
    name, needs = "snapkv", frozenset({"window_mass"})

    def __init__(self, window: int = 32, kernel: int = 5):
        self.window, self.kernel = window, kernel

    def select(self, s, keep):
        w = min(self.window, keep)
        pooled = _avg_pool(s.window_mass, self.kernel)
        in_window = np.arange(s.n) >= s.n - w
        top = _top(pooled, keep - w, np.broadcast_to(in_window, pooled.shape))
        return np.sort(np.concatenate([top, np.broadcast_to(np.arange(s.n - w, s.n), (s.n_head_kv, w))], axis=1), axis=1)


class InfiniPotPolicy(Policy):
    """Continual context distillation: alpha*keep slots to the most novel tokens (NuC, shared by the heads),
    the rest per head to the catalyst prompt's attention (CaP); positions re-assigned (CR-RoPE)."""
    name, reposition, needs = "infinipot", True, frozenset({"catalyst_mass", "novelty"})

    def __init__(self, alpha: float = 0.5, sink: int = 4, pool: int = 1):
        self.alpha, self.sink, self.pool = alpha, sink, pool

    def select(self, s, keep):
        sink = min(self.sink, keep)
        is_sink = np.arange(s.n) < sink
        n_nuc = min(int(round(self.alpha * (keep - sink))), keep - sink)
        nuc = _top(_max_pool(s.novelty.mean(axis=0), self.pool), n_nuc, is_sink)  # heads hold copies of the same per-token novelty
        taken = is_sink.copy()
        taken[nuc] = True
        cap = _top(_max_pool(s.catalyst_mass, self.pool), keep - sink - n_nuc, np.broadcast_to(taken, s.catalyst_mass.shape))
        fixed = np.broadcast_to(np.r_[np.arange(sink), nuc], (s.n_head_kv, sink + n_nuc))
        return np.sort(np.concatenate([fixed, cap], axis=1), axis=1)


def _avg_pool(x: np.ndarray, k: int) -> np.ndarray:
    """Mean over a centred window of k entries (shrinking at the edges), along the last axis."""
    c = np.cumsum(np.pad(x, [(0, 0)] * (x.ndim - 1) + [(1, 0)]), axis=-1)
    n = x.shape[-1]
    lo, hi = np.maximum(np.arange(n) - k // 2, 0), np.minimum(np.arange(n) + k // 2 + 1, n)
    return (c[..., hi] - c[..., lo]) / (hi - lo)


def _max_pool(x: np.ndarray, k: int) -> np.ndarray:
    """Max over a centred window of k entries along the last axis (k=1: x itself)."""
    if k <= 1:
        return x
    pad = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(k // 2, k - 1 - k // 2)], constant_values=-np.inf)
    return np.lib.stride_tricks.sliding_window_view(pad, k, axis=-1).max(axis=-1)


def make_policy(cfg) -> Policy | None:
    """The policy object for a KVConfig (None for 'full', which never evicts)."""
    if cfg.policy == "full":
        return None
    if cfg.policy == "window":
        return WindowPolicy(cfg.sink)
    if cfg.policy == "h2o":
        return H2OPolicy(cfg.h2o_recent_ratio)
    if cfg.policy == "snapkv":
        return SnapKVPolicy(cfg.snapkv_window, cfg.snapkv_kernel)
    return InfiniPotPolicy(cfg.alpha, cfg.sink, cfg.pool)
