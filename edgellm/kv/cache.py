"""The KV manager: owns every KV byte, in blocks of tokens per layer.

A block holds tokens of all KV heads of one layer: K and V arrays shaped [n_kv_head, cap, row]
(row = one head vector in the block's dtype) plus the token positions. The block being filled (the
tail) is f16 with room for `block_size` tokens; when it fills and the cache dtype is quantized it is
quantized once into the layer's current slab, a quantized block of `slab_blocks` tails' rows (a new
one when the last is full). A kv head's keys then lie in runs of slab_blocks * block_size rows, long
enough for the hardware prefetchers: decode attention over 4096 q8_0 keys takes ~6% less time than
over runs of 64 rows (`python bench/native_ab.py --a SO --b SO --block-a 64`). A quantized block's keys are
grouped (el_kv_group: 8 rows' bytes transposed, keys in vector lanes for K.Q); `ungroup_keys` gives rows back
where this class reads them. Attention reads the blocks in place through a per-layer array of `el_kvblock`
descriptors that this class keeps current, so a decode step touches only the tail's descriptor.

Quantized caches store K and V in a rotated basis: each head vector times the normalized
Walsh-Hadamard matrix H (orthogonal, H = H^-1). Keys and values have a few outlier channels that
would set the scale of their whole 32-value block; the rotation spreads them across the block, so
8- and 4-bit blocks lose much less (q8_0: top-1 agreement with the reference within 0.002 of f16
instead of 0.012 worse). Attention is unchanged by it: (Hq).(Hk) = q.k, and the output is rotated
back with H.
"""
from __future__ import annotations

import numpy as np

from ..native import ffi, lib
from ..quant.blocks import GROUPED_KEYS, GGMLType, row_bytes, ungroup_keys

NO_STEP = (0, ffi.NULL)   # step_blocks' refusal
DTYPES = {"f32": GGMLType.F32, "f16": GGMLType.F16, "q8_0": GGMLType.Q8_0, "q4_0": GGMLType.Q4_0}


class KVBlock:
    __slots__ = ("k", "v", "pos", "n", "dtype")

    def __init__(self, k: np.ndarray, v: np.ndarray, pos: np.ndarray, n: int, dtype: GGMLType):
        self.k, self.v, self.pos, self.n, self.dtype = k, v, pos, n, dtype

    @property
    def cap(self) -> int:
        """Rows a head has room for (a head's rows are cap rows apart)."""
        return self.k.shape[1]

    @property
    def nbytes(self) -> int:
        return self.k.nbytes + self.v.nbytes


class GrowingCache:
    """The hooks Model.forward calls around each chunk, for a cache that only grows (never evicts);
    BudgetKVCache gives them meaning. Needs `__len__` and `max_tokens`."""
    wants_novelty = False

    @property
    def next_pos(self) -> int:
        """The position the next token gets."""
        return len(self)

    def max_chunk(self) -> int:
        return self.max_tokens

    def needs_compaction(self, n: int) -> bool:
        return False


class KVCache(GrowingCache):
    slab_blocks = 8   # tails per quantized slab (a budgeted cache, which evicts and recalls blocks, keeps 1)

    def __init__(self, n_layer: int, n_head_kv: int, head_dim: int, max_tokens: int,
                 kv_dtype: str = "f16", block_size: int = 64):
        if kv_dtype not in DTYPES:
            raise ValueError(f"kv_dtype {kv_dtype!r}: choose one of {', '.join(DTYPES)}")
        if DTYPES[kv_dtype] in GROUPED_KEYS and block_size % 8:
            raise ValueError(f"a {kv_dtype} cache groups its keys by 8: block_size {block_size} is not a multiple of 8")
        self.n_layer, self.n_head_kv, self.head_dim = n_layer, n_head_kv, head_dim
        self.dtype, self.block_size, self.max_tokens = DTYPES[kv_dtype], block_size, max_tokens
        self._max_blocks = -(-max_tokens // block_size)
        self.rotated = self.dtype in (GGMLType.Q8_0, GGMLType.Q4_0) and head_dim & (head_dim - 1) == 0
        self._descs = [ffi.new("el_kvblock[]", self._max_blocks) for _ in range(n_layer)]
        self.desc_table = ffi.new("el_kvblock *[]", self._descs)  # every layer's descriptors, for el_forward_layers
        self.reset()

    # -- state -------------------------------------------------------------------------------
    def reset(self) -> None:
        self.blocks: list[list[KVBlock]] = [[] for _ in range(self.n_layer)]
        self.n_tokens = [0] * self.n_layer
        self._sealed = self._seal = None   # quantized arrays offered to el_forward_layers for the tails it fills
        # f16 arrays of tails since quantized, for the next tails: allocating a fresh pair per block while the
        # quantized blocks fill the holes the old pairs leave fragments the heap (+7.7 MB peak RSS at 4096 tokens)
        self._spare: list[tuple[np.ndarray, np.ndarray]] = []

    def __len__(self) -> int:
        return self.n_tokens[-1]


    def nbytes(self) -> int:
        return sum(b.nbytes for layer in self.blocks for b in layer)

    def bytes_per_token(self) -> float:
        """Steady-state bytes per token of context (all layers, K and V) in the cache dtype."""
        return 2 * self.n_layer * self.n_head_kv * row_bytes(self.dtype, self.head_dim)

    # -- writing -----------------------------------------------------------------------------
    def _new_tail(self, layer: int) -> KVBlock:
        shape = (self.n_head_kv, self.block_size, self.head_dim)
        k, v = self._spare.pop() if self._spare else (np.empty(shape, np.float16), np.empty(shape, np.float16))
        blk = KVBlock(k, v, np.empty(self.block_size, np.int32), 0, GGMLType.F16)
        self.blocks[layer].append(blk)
        return blk

    def append(self, layer: int, k: np.ndarray, v: np.ndarray, pos: np.ndarray) -> None:
        """Add n tokens: k, v [n, n_head_kv, head_dim] float32 (k already rotated), pos [n]."""
        n = k.shape[0]
        if self.n_tokens[layer] + n > self.max_tokens:
            raise ValueError(f"KV cache full: {self.n_tokens[layer]} + {n} tokens exceed its {self.max_tokens}")
        H, hd, bs = self.n_head_kv, self.head_dim, self.block_size
        if k.shape != (n, H, hd) or v.shape != (n, H, hd) or len(pos) != n:
            raise ValueError(f"append: k, v must be [{n}, {H}, {hd}] and pos [{n}]")
        # one C call per block touched: (rotation +) f32 -> f16 rows straight into the tail, through the pointers of
        # the tail's descriptor (kept current by _describe)
        k, v = np.ascontiguousarray(k, np.float32), np.ascontiguousarray(v, np.float32)
        pos = np.ascontiguousarray(pos, np.int32)
        pk, pv, pp = ffi.from_buffer("float[]", k), ffi.from_buffer("float[]", v), ffi.from_buffer("int32_t[]", pos)
        row, i = H * hd, 0
        while i < n:
            tail = self._tail(layer)
            d = self._descs[layer][len(self.blocks[layer]) - 1]
            m = min(n - i, bs - tail.n)
            lib.el_kv_append(pk + i * row, pv + i * row, pp + i, m, H, hd, self.rotated, d.k, d.v, d.pos, tail.n, bs)
            tail.n += m
            i += m
            self._grew(layer, tail)
        self.n_tokens[layer] += n

    def _tail(self, layer: int) -> KVBlock:
        """The layer's f16 tail block with room, made (and described) when there is none."""
        blocks = self.blocks[layer]
        if blocks and blocks[-1].dtype == GGMLType.F16 and blocks[-1].n < self.block_size:
            return blocks[-1]
        tail = self._new_tail(layer)
        self._describe(layer, len(blocks) - 1)
        return tail

    def _grew(self, layer: int, tail: KVBlock) -> None:
        """Rows were written into the tail: a full tail of a quantized cache is quantized once, else the
        descriptor gets the new count."""
        i = len(self.blocks[layer]) - 1
        if tail.n == self.block_size and self.dtype != GGMLType.F16:
            slab, row = self._slab_for(layer)
            to = ffi.new("el_kvblock *")
            self._seal_into(to, slab, row)
            lib.el_kv_seal(self._descs[layer] + i, to, self.n_head_kv, self.head_dim)
            self._sealed_into(layer, slab, row)
        else:
            self._descs[layer][i].n = tail.n

    def _slab_for(self, layer: int) -> tuple[KVBlock, int]:
        """(slab, first row) where the layer's full tail is quantized to: the slab before the tail while a tail's rows
        fit in it, else a new one (not yet among the blocks)."""
        blocks, bs = self.blocks[layer], self.block_size
        last = blocks[-2] if len(blocks) > 1 else None
        if last is not None and last.dtype == self.dtype and last.n % bs == 0 and last.n + bs <= last.cap:
            return last, last.n
        shape = (self.n_head_kv, bs * self.slab_blocks, row_bytes(self.dtype, self.head_dim))
        return KVBlock(np.empty(shape, np.uint8), np.empty(shape, np.uint8), np.empty(shape[1], np.int32), 0,
                       self.dtype), 0

    def _sealed_into(self, layer: int, slab: KVBlock, row: int) -> None:
        """The layer's full tail is quantized at `row` of `slab`: the slab takes its positions and count, the tail's
        arrays go to the spares."""
        blocks, tail = self.blocks[layer], self.blocks[layer][-1]
        slab.pos[row:row + tail.n] = tail.pos[:tail.n]
        slab.n = row + tail.n
        self._spare.append((tail.k, tail.v))
        if row:
            blocks.pop()   # merged into the slab before it
        else:
            blocks[-1] = slab
        self._describe(layer, len(blocks) - 1)

    # -- one C step for every layer (el_forward_layers) ----------------------------------------
    def step_blocks(self, n: int):
        """(blocks per layer, seal table) when n tokens can go through el_forward_layers: every layer's f16 tail has
        room for them (fresh tails are made where needed). The seal table is NULL unless the tokens fill the tails of
        a quantized cache; then it holds the quantized arrays the step converts the full tails into before attending,
        as the per-layer path does. (0, NULL): the per-layer path takes the tokens."""
        counts = set(self.n_tokens)
        if n > self.block_size or len(counts) != 1 or counts.pop() + n > self.max_tokens:
            return NO_STEP
        # the layers' blocks fill alike (equal counts): layer 0's tail stands for all (el_forward_layers checks each)
        last = self.blocks[0][-1] if self.blocks[0] else None
        if last is None or last.dtype != GGMLType.F16 or last.n == self.block_size:   # every layer needs a new tail
            for layer in range(self.n_layer):
                self._tail(layer)
            last = self.blocks[0][-1]
        if last.n + n > self.block_size:
            return NO_STEP
        fills = self.dtype != GGMLType.F16 and last.n + n == self.block_size
        return len(self.blocks[0]), self._seal_table() if fills else ffi.NULL

    def tail_room(self) -> int:
        """Tokens the layers' tails take before one fills (a full or quantized tail: a fresh one's), within
        max_tokens."""
        last = self.blocks[0][-1] if self.blocks[0] else None
        room = self.block_size - last.n if last is not None and last.dtype == GGMLType.F16 else 0
        return min(room or self.block_size, self.max_tokens - len(self))

    def _seal_table(self):
        self._sealed = [self._slab_for(layer) for layer in range(self.n_layer)]
        self._seal = ffi.new("el_kvblock[]", self.n_layer)
        for d, (slab, row) in zip(self._seal, self._sealed):
            self._seal_into(d, slab, row)
        return self._seal

    def _seal_into(self, d, slab: KVBlock, row: int) -> None:
        """Descriptor d as el_kv_seal's destination: the slab's rows from `row`."""
        d.k, d.v = ffi.cast("void *", slab.k[0, row].ctypes.data), ffi.cast("void *", slab.v[0, row].ctypes.data)
        d.cap, d.dtype = slab.cap, int(self.dtype)

    def stepped(self, n: int) -> None:
        """el_forward_layers appended n tokens to every layer's tail (its descriptor holds the new count) and, where
        they filled it, pointed the descriptor at the sealed arrays."""
        count, sealed = self._descs[0][len(self.blocks[0]) - 1].n, self._sealed   # alike in every layer
        for layer, blocks in enumerate(self.blocks):
            blocks[-1].n = count
            if sealed is not None:
                self._sealed_into(layer, *sealed[layer])
        self.n_tokens = [t + n for t in self.n_tokens]
        self._sealed = self._seal = None

    def _describe(self, layer: int, i: int) -> None:
        blk, d = self.blocks[layer][i], self._descs[layer][i]
        d.k = ffi.cast("void *", blk.k.ctypes.data)
        d.v = ffi.cast("void *", blk.v.ctypes.data)
        d.pos = ffi.cast("int32_t *", blk.pos.ctypes.data)
        d.n, d.cap, d.dtype = blk.n, blk.cap, int(blk.dtype)

    def truncate(self, n: int, exact: bool = False) -> int:
        """Keep the first n tokens of every layer; returns how many are kept. A quantized block cut short keeps its
        whole tails' rows, and the rest of the last one kept becomes an f16 tail again, dequantized: n are kept. With
        `exact` (reusing a prompt prefix) those rows are dropped instead, so that the cache holds what a fresh prefill
        of the kept tokens leaves, bit for bit (the prompt's last rows as f16, not rounded through 8 bits), and the
        caller feeds the dropped tokens again."""
        if exact:   # every layer's blocks end at the same tokens
            total = 0
            for blk in self.blocks[0]:
                if blk.dtype != GGMLType.F16 and total + blk.n > n:
                    n = total + (n - total) // self.block_size * self.block_size
                    break
                total += blk.n
        for layer in range(self.n_layer):
            kept, total = [], 0
            for blk in self.blocks[layer]:
                if total >= n:
                    break
                take = min(blk.n, n - total)
                kept += self._cut(blk, take) if take < blk.n else [blk]
                total += take
            self.blocks[layer] = kept
            self.n_tokens[layer] = n
            for i in range(len(kept)):
                self._describe(layer, i)
        return n

    def _cut(self, blk: KVBlock, n: int) -> list[KVBlock]:
        """blk's first n rows as blocks: an f16 block shortened; a quantized one shortened to whole tails, its
        remaining rows dequantized into an f16 tail."""
        if blk.dtype == GGMLType.F16:
            blk.n = n
            return [blk]
        whole = n - n % self.block_size
        head = [KVBlock(blk.k, blk.v, blk.pos, whole, blk.dtype)] if whole else []
        if whole == n:
            return head
        rows = slice(whole, whole + self.block_size)
        k = self._to_f32(blk.k[:, rows], blk.dtype, keys=True).astype(np.float16)
        v = self._to_f32(blk.v[:, rows], blk.dtype).astype(np.float16)
        return head + [KVBlock(k, v, blk.pos[rows].copy(), n - whole, GGMLType.F16)]

    # -- reading -----------------------------------------------------------------------------
    def dequantized(self, layer: int):
        """A float32 copy of one layer's entries, in the model's basis: K, V [n_head_kv, n, head_dim], pos [n].
        For tests and inspection only: attention and compaction (el_kv_gather) read the blocks in place."""
        ks, vs, ps = [], [], []
        for b in self.blocks[layer]:
            ks.append(self._to_f32(b.k, b.dtype, keys=True)[:, :b.n])
            vs.append(self._to_f32(b.v, b.dtype)[:, :b.n])
            ps.append(b.pos[:b.n])
        shape = (self.n_head_kv, 0, self.head_dim)
        k = np.concatenate(ks, axis=1) if ks else np.zeros(shape, np.float32)
        v = np.concatenate(vs, axis=1) if vs else np.zeros(shape, np.float32)
        if self.rotated:
            k, v = _rotate(np.ascontiguousarray(k)), _rotate(np.ascontiguousarray(v))
        return k, v, np.concatenate(ps) if ps else np.zeros(0, np.int32)

    def _to_f32(self, arr: np.ndarray, dtype: GGMLType, keys: bool = False) -> np.ndarray:
        """[n_kv_head, rows, row bytes] of dtype as float32 [n_kv_head, rows, head_dim]; keys: quantized ones are
        grouped (el_kv_group), rows a multiple of 8."""
        if dtype == GGMLType.F16:
            return arr.astype(np.float32)
        out = np.empty((self.n_head_kv, arr.shape[1], self.head_dim), np.float32)
        arr = ungroup_keys(arr.reshape(-1, arr.shape[2]), dtype, self.head_dim) if keys else np.ascontiguousarray(arr)
        lib.el_dequantize_row(ffi.cast("void *", arr.ctypes.data), _fp(out), out.size, int(dtype))
        return out

    def descriptors(self, layer: int):
        """(el_kvblock* , n_blocks) for the attention kernel."""
        return self._descs[layer], len(self.blocks[layer])

    def attend(self, layer: int, q: np.ndarray, q_pos: np.ndarray, out: np.ndarray, lse: np.ndarray,
               scale: float) -> None:
        """Causal attention of q [n, n_head, head_dim] (rotated in place when the cache is) over this layer's
        blocks into out [n, n_head, head_dim] and lse [n, n_head]."""
        if self.rotated:
            _rotate(q)
        descs, n_blocks = self.descriptors(layer)
        n, n_head, hd = q.shape
        lib.el_attention(_fp(q), n, ffi.cast("int32_t *", q_pos.ctypes.data), n_head, self.n_head_kv, hd, scale,
                         descs, n_blocks, _fp(out), _fp(lse))
        if self.rotated:
            _rotate(out)


def _fp(a: np.ndarray):
    return ffi.cast("float *", a.ctypes.data)


def _rotate(x: np.ndarray) -> np.ndarray:
    """Head vectors (last axis) times the normalized Walsh-Hadamard matrix, in place."""
    lib.el_hadamard(_fp(x), x.size // x.shape[-1], x.shape[-1])
    return x
