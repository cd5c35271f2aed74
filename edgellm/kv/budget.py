"""A KV cache with a fixed budget: when the next chunk would overflow it, a policy picks the entries
to keep, and the manager compacts every layer down to `keep` entries.

The manager keeps what the policies score by (attention mass received, the observation window's
queries, the catalyst's attention, per-token novelty), gathers survivors, and for CR-RoPE policies
re-rotates surviving keys to contiguous positions 0..keep-1, so no position ever exceeds the budget.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..native import ffi, lib
from .cache import NO_STEP, KVCache, _fp
from .policies import LayerScores, Policy


@dataclass(frozen=True)
class RopeSpec:
    dim: int
    base: float
    neox: bool


class BudgetKVCache(KVCache):
    """`budget` tokens hot per layer; `headroom` extra slots hold a catalyst prompt while it scores."""
    slab_blocks = 1   # compaction rewrites the cache a block at a time: no slabs

    def __init__(self, n_layer: int, n_head: int, n_head_kv: int, head_dim: int, budget: int, keep: int,
                 policy: Policy, rope: RopeSpec, kv_dtype: str = "f16", block_size: int = 64,
                 headroom: int = 256, cap_reduce_max: bool = True, obs_window: int = 32):
        if not 0 < keep < budget:
            raise ValueError(f"keep={keep} must lie in (0, budget={budget})")
        self.budget, self.keep, self.policy, self.rope, self.n_head = budget, keep, policy, rope, n_head
        self.headroom, self.cap_reduce_max, self.obs_window = headroom, cap_reduce_max, obs_window
        self.catalyst_ids: list[int] = []
        self._rebuilding = False
        super().__init__(n_layer, n_head_kv, head_dim, budget + headroom, kv_dtype, block_size)

    @property
    def wants_novelty(self) -> bool:
        return "novelty" in self.policy.needs

    def reset(self) -> None:
        super().reset()
        H, cap, L = self.n_head_kv, self.max_tokens, self.n_layer
        self.pos_shift = 0          # next_pos - len: tokens evicted without re-positioning
        self.compactions = 0
        self._probe_len = None      # pot size while a catalyst prompt runs on top of it
        self.prev_logits = None   # logits after the last token, for the next token's novelty
        need = self.policy.needs
        self.history = [np.zeros((H, cap)) for _ in range(L)] if "history_mass" in need else None
        self.seen_by = [np.zeros((H, cap)) for _ in range(L)] if "history_mass" in need else None
        self.novelty = [np.zeros((H, cap), np.float32) for _ in range(L)] if "novelty" in need else None
        self.catalyst = [None] * L
        self.obs = [None] * L       # (q, q_pos) of the last obs_window queries, for SnapKV
        # which token of the stream (0, 1, ...) each entry holds: says what distillation kept
        self.origin = [np.zeros((H, cap), np.int64) for _ in range(L)]
        self.n_seen = 0             # tokens streamed in so far (catalyst probes excluded)

    # -- the model's hooks -------------------------------------------------------------------
    @property
    def next_pos(self) -> int:
        return len(self) + self.pos_shift

    def max_chunk(self) -> int:
        return self.budget - self.keep

    def needs_compaction(self, n: int) -> bool:
        return len(self) + n > self.budget

    def attend(self, layer, q, q_pos, out, lse, scale):
        super().attend(layer, q, q_pos, out, lse, scale)  # leaves q in the cache's basis, as the mass needs
        n = self.n_tokens[layer]
        if self._probe_len is not None:
            self.catalyst[layer] = self._mass(layer, q, q_pos, lse, scale, self.cap_reduce_max)[:, :self._probe_len]
            return
        if self.history is not None:
            self.history[layer][:, :n] += self._mass(layer, q, q_pos, lse, scale, False)
            pos = self._positions(layer)
            self.seen_by[layer][:, :n] += len(q_pos) - np.searchsorted(np.sort(q_pos), pos, side="left")
        if "window_mass" in self.policy.needs:
            prev = self.obs[layer]
            qs, ps = (q, q_pos) if prev is None else (np.concatenate([prev[0], q]), np.concatenate([prev[1], q_pos]))
            self.obs[layer] = (qs[-self.obs_window:].copy(), ps[-self.obs_window:].copy())

    def append(self, layer, k, v, pos) -> None:
        n = self.n_tokens[layer]
        super().append(layer, k, v, pos)
        if self._probe_len is None and not self._rebuilding:
            self._record_origin(layer, n, len(k))

    def _record_origin(self, layer: int, n0: int, m: int) -> None:
        self.origin[layer][:, n0:n0 + m] = np.arange(self.n_seen, self.n_seen + m)
        if layer == self.n_layer - 1:
            self.n_seen += m

    def step_blocks(self, n: int) -> int:
        # the one-call step skips attend's scoring hooks: only when no score is gathered per step
        if self._probe_len is not None or self.history is not None or "window_mass" in self.policy.needs:
            return NO_STEP
        return super().step_blocks(n)

    def stepped(self, n: int) -> None:
        n0 = len(self)
        super().stepped(n)
        for layer in range(self.n_layer):
            self._record_origin(layer, n0, n)

    def record_novelty(self, nov: np.ndarray) -> None:
        """Per-token novelty of the tokens just appended to every layer."""
        n, m = len(self), len(nov)
        for arr in self.novelty:
            arr[:, n - m:n] = nov

    # -- catalyst probe --------------------------------------------------------------------------
    def begin_probe(self) -> None:
        """The catalyst prompt's tokens go on top of the pot only to score it; end_probe removes them."""
        self._probe_len = len(self)

    def end_probe(self) -> None:
        self.truncate(self._probe_len)
        self._probe_len = None

    # -- compaction ------------------------------------------------------------------------------
    def compact(self) -> None:
        """Every layer keeps the policy's `keep` entries per KV head."""
        before = self.next_pos
        angles = self._cr_rope_angles(before) if self.policy.reposition else None
        for layer in range(self.n_layer):
            idx = self.policy.select(self._scores(layer), self.keep)
            self._rebuild(layer, idx, angles)
        self.pos_shift = 0 if self.policy.reposition else before - self.keep
        self.compactions += 1
        self.obs = [None] * self.n_layer
        self.catalyst = [None] * self.n_layer

    def _scores(self, layer: int) -> LayerScores:
        n, need = self.n_tokens[layer], self.policy.needs
        s = LayerScores(n, self.n_head_kv)
        if "history_mass" in need:
            s.history_mass, s.seen_by = self.history[layer][:, :n], self.seen_by[layer][:, :n]
        if "window_mass" in need:
            s.window_mass = self._window_mass(layer)
        if "catalyst_mass" in need:
            s.catalyst_mass = self.catalyst[layer]
        if "novelty" in need:
            s.novelty = self.novelty[layer][:, :n]
        return s

    def _window_mass(self, layer: int) -> np.ndarray:
        if self.obs[layer] is None:  # no query since the last compaction: recency decides
            return np.zeros((self.n_head_kv, self.n_tokens[layer]), np.float32)
        q, q_pos = self.obs[layer]
        lse = np.empty(q.shape[:2], np.float32)
        out = np.empty_like(q)
        scale = 1.0 / np.sqrt(self.head_dim)
        descs, n_blocks = self.descriptors(layer)
        lib.el_attention(_fp(q), len(q), ffi.cast("int32_t *", q_pos.ctypes.data), self.n_head, self.n_head_kv,
                         self.head_dim, scale, descs, n_blocks, _fp(out), _fp(lse))
        return self._mass(layer, q, q_pos, lse, scale, False)

    def _cr_rope_angles(self, n_pos: int):
        """RoPE's cos / sin for every move CR-RoPE can make, from a position < n_pos to a rank < keep: one table
        for all layers, (table, first delta)."""
        deltas = np.arange(1 - n_pos, self.keep, dtype=np.int32)
        cs = np.empty((len(deltas), self.rope.dim), np.float32)
        lib.el_rope_cos_sin(ffi.cast("int32_t *", deltas.ctypes.data), len(deltas), self.rope.dim, self.rope.base, _fp(cs))
        return cs, int(deltas[0])

    def _rebuild(self, layer: int, idx: np.ndarray, angles) -> None:
        H, hd, keep = self.n_head_kv, self.head_dim, self.keep
        idx32 = np.ascontiguousarray(idx, np.int32)
        if idx32.shape != (H, keep):
            raise ValueError(f"policy selected {idx32.shape} entries, expected {(H, keep)}")
        k, v = np.empty((keep, H, hd), np.float32), np.empty((keep, H, hd), np.float32)
        # one C call (threaded): dequantize the survivors and, for CR-RoPE, rotate each from its position to its rank
        cs, d0 = angles if angles is not None else (None, 0)
        descs, n_blocks = self.descriptors(layer)
        if lib.el_kv_gather(descs, n_blocks, H, hd, int(self.rotated), ffi.cast("int32_t *", idx32.ctypes.data), keep,
                            self.rope.dim, int(self.rope.neox), ffi.NULL if cs is None else _fp(cs), d0,
                            0 if cs is None else len(cs), _fp(k), _fp(v)):
            raise ValueError(f"compaction of layer {layer}: a selected entry lies outside its {self.n_tokens[layer]} entries"
                             " or its position outside the CR-RoPE angle table")
        for arrs in (self.history, self.seen_by, self.novelty, self.origin):
            if arrs is not None:
                a = arrs[layer]
                a[:, :self.keep] = np.take_along_axis(a, idx, axis=1)
                a[:, self.keep:] = 0
        self.blocks[layer], self.n_tokens[layer] = [], 0
        # positions 0..keep-1 also order survivors for the causal mask; new tokens come after them
        self._rebuilding = True
        self.append(layer, k, v, np.arange(keep, dtype=np.int32))
        self._rebuilding = False

    # -- helpers ---------------------------------------------------------------------------------
    def _positions(self, layer: int) -> np.ndarray:
        return np.concatenate([b.pos[:b.n] for b in self.blocks[layer]])

    def _mass(self, layer, q, q_pos, lse, scale, reduce_max: bool) -> np.ndarray:
        descs, n_blocks = self.descriptors(layer)
        out = np.zeros((self.n_head_kv, self.n_tokens[layer]), np.float32)
        lib.el_attention_mass(_fp(q), q.shape[0], ffi.cast("int32_t *", q_pos.ctypes.data), self.n_head,
                              self.n_head_kv, self.head_dim, scale, descs, n_blocks, _fp(lse), int(reduce_max), _fp(out))
        return out
