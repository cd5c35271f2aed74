"""Model weights: named views into the GGUF memory map (nothing is copied at load)."""
from __future__ import annotations

import mmap
from dataclasses import dataclass, replace

import numpy as np

from ..formats.gguf import GGUFFile, Tensor
from .config import ModelConfig

# The order a decode step multiplies by a layer's matrices (el_forward_layers): QKV, output projection, gate and up, down
STEP_ORDER = ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")


@dataclass
class LayerWeights:
    attn_norm: np.ndarray  # [n_embd] f32
    wq: Tensor             # [n_head*head_dim, n_embd]
    wk: Tensor             # [n_head_kv*head_dim, n_embd]
    wv: Tensor
    wo: Tensor             # [n_embd, n_head*head_dim]
    ffn_norm: np.ndarray
    w_gate: Tensor         # [n_ff, n_embd]
    w_up: Tensor
    w_down: Tensor         # [n_embd, n_ff]


@dataclass
class Weights:
    token_embd: Tensor     # [vocab, n_embd]
    layers: list[LayerWeights]
    out_norm: np.ndarray
    output: Tensor         # [vocab, n_embd]; the embedding itself when tied

    @classmethod
    def from_gguf(cls, gf: GGUFFile, cfg: ModelConfig) -> "Weights":
        def norm(name):
            return np.asarray(gf.get(name).data, dtype=np.float32)

        def layer(i):
            p = f"blk.{i}."
            return LayerWeights(norm(p + "attn_norm.weight"), gf.get(p + "attn_q.weight"), gf.get(p + "attn_k.weight"),
                                gf.get(p + "attn_v.weight"), gf.get(p + "attn_output.weight"),
                                norm(p + "ffn_norm.weight"), gf.get(p + "ffn_gate.weight"),
                                gf.get(p + "ffn_up.weight"), gf.get(p + "ffn_down.weight"))
        embd = gf.get("token_embd.weight")
        return cls(embd, [layer(i) for i in range(cfg.n_layer)], norm("output_norm.weight"),
                   embd if cfg.tied_embeddings else gf.get("output.weight"))

    def pack_layers(self, gf: GGUFFile) -> np.ndarray:
        """Copy every layer matrix into one new buffer, layer after layer and each layer's in STEP_ORDER, point the
        layers at the copies and release the map's pages they came from; returns the buffer. The file orders tensors
        by name (blk.0, blk.1, blk.10, ...; in a layer down, gate, up, k, output, q, v), so a decode step reading them
        from the map starts a new stream at every matrix; from the buffer its weights are one forward stream that the
        hardware prefetcher and the GEMV's software prefetch follow from one matrix into the next."""
        mats = [(lw, name) for lw in self.layers for name in STEP_ORDER]
        sizes = [-(-getattr(lw, name).data.nbytes // 64) * 64 for lw, name in mats]   # each matrix on a cache line
        # anonymous memory, page-aligned: weights stay off the Python heap, as they were in the map
        buf = np.frombuffer(mmap.mmap(-1, sum(sizes)), np.uint8)
        # the output matrix stays in the map and is repacked there: its pages must keep what the kernels write
        keep = [self.token_embd.data, self.output.data]
        start = 0
        for (lw, name), size in zip(mats, sizes):
            t = getattr(lw, name)
            copy = buf[start:start + t.data.nbytes].view(t.data.dtype).reshape(t.data.shape)
            copy[...] = t.data
            copy.flags.writeable = False
            setattr(lw, name, replace(t, data=copy))
            gf.release([t.data], keep)   # one matrix at a time: the map adds at most one to peak RSS
            start += size
        return buf

    def tensors(self):
        yield self.token_embd
        for lw in self.layers:
            yield from (lw.wq, lw.wk, lw.wv, lw.wo, lw.w_gate, lw.w_up, lw.w_down)
        if self.output is not self.token_embd:
            yield self.output
