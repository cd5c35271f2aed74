"""Typed model configuration read from GGUF metadata."""
from __future__ import annotations

from dataclasses import dataclass

from ..formats.errors import ModelFormatError

SUPPORTED_ARCHS = ("llama",)


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    name: str
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    rope_dim: int
    rope_base: float
    rope_neox: bool          # pairs (i, i+d/2) instead of GGUF llama's interleaved pairs (2i, 2i+1)
    norm_eps: float
    n_ctx_train: int
    vocab_size: int
    tied_embeddings: bool

    @classmethod
    def from_gguf(cls, gf) -> "ModelConfig":
        md = gf.metadata
        arch = gf.require("general.architecture")
        if arch not in SUPPORTED_ARCHS:
            raise ModelFormatError(gf.path, f"unsupported architecture {arch!r} (supported: {', '.join(SUPPORTED_ARCHS)})")

        def key(k, default=None):
            v = md.get(f"{arch}.{k}", default)
            if v is None:
                raise ModelFormatError(gf.path, f"missing metadata key '{arch}.{k}'")
            return v

        n_embd, n_head = int(key("embedding_length")), int(key("attention.head_count"))
        head_dim = int(md.get(f"{arch}.attention.key_length", n_embd // n_head))
        embd = gf.get("token_embd.weight")
        return cls(
            arch=arch, name=str(md.get("general.name", gf.path.stem)),
            n_layer=int(key("block_count")), n_embd=n_embd, n_ff=int(key("feed_forward_length")),
            n_head=n_head, n_head_kv=int(key("attention.head_count_kv", n_head)), head_dim=head_dim,
            rope_dim=int(key("rope.dimension_count", head_dim)), rope_base=float(key("rope.freq_base", 10000.0)),
            rope_neox=False, norm_eps=float(key("attention.layer_norm_rms_epsilon")),
            n_ctx_train=int(key("context_length")), vocab_size=embd.shape[0],
            tied_embeddings="output.weight" not in gf.tensors,
        )

    @property
    def kv_dim(self) -> int:
        return self.n_head_kv * self.head_dim
