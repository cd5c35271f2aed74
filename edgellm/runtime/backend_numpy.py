"""Reference backend: weights dequantized to float32 and plain numpy math, an f32 KV cache.

It shares nothing with the C kernels but the graph, so agreement between the two is evidence.
"""
from __future__ import annotations

import numpy as np

from ..quant.blocks import dequantize
from .config import ModelConfig
from .weights import Weights


class RefCache:
    """Per-layer f32 K/V arrays [n, n_head_kv, head_dim], grown by concatenation (fine for a reference)."""

    def __init__(self, n_layer: int, max_tokens: int):
        self.k = [None] * n_layer
        self.v = [None] * n_layer
        self.max_tokens = max_tokens

    def __len__(self) -> int:
        return 0 if self.k[-1] is None else self.k[-1].shape[0]

    def append(self, layer, k, v):
        if self.k[layer] is not None and self.k[layer].shape[0] + k.shape[0] > self.max_tokens:
            raise ValueError(f"KV cache full: more than {self.max_tokens} tokens")
        self.k[layer] = k.copy() if self.k[layer] is None else np.concatenate([self.k[layer], k])
        self.v[layer] = v.copy() if self.v[layer] is None else np.concatenate([self.v[layer], v])

    def reset(self):
        self.k = [None] * len(self.k)
        self.v = [None] * len(self.v)

    def truncate(self, n: int):
        self.k = [None if a is None else a[:n] for a in self.k]
        self.v = [None if a is None else a[:n] for a in self.v]

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k + self.v if a is not None)


def rmsnorm(x, w, eps):
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * w


def rope(x, pos, rope_dim, base, neox):
    """x [n, heads, head_dim]: rotate pairs of the first rope_dim dims by pos * base^(-2j/rope_dim)."""
    half = rope_dim // 2
    theta = pos[:, None].astype(np.float64) * base ** (-np.arange(half) * 2.0 / rope_dim)
    cos, sin = np.cos(theta)[:, None, :].astype(np.float32), np.sin(theta)[:, None, :].astype(np.float32)
    out = x.copy()
    if neox:
        a, b = x[..., :half], x[..., half:rope_dim]
        out[..., :half], out[..., half:rope_dim] = a * cos - b * sin, a * sin + b * cos
    else:
        a, b = x[..., 0:rope_dim:2], x[..., 1:rope_dim:2]
        out[..., 0:rope_dim:2], out[..., 1:rope_dim:2] = a * cos - b * sin, a * sin + b * cos
    return out


def attention(q, k, v, q_pos, scale):
    """q [n, H, d], k/v [T, Hkv, d]; key t visible to query i iff t <= q_pos[i] (keys are positions 0..T-1)."""
    group = q.shape[1] // k.shape[1]
    k, v = np.repeat(k, group, axis=1), np.repeat(v, group, axis=1)
    s = np.einsum("nhd,thd->hnt", q, k) * scale
    s = np.where(np.arange(k.shape[0])[None, None, :] <= q_pos[None, :, None], s, -np.inf)
    s = np.exp(s - s.max(-1, keepdims=True))
    s /= s.sum(-1, keepdims=True)
    return np.einsum("hnt,thd->nhd", s, v)


class NumpyBackend:
    def __init__(self, cfg: ModelConfig, w: Weights):
        self.cfg, self.w = cfg, w
        self._f32 = {}

    def new_cache(self, max_tokens, kv_dtype, block_size):
        return RefCache(self.cfg.n_layer, max_tokens)

    def _mat(self, t) -> np.ndarray:
        if t.name not in self._f32:
            self._f32[t.name] = dequantize(np.asarray(t.data), t.type, t.rows * t.cols).reshape(t.rows, t.cols)
        return self._f32[t.name]

    def embed(self, ids):
        return self._mat(self.w.token_embd)[ids].copy()

    def layer(self, i, x, pos, cache):
        c, lw = self.cfg, self.w.layers[i]
        n = x.shape[0]
        h = rmsnorm(x, lw.attn_norm, c.norm_eps)
        q = (h @ self._mat(lw.wq).T).reshape(n, c.n_head, c.head_dim)
        k = (h @ self._mat(lw.wk).T).reshape(n, c.n_head_kv, c.head_dim)
        v = (h @ self._mat(lw.wv).T).reshape(n, c.n_head_kv, c.head_dim)
        q = rope(q, pos, c.rope_dim, c.rope_base, c.rope_neox)
        k = rope(k, pos, c.rope_dim, c.rope_base, c.rope_neox)
        cache.append(i, k, v)
        a = attention(q, cache.k[i], cache.v[i], pos, 1.0 / np.sqrt(c.head_dim)).reshape(n, -1)
        x += a @ self._mat(lw.wo).T
        h = rmsnorm(x, lw.ffn_norm, c.norm_eps)
        g, u = h @ self._mat(lw.w_gate).T, h @ self._mat(lw.w_up).T
        x += (g / (1 + np.exp(-g)) * u) @ self._mat(lw.w_down).T

    def logits(self, x, n):
        return (rmsnorm(x[:n], self.w.out_norm, self.cfg.norm_eps) @ self._mat(self.w.output).T).astype(np.float32)
