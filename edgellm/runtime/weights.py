"""Model weights: named views into the GGUF memory map (nothing is copied at load)."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..formats.gguf import GGUFFile, Tensor
from .config import ModelConfig


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

    def tensors(self):
        yield self.token_embd
        for lw in self.layers:
            yield from (lw.wq, lw.wk, lw.wv, lw.wo, lw.w_gate, lw.w_up, lw.w_down)
        if self.output is not self.token_embd:
            yield self.output
