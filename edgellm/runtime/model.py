"""The llama-family forward pass, over a KV cache, with two interchangeable backends:

- `native`: C kernels (quantized weights read in place from the memory map, 8-bit activations),
- `numpy`:  the reference -- weights dequantized to f32, plain numpy math, an f32 KV cache.

Both run the same graph per layer: norm -> QKV -> RoPE -> KV append -> attention -> output
projection -> residual -> norm -> SiLU-gated MLP -> residual. Prompts are processed in chunks, so
prefill memory is O(chunk x cache), never O(n^2). With a budget cache, a chunk that would overflow
the budget first triggers a compaction (scored by the cache's policy; InfiniPot's catalyst prompt
runs here, on top of the pot).
"""
from __future__ import annotations

import os

import numpy as np

from ..formats.gguf import GGUFFile
from .config import ModelConfig
from .weights import Weights

DEFAULT_CHUNK = 256
NOVELTY_ROWS = 32  # logits rows computed at once for per-token novelty (bounds that buffer: 32 x vocab floats)


def physical_cores() -> int:
    import psutil
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


def _surprise(lg: np.ndarray, nxt: np.ndarray) -> np.ndarray:
    """-log softmax(lg)[r, nxt[r]] for each row r (float32, max-shifted), in one scratch array."""
    e = lg - lg.max(-1, keepdims=True)
    picked = e[np.arange(len(nxt)), nxt]
    return np.log(np.exp(e, out=e).sum(-1)) - picked


class Model:
    def __init__(self, path, n_threads: int | None = None, backend: str = "native"):
        self.gguf = GGUFFile(path)
        self.config = ModelConfig.from_gguf(self.gguf)
        self.weights = Weights.from_gguf(self.gguf, self.config)
        self.n_threads = n_threads or physical_cores()
        if backend == "native":
            from .backend_native import NativeBackend
            self.backend = NativeBackend(self.config, self.weights, self.n_threads)
        elif backend == "numpy":
            from .backend_numpy import NumpyBackend
            self.backend = NumpyBackend(self.config, self.weights)
        else:
            raise ValueError(f"backend {backend!r}: choose 'native' or 'numpy'")
        self.backend_name = backend

    def new_cache(self, max_tokens: int, kv_dtype: str = "f16", block_size: int = 64):
        """A full cache of up to max_tokens tokens."""
        return self.backend.new_cache(max_tokens, kv_dtype, block_size)

    def new_budget_cache(self, kv, budget: int):
        """A cache that holds at most `budget` tokens under kv.policy (a KVConfig other than 'full')."""
        if self.backend_name != "native":
            raise ValueError("KV budget policies need the native backend")
        from ..kv.budget import BudgetKVCache, RopeSpec
        from ..kv.policies import make_policy
        c = self.config
        return BudgetKVCache(c.n_layer, c.n_head, c.n_head_kv, c.head_dim, budget, int(budget * kv.compress_ratio),
                             make_policy(kv), RopeSpec(c.rope_dim, c.rope_base, c.rope_neox), kv.kv_dtype,
                             kv.block_size, headroom=kv.query_tokens + 192, cap_reduce_max=kv.cap_reduce == "max",
                             obs_window=kv.snapkv_window)

    def forward(self, ids, cache, logits: str = "last", chunk: int = DEFAULT_CHUNK) -> np.ndarray:
        """Append `ids` to `cache`; return float32 logits for the last position ('last', shape [1, vocab])
        or for every position ('all', [len(ids), vocab])."""
        ids = np.asarray(ids, dtype=np.int32).reshape(-1)
        if ids.size == 0:
            raise ValueError("forward() needs at least one token")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"token id out of range [0, {self.config.vocab_size})")
        chunk = min(chunk, cache.max_chunk())
        out = []
        for s in range(0, ids.size, chunk):
            part = ids[s:s + chunk]
            if cache.needs_compaction(part.size):
                self._compact(cache)
            x = self._run(part, cache)
            last = self._novelty(x, part, cache) if cache.wants_novelty else None
            if logits == "all":
                out.append(self.backend.logits(x, part.size))
            elif s + chunk >= ids.size:
                out.append(last[None] if last is not None else self.backend.next_logits(x[part.size - 1:]))
        return out[0] if len(out) == 1 else np.concatenate(out)

    def decode_run(self, tok: int, cache, max_n: int, stop, sampler, history) -> list[int] | None:
        """Up to max_n tokens after tok (history: the tokens before it), drawn by `sampler`, in one native call
        (NativeBackend.decode_run): tok and each returned token but the last go into the cache. Fewer when a token
        of `stop` comes or the tails' room ends; None when the caller must go token by token (forward): another
        backend, or a budget cache, which scores and distills between tokens."""
        from ..kv.cache import KVCache
        run = getattr(self.backend, "decode_run", None)
        if run is None or type(cache) is not KVCache or not 0 <= tok < self.config.vocab_size:
            return None
        return run(tok, cache, max_n, stop, sampler, history)

    def _run(self, ids: np.ndarray, cache) -> np.ndarray:
        pos = np.arange(cache.next_pos, cache.next_pos + ids.size, dtype=np.int32)
        x = self.backend.embed(ids)
        if not self.backend.step(x, pos, cache):
            for layer in range(self.config.n_layer):
                self.backend.layer(layer, x, pos, cache)
        return x

    def _compact(self, cache) -> None:
        if "catalyst_mass" in cache.policy.needs:
            cache.begin_probe()
            self._run(np.asarray(cache.catalyst_ids, np.int32), cache)
            cache.end_probe()
        cache.compact()

    def _novelty(self, x: np.ndarray, part: np.ndarray, cache) -> np.ndarray:
        """Record each token's -log p(token | context) in the cache; return the chunk's last logits row.
        Rows that only score novelty take 8-bit activations; the last row is the next-token row that
        generation samples from, so it is the refined product every policy gets."""
        n = part.size
        nov = np.zeros(n, np.float32)
        if cache.prev_logits is not None:
            nov[0] = _surprise(cache.prev_logits[None], part[:1])[0]
        for r0 in range(0, n - 1, NOVELTY_ROWS):
            rows = min(NOVELTY_ROWS, n - 1 - r0)
            lg = self.backend.logits(x[r0:r0 + rows], rows, precise=False)
            nov[r0 + 1:r0 + 1 + rows] = _surprise(lg, part[r0 + 1:r0 + 1 + rows])
        last = self.backend.next_logits(x[n - 1:])[0]
        cache.prev_logits = last
        cache.record_novelty(nov)
        return last
