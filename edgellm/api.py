"""The public Python API: `LLM`."""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import psutil

from .kv.config import KVConfig
from .runtime.generate import StopMatcher
from .runtime.memory import peak_rss_mb, trim_heap
from .runtime.model import Model
from .runtime.registry import DEFAULT_MODEL, resolve
from .runtime.sampling import Sampler, SamplingParams
from .runtime.tokenizer import Tokenizer
from .quant.blocks import row_bytes


class LLM:
    """A loaded model with a conversation cache.

    One LLM serves one call at a time: calls from several threads are serialised by a lock.
    Use `close()` (or a `with` block) to release the memory map and the KV cache.
    """

    # Decoding runs this many tokens per native call (Model.decode_run) and streams them as they are handed out: at
    # 150 tok/s a burst is ~0.1 s. 0: one call per token.
    run_tokens = 16

    def __init__(self, model: str | os.PathLike = DEFAULT_MODEL, n_threads: int | None = None,
                 kv: KVConfig | None = None, n_ctx: int | None = None, backend: str = "native"):
        self.kv = kv or KVConfig()
        if not isinstance(self.kv, KVConfig):
            raise TypeError("kv must be an edgellm.KVConfig")
        if n_threads is not None and n_threads < 1:
            raise ValueError("n_threads must be >= 1")
        self.path = resolve(model)
        if self.path.is_dir():
            raise ValueError(f"{self.path}: Hugging Face model directories are not supported yet; give a .gguf file")
        self.model = Model(self.path, n_threads, backend)
        cfg = self.model.config
        md = self.model.gguf.metadata
        self.tokenizer = Tokenizer.from_metadata(md)
        for key in Tokenizer.BUILD_KEYS:   # megabytes of str that nothing reads once the tokenizer is built
            md.pop(key, None)
        trim_heap()
        self._template = None
        per_token = 2 * cfg.n_layer * cfg.n_head_kv * row_bytes(self.kv.kv_dtype, cfg.head_dim)
        self.budget = self.kv.budget_tokens(per_token, cfg.n_ctx_train)
        if self.kv.policy == "full":
            self.n_ctx = n_ctx or self.budget
            if self.n_ctx > cfg.n_ctx_train:
                raise ValueError(f"n_ctx={self.n_ctx} exceeds the model's trained context of {cfg.n_ctx_train} tokens "
                                 f"(the 'full' KV policy cannot go beyond it; a budget policy such as 'infinipot' can)")
            self._cache = self.model.new_cache(self.n_ctx, self.kv.kv_dtype, self.kv.block_size)
        else:
            if n_ctx is not None:
                raise ValueError(f"n_ctx applies to policy='full'; policy={self.kv.policy!r} holds `budget` tokens "
                                 f"and reads prompts of any length")
            self.n_ctx = None
            self._cache = self.model.new_budget_cache(self.kv, self.budget)
            self._catalyst = self.tokenizer.encode(self.kv.catalyst, add_bos=False)
            self._cache.catalyst_ids = self._catalyst
        self._tokens: list[int] = []  # the tokens whose K/V are in _cache, in order
        self._lock = threading.Lock()
        self._stats = {"prefill_tokens": 0, "prefill_s": 0.0, "decode_tokens": 0, "decode_s": 0.0}

    # -- text <-> ids --------------------------------------------------------------------------
    def tokenize(self, text: str, add_bos: bool | None = None, special: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_bos=add_bos, parse_special=special)

    def detokenize(self, ids, skip_special: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special=skip_special)

    # -- logits ---------------------------------------------------------------------------------
    def logits(self, ids) -> np.ndarray:
        """Teacher-forced float32 logits at every position of `ids` (a fresh full cache; the conversation is kept)."""
        ids = self._as_ids(ids)
        if len(ids) > self.model.config.n_ctx_train:
            raise ValueError(f"logits() takes at most the model's {self.model.config.n_ctx_train} tokens, got {len(ids)}")
        with self._lock:
            return self.model.forward(ids, self.model.new_cache(len(ids), self.kv.kv_dtype, self.kv.block_size),
                                      logits="all")

    # -- generation -----------------------------------------------------------------------------
    def generate(self, prompt, max_tokens: int = 128, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0, repeat_penalty: float = 1.0, seed: int | None = None,
                 stream: bool = False, stop: str | list[str] | None = None, ignore_eos: bool = False):
        """Complete `prompt` (text or token ids). Returns the text, or an iterator of text pieces if stream=True."""
        ids = self._as_ids(prompt)
        params = SamplingParams(temperature, top_k, top_p, min_p, repeat_penalty, seed=seed)
        if max_tokens < 0:
            raise ValueError("max_tokens must be >= 0")
        self._check_fits(len(ids))
        stops = [stop] if isinstance(stop, str) else list(stop or [])
        pieces = self._stream(ids, max_tokens, params, stops, ignore_eos)
        return pieces if stream else "".join(pieces)

    @property
    def template(self):
        """The model's chat template (a ChatTemplate), compiled on first use: programs that only
        `generate` never import Jinja, ~5 MB of peak RSS."""
        if self._template is None:
            from .runtime.chat_template import ChatTemplate
            self._template = ChatTemplate.from_metadata(self.model.gguf.metadata, self.tokenizer)
        return self._template

    def chat(self, messages: list[dict], stream: bool = False, **sampling):
        """Reply to a conversation, rendered with the model's chat template."""
        text = self.template.render(messages, add_generation_prompt=True)
        bos = self.tokenizer.bos_id
        ids = self.tokenizer.encode(text, add_bos=False, parse_special=True)
        if self.tokenizer.add_bos and bos is not None and (not ids or ids[0] != bos):
            ids = [bos] + ids
        return self.generate(ids, stream=stream, **sampling)

    def _as_ids(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            ids = self.tokenize(prompt)
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError("the prompt is empty")
        vocab = self.model.config.vocab_size
        if min(ids) < 0 or max(ids) >= vocab:
            raise ValueError(f"token ids must lie in [0, {vocab})")
        return ids

    def _check_fits(self, n: int) -> None:
        if self.n_ctx is not None and n > self.n_ctx:
            raise ValueError(f"the prompt has {n} tokens but the context holds {self.n_ctx} "
                             f"(policy {self.kv.policy!r}); shorten it or raise n_ctx/budget")

    def _prefill(self, ids: list[int]) -> np.ndarray:
        """Bring the cache to hold `ids`, reusing the longest shared prefix; return the last logits."""
        keep = 0
        for a, b in zip(self._tokens, ids):
            if a != b:
                break
            keep += 1
        keep = min(keep, len(ids) - 1)  # at least one token must run to produce logits
        if getattr(self._cache, "compactions", 0):   # a distilled cache can only be extended, not cut back
            if keep < len(self._tokens):
                keep = 0
                self._cache.reset()
        else:   # counts stream tokens: only while each one still has its entry
            keep = self._cache.truncate(keep, exact=True)   # fewer where a quantized block would be cut
        if self.kv.query_aware and self.n_ctx is None:  # the prompt's end (the question) steers distillation
            self._cache.catalyst_ids = ids[-self.kv.query_tokens:] + self._catalyst
        self._tokens = self._tokens[:keep]
        t0 = time.perf_counter()
        logits = self.model.forward(ids[keep:], self._cache, logits="last")[-1]
        self._stats.update(prefill_tokens=len(ids) - keep, prefill_s=time.perf_counter() - t0)
        self._tokens = list(ids)
        return logits

    def _stream(self, ids, max_tokens, params, stops, ignore_eos) -> Iterator[str]:
        with self._lock:
            sampler, decoder, matcher = Sampler(params), self.tokenizer.stream_decoder(), StopMatcher(stops)
            self._stats.update(decode_tokens=0, decode_s=0.0)
            logits = self._prefill(ids)
            t0, n_gen = time.perf_counter(), 0
            run_stops = () if ignore_eos else self.tokenizer.stop_ids
            ahead = []   # a run's tokens still to hand out: all but the last are in the cache already
            try:
                while n_gen < max_tokens:
                    tok = ahead.pop(0) if ahead else sampler(logits, self._tokens)
                    n_gen += 1
                    if tok in self.tokenizer.stop_ids and not ignore_eos:
                        break
                    text = matcher.push(decoder.push(tok))
                    if text:
                        yield text
                    if matcher.stopped or n_gen == max_tokens or (self.n_ctx and len(self._tokens) >= self.n_ctx):
                        break
                    if not ahead:   # tok still has to go into the cache
                        run = self.run_tokens > 0 and self.model.decode_run(
                            tok, self._cache, min(self.run_tokens, max_tokens - n_gen), run_stops, sampler,
                            self._tokens)
                        if run:
                            ahead = run
                        else:
                            logits = self.model.forward([tok], self._cache, logits="last")[-1]
                    self._tokens.append(tok)
                if not matcher.stopped:
                    tail = matcher.push(decoder.flush()) + matcher.flush()
                    if tail:
                        yield tail
            finally:
                if ahead:   # stopped inside a run: the cache holds tokens the conversation does not
                    self._cache.truncate(len(self._tokens))
                self._stats.update(decode_tokens=n_gen, decode_s=time.perf_counter() - t0)

    # -- session ---------------------------------------------------------------------------------
    def reset(self) -> None:
        with self._lock:
            self._cache.reset()
            self._tokens = []

    def stats(self) -> dict:
        s = self._stats
        kv_hot = self._cache.nbytes()
        return {
            "prefill_tokens": s["prefill_tokens"],
            "prefill_tok_s": s["prefill_tokens"] / s["prefill_s"] if s["prefill_s"] else 0.0,
            "decode_tokens": s["decode_tokens"],
            "decode_tok_s": s["decode_tokens"] / s["decode_s"] if s["decode_s"] else 0.0,
            "peak_rss_mb": peak_rss_mb(),
            "rss_mb": psutil.Process().memory_info().rss / 2**20,
            "kv_bytes": {"hot": kv_hot, "ram": 0, "ssd": 0},
            "kv_tokens": len(self._tokens),
            "kv_bytes_per_token": kv_hot / len(self._tokens) if self._tokens else self._kv_bytes_per_token(),
            "n_threads": self.model.n_threads,
            "prefetch_hit_rate": None,
        }

    def _kv_bytes_per_token(self) -> float:
        return float(self._cache.bytes_per_token()) if hasattr(self._cache, "bytes_per_token") else 0.0

    def info(self) -> dict:
        cfg, gf = self.model.config, self.model.gguf
        types: dict[str, int] = {}
        for t in gf.tensors.values():
            types[t.type.name] = types.get(t.type.name, 0) + 1
        return {
            "arch": cfg.arch, "name": cfg.name, "path": str(self.path), "file_size": Path(self.path).stat().st_size,
            "n_params": int(sum(np.prod(t.shape) for t in gf.tensors.values())), "quant_types": types,
            "context_length": cfg.n_ctx_train, "n_layer": cfg.n_layer, "n_embd": cfg.n_embd, "n_head": cfg.n_head,
            "n_head_kv": cfg.n_head_kv, "vocab_size": cfg.vocab_size,
            "kv_bytes_per_token": self._kv_bytes_per_token(),
            "weights_bytes": int(sum(t.data.nbytes for t in gf.tensors.values())),
        }

    def close(self) -> None:
        self._cache = None
        self.model = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
