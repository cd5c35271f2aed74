"""Native backend: every op is one call into the C kernels; buffers are allocated once per chunk size."""
from __future__ import annotations

import mmap
import os

import numpy as np

from ..kv.cache import KVCache
from .. import native
from ..native import ffi, lib
from ..quant.blocks import REPACKED, GGMLType, row_bytes
from .config import ModelConfig
from .weights import Weights


def _fptr(a: np.ndarray):
    return ffi.from_buffer("float[]", a)   # ~6x cheaper than a.ctypes.data; refuses a non-contiguous array


def _weight(t):
    """The one el_weight of a mapped matrix (native.weight)."""
    return native.weight(t.data, t.type, t.rows, t.cols)


HUGE_PAGE = 2 << 20


class WeightArena:
    """One anonymous private map that the quantized matrices are repacked into on first use (el_weight.home), in the
    order given (a step's), asking the kernel for 2 MiB pages. The GGUF file's private map can only have 4 KiB pages,
    each a page walk for the GEMVs' prefetch and a stop for the hardware prefetcher: in huge pages a 1-thread decode
    ran up to 8% faster (bench/decode_ab.py --what huge-pages). The C side releases the file's pages as it repacks,
    so the weights are in RSS once, as with repacking in place; untouched, the arena costs nothing.
    EDGELLM_HUGE_PAGES=0 leaves the matrices in the file map (repacked in place)."""

    def __init__(self, weights):
        quant = [w for w in weights if w.type in REPACKED]
        slots = [-(-row_bytes(w.type, w.cols) * w.rows // 64) * 64 for w in quant]
        self.nbytes = sum(slots)
        self._map = mmap.mmap(-1, self.nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        self._bytes = np.frombuffer(self._map, np.uint8)
        self.start = -self._bytes.ctypes.data % HUGE_PAGE   # the first 2 MiB boundary inside the map
        if hasattr(mmap, "MADV_HUGEPAGE"):
            self._map.madvise(mmap.MADV_HUGEPAGE, self.start, self.nbytes)
        off = self.start
        for w, size in zip(quant, slots):
            w.home = ffi.cast("void *", self._bytes.ctypes.data + off)
            off += size

    @staticmethod
    def wanted() -> bool:
        return os.environ.get("EDGELLM_HUGE_PAGES", "1") != "0" and hasattr(mmap, "MAP_ANONYMOUS")

    def holds(self, w) -> bool:
        """Whether el_weight w's matrix lives in the arena (it does once repacked)."""
        a = int(ffi.cast("uintptr_t", w.w)) - self._bytes.ctypes.data
        return self.start <= a < self.start + self.nbytes


class NativeBackend:
    def __init__(self, cfg: ModelConfig, w: Weights, n_threads: int):
        self.cfg = cfg
        lib.el_set_threads(n_threads)
        self.weights = w   # owns the memory map the el_weight structs point into
        self.layers = [{name: _weight(getattr(lw, name)) for name in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")}
                       for lw in w.layers]
        self.norms = [(lw.attn_norm, lw.ffn_norm) for lw in w.layers]
        # per layer, the arguments of the two fused C steps that do not change between calls
        self._fused = [(_fptr(an), *(self.layers[i][k] for k in ("wq", "wk", "wv")),
                        _fptr(fn), *(self.layers[i][k] for k in ("wo", "w_gate", "w_up", "w_down")))
                       for i, (an, fn) in enumerate(self.norms)]
        self._pos = (None, None)
        self._layer_w = ffi.new("el_layer_w[]", [
            {"attn_norm": f[0], "wq": f[1], "wk": f[2], "wv": f[3], "ffn_norm": f[4], "wo": f[5], "gate": f[6],
             "up": f[7], "down": f[8]} for f in self._fused])
        self._model = ffi.new("el_model *", {
            "n_layer": cfg.n_layer, "dim": cfg.n_embd, "n_head": cfg.n_head, "n_kv_head": cfg.n_head_kv,
            "head_dim": cfg.head_dim, "rope_dim": cfg.rope_dim, "neox": cfg.rope_neox, "eps": cfg.norm_eps,
            "rope_base": cfg.rope_base, "scale": 1.0 / np.sqrt(cfg.head_dim), "layers": self._layer_w})
        self.out_norm = w.out_norm
        # tied: one matrix, so one struct (the output layer repacks it, then the embedding reads it repacked)
        self.embd = _weight(w.token_embd)
        self.output = self.embd if w.output is w.token_embd else _weight(w.output)
        step_order = [lw[k] for lw in self.layers for k in ("wq", "wk", "wv", "wo", "w_gate", "w_up", "w_down")]
        self.arena = WeightArena(step_order + [self.output]) if WeightArena.wanted() else None
        self.scale = 1.0 / np.sqrt(cfg.head_dim)
        self._cap = 0
        self._out_rho = None   # per output row, el_weight_l1_ratio (first next_logits)

    def new_cache(self, max_tokens, kv_dtype, block_size):
        c = self.cfg
        return KVCache(c.n_layer, c.n_head_kv, c.head_dim, max_tokens, kv_dtype, block_size)

    def _buffers(self, n: int):
        if n > self._cap:
            c = self.cfg
            q_dim, kv_dim = c.n_head * c.head_dim, c.kv_dim
            self._cap = n
            self.x = np.empty((n, c.n_embd), np.float32)
            self.h = np.empty((n, c.n_embd), np.float32)
            self.q = np.empty((n, q_dim), np.float32)
            self.k = np.empty((n, kv_dim), np.float32)
            self.v = np.empty((n, kv_dim), np.float32)
            self.att = np.empty((n, q_dim), np.float32)
            self.lse = np.empty((n, c.n_head), np.float32)
            self.g = np.empty((n, c.n_ff), np.float32)
            self.u = np.empty((n, c.n_ff), np.float32)
            self.p = {name: _fptr(getattr(self, name)) for name in ("x", "h", "q", "k", "v", "att", "lse", "g", "u")}
            self._bufs = ffi.new("el_buffers *", {name: self.p[name] for name in ("h", "q", "k", "v", "att", "lse", "g", "u")})
            self._views = {}

    def _views_for(self, n: int):
        """The [n]-token views layer() hands to the KV manager, made once per chunk size."""
        views = self._views.get(n)
        if views is None:
            c = self.cfg
            kv, heads = (n, c.n_head_kv, c.head_dim), (n, c.n_head, c.head_dim)
            views = self._views[n] = (self.k[:n].reshape(kv), self.v[:n].reshape(kv), self.q[:n].reshape(heads),
                                      self.att[:n].reshape(heads), self.lse[:n])
        return views

    def embed(self, ids: np.ndarray) -> np.ndarray:
        n = ids.size
        self._buffers(n)
        e = self.embd
        lib.el_get_rows(e.w, e.type, e.cols, ffi.from_buffer("int32_t[]", ids), n, self.p["x"])
        return self.x[:n]

    def step(self, x: np.ndarray, pos: np.ndarray, cache: KVCache) -> bool:
        """Every layer in one C call (el_forward_layers) when the cache can take the tokens that way; False when
        the caller must go layer by layer."""
        n = x.shape[0]
        n_blocks, seal = cache.step_blocks(n)
        if not n_blocks:
            return False
        if lib.el_forward_layers(self._model, cache.desc_table, n_blocks, cache.rotated,
                                 ffi.from_buffer("int32_t[]", pos), n, self.p["x"], self._bufs, seal):
            raise RuntimeError("el_forward_layers refused a step the cache had checked (or ran out of memory)")
        cache.stepped(n)
        return True

    def layer(self, i: int, x: np.ndarray, pos: np.ndarray, cache: KVCache) -> None:
        """Two fused C steps around the KV manager: norm + QKV + RoPE, then (append, attend), then o-proj + residual +
        norm + gated MLP + residual; the same kernels and numerics as one call per op."""
        c, p = self.cfg, self.p
        n, d = x.shape
        an, wq, wk, wv, fn, wo, wg, wu, wd = self._fused[i]
        if self._pos[0] is not pos:   # the model passes one pos array to every layer of a step
            self._pos = (pos, ffi.cast("int32_t *", pos.ctypes.data))
        lib.el_attn_in(p["x"], n, d, an, c.norm_eps, wq, wk, wv, self._pos[1], c.n_head, c.n_head_kv, c.head_dim,
                       c.rope_dim, c.rope_base, c.rope_neox, p["h"], p["q"], p["k"], p["v"])
        k, v, q, att, lse = self._views_for(n)
        cache.append(i, k, v, pos)
        cache.attend(i, q, pos, att, lse, self.scale)
        lib.el_attn_out_mlp(p["x"], p["att"], n, d, wo, fn, c.norm_eps, wg, wu, wd, p["h"], p["g"], p["u"])

    def _normed(self, x: np.ndarray, n: int) -> np.ndarray:
        h = np.empty((n, self.cfg.n_embd), np.float32)
        xs = np.ascontiguousarray(x[:n])
        lib.el_rmsnorm(_fptr(xs), _fptr(self.out_norm), n, self.cfg.n_embd, self.cfg.norm_eps, _fptr(h))
        lib.el_weight_prepare(self.output)
        return h

    def _rho(self):
        """el_logits_refine's rho for the output matrix (made on first use; NULL for an f16 / f32 matrix)."""
        o = self.output
        if self._out_rho is None and o.type not in (GGMLType.F32, GGMLType.F16):
            lib.el_weight_prepare(o)
            rho = np.empty(o.rows, np.uint8)
            if lib.el_weight_l1_ratio(o, ffi.cast("uint8_t *", rho.ctypes.data)) != 0:
                raise MemoryError("el_weight_l1_ratio: out of memory")
            self._out_rho = rho
        return ffi.from_buffer("uint8_t[]", self._out_rho) if self._out_rho is not None else ffi.NULL

    def next_logits(self, x: np.ndarray) -> np.ndarray:
        """Logits [1, vocab] of x's first row for choosing the next token: equal to logits() on every token that
        could be the largest, the rest within the 8-bit product's error bound (el_logits_refine)."""
        h, o = self._normed(x, 1), self.output
        out = np.empty((1, o.rows), np.float32)
        if lib.el_logits_refine(o, self._rho(), _fptr(h), _fptr(out), ffi.NULL) < 0:
            raise MemoryError("el_logits_refine: out of memory")
        return out

    def decode_run(self, tok: int, cache: KVCache, max_n: int, stop, sampler, history) -> list[int] | None:
        """Up to max_n tokens after tok, each drawn by `sampler` from next_logits, in one C call (el_decode_run: no
        Python between tokens, where it runs with cold caches): tok and every returned token but the last go into
        the cache; the last (a token of `stop`, or the max_n-th) does not. history: the tokens before tok. Fewer
        where the tails' room ends (no tail fills in a run: the one that fills it goes by step); None when there is
        none."""
        max_n = min(max_n, cache.tail_room() - 1)
        if max_n <= 0:
            return None
        n_blocks, _ = cache.step_blocks(max_n)   # no seal table: the run leaves room in the tails
        if not n_blocks:
            return None
        self._buffers(1)
        h, logits = np.empty(self.cfg.n_embd, np.float32), np.empty(self.output.rows, np.float32)
        out, stops = np.empty(max_n, np.int32), np.array(sorted(stop), np.int32)
        hist = sampler.recent(history, then=(tok,), room=max_n)
        k = lib.el_decode_run(self._model, cache.desc_table, n_blocks, cache.rotated, cache.next_pos, tok, max_n,
                              ffi.from_buffer("int32_t[]", stops) if stops.size else ffi.NULL, stops.size, self.embd,
                              self.output, _fptr(self.out_norm), self._rho(), sampler.c, sampler.state,
                              ffi.from_buffer("int32_t[]", hist), hist.size - max_n, self.p["x"], self._bufs,
                              _fptr(h), _fptr(logits), ffi.from_buffer("int32_t[]", out))
        if k < 0:
            raise RuntimeError("el_decode_run failed: no token to sample (NaN logits: a corrupt model?), out of memory, "
                               "or a run the cache had checked was refused")
        cache.stepped(k)
        return out[:k].tolist()

    def logits(self, x: np.ndarray, n: int, precise: bool = True) -> np.ndarray:
        h, o = self._normed(x, n), self.output
        out = np.empty((n, o.rows), np.float32)
        # ~16-bit activations here: 8-bit ones at the output layer cost the most agreement with the reference;
        # scores that only rank tokens (InfiniPot's novelty) take the cheaper 8-bit product
        product = lib.el_matmul_hp if precise else lib.el_matmul
        product(o.w, o.type, o.rows, o.cols, _fptr(h), n, _fptr(out), o.rows)
        return out
