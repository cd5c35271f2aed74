"""Reference backend: weights dequantized to float32, the numpy twins of the kernels
(edgellm.native.reference), an f32 KV cache. It shares no C code with the native backend."""
from __future__ import annotations

import numpy as np

from ..kv.cache import GrowingCache
from ..native import reference as ref
from ..quant.blocks import GGMLType, dequantize
from .config import ModelConfig
from .weights import Weights


class RefCache(GrowingCache):
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

    def truncate(self, n: int, exact: bool = False) -> int:
        """Keep the first n tokens (float32 rows: kept exactly either way); returns n."""
        self.k = [None if a is None else a[:n] for a in self.k]
        self.v = [None if a is None else a[:n] for a in self.v]
        return n

    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.k + self.v if a is not None)


def attention(q, k, v, q_pos, scale):
    """q [n, H, d] over the whole cache k/v [T, Hkv, d] (key t sits at position t), as one f32 block."""
    block = (k.transpose(1, 0, 2).copy(), v.transpose(1, 0, 2).copy(), np.arange(len(k), dtype=np.int32), len(k),
             GGMLType.F32)
    return ref.attention(q, q_pos, k.shape[1], [block], scale)[0]


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

    def step(self, x, pos, cache) -> bool:
        return False  # the reference goes layer by layer

    def layer(self, i, x, pos, cache):
        c, lw = self.cfg, self.w.layers[i]
        n = x.shape[0]
        h = ref.rmsnorm(x, lw.attn_norm, c.norm_eps)
        q = (h @ self._mat(lw.wq).T).reshape(n, c.n_head, c.head_dim)
        k = (h @ self._mat(lw.wk).T).reshape(n, c.n_head_kv, c.head_dim)
        v = (h @ self._mat(lw.wv).T).reshape(n, c.n_head_kv, c.head_dim)
        q = ref.rope(q, pos, c.rope_dim, c.rope_base, c.rope_neox)
        k = ref.rope(k, pos, c.rope_dim, c.rope_base, c.rope_neox)
        cache.append(i, k, v)
        a = attention(q, cache.k[i], cache.v[i], pos, 1.0 / np.sqrt(c.head_dim)).reshape(n, -1)
        x += a @ self._mat(lw.wo).T
        h = ref.rmsnorm(x, lw.ffn_norm, c.norm_eps)
        g, u = h @ self._mat(lw.w_gate).T, h @ self._mat(lw.w_up).T
        x += ref.silu_mul(g, u) @ self._mat(lw.w_down).T

    def next_logits(self, x):
        return self.logits(x, 1)

    def logits(self, x, n, precise=True):
        return (ref.rmsnorm(x[:n], self.w.out_norm, self.cfg.norm_eps) @ self._mat(self.w.output).T).astype(np.float32)
