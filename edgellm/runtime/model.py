"""The llama-family forward pass, over a KV cache, with two interchangeable backends:

- `native`: C kernels (quantized weights read in place from the memory map, 8-bit activations),
- `numpy`:  the reference -- weights dequantized to f32, plain numpy math, an f32 KV cache.

Both run the same graph per layer: norm -> QKV -> RoPE -> KV append -> attention -> output
projection -> residual -> norm -> SiLU-gated MLP -> residual. Prompts are processed in chunks, so
prefill memory is O(chunk x cache), never O(n^2).
"""
from __future__ import annotations

import os

import numpy as np

from ..formats.gguf import GGUFFile
from .config import ModelConfig
from .weights import Weights

DEFAULT_CHUNK = 512


def physical_cores() -> int:
    import psutil
    return psutil.cpu_count(logical=False) or os.cpu_count() or 1


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

    def new_cache(self, max_tokens: int, kv_dtype: str = "f16", block_size: int = 64):
        return self.backend.new_cache(max_tokens, kv_dtype, block_size)

    def forward(self, ids, cache, logits: str = "last", chunk: int = DEFAULT_CHUNK) -> np.ndarray:
        """Append `ids` to `cache`; return float32 logits for the last position ('last', shape [1, vocab])
        or for every position ('all', [len(ids), vocab])."""
        ids = np.asarray(ids, dtype=np.int32).reshape(-1)
        if ids.size == 0:
            raise ValueError("forward() needs at least one token")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"token id out of range [0, {self.config.vocab_size})")
        out = []
        for s in range(0, ids.size, chunk):
            part = ids[s:s + chunk]
            pos = np.arange(len(cache), len(cache) + part.size, dtype=np.int32)
            x = self.backend.embed(part)
            for layer in range(self.config.n_layer):
                self.backend.layer(layer, x, pos, cache)
            if logits == "all":
                out.append(self.backend.logits(x, part.size))
            elif s + chunk >= ids.size:
                out.append(self.backend.logits(x[part.size - 1:part.size], 1))
        return out[0] if len(out) == 1 else np.concatenate(out)
