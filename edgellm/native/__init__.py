"""Native kernels (C, cffi API mode) with thin numpy wrappers.

Hot paths call ``lib.el_*`` directly with pre-made pointers; the wrappers here validate shapes, dtypes
and contiguity and raise ValueError instead of letting bad arguments reach C.
"""
from __future__ import annotations

from typing import Sequence

import numpy as np

from edgellm.quant.blocks import GROUPED_KEYS, INTERLEAVED, GGMLType, group_keys, row_bytes

try:
    from ._kernels import ffi, lib
except ImportError as e:  # pragma: no cover - build problem, say how to fix it
    raise ImportError("edgellm native kernels are not built: run `pip install -e .` "
                      "or `python edgellm/native/build.py`") from e

__all__ = ["ffi", "lib", "simd_level", "set_simd", "prefetch_bytes", "set_threads", "get_threads", "matmul",
           "get_rows", "repack", "rmsnorm", "rope", "silu_mul", "softmax", "quantize_row", "dequantize_row", "attention",
           "attention_mass", "hadamard"]

SIMD_NAMES = {0: "scalar", 1: "avx2", 2: "avx512", 10: "neon", 11: "neon-dotprod"}   # el_simd_level()'s levels
SIMD_LEVELS = {name: level for level, name in SIMD_NAMES.items()}
KV_TYPES = (GGMLType.F32, GGMLType.F16, GGMLType.Q8_0, GGMLType.Q4_0)
MAX_GROUP, MAX_HEAD_DIM = 32, 512   # el_attention's stack limits
INT_MAX = 2**31 - 1


def simd_level() -> int:
    return lib.el_simd_level()


def set_simd(level: int) -> int:
    """Force a SIMD level no higher than detected (0 = scalar, or a lower level of the same ISA); returns the
    level in use."""
    return lib.el_set_simd(int(level))


def prefetch_bytes(n: int = 0) -> int:
    """The decode GEMVs' software prefetch distance: set to n where n > 0 (set_simd resets it to the table's);
    returns the one in use."""
    return lib.el_prefetch_bytes(int(n))


def next_bytes(n: int = -1) -> int:
    """Bytes of the next decode product a thread fetches ahead (el_next_bytes): set to n where n >= 0 (0: none);
    returns the one in use."""
    return lib.el_next_bytes(int(n))


def token_step(on: int = -1) -> int:
    """Whether a one-token step runs every layer in one pool job (el_token_step; a benchmark's knob): set where
    on >= 0; returns the setting in use."""
    return lib.el_token_step(int(on))


def set_threads(n: int) -> None:
    n = int(n)
    if not 1 <= n <= 64:
        raise ValueError(f"threads must be in 1..64, got {n}")
    lib.el_set_threads(n)


def get_threads() -> int:
    return lib.el_get_threads()


def _f32(a, name: str, ndim: int | None = None, writable: bool = False) -> np.ndarray:
    if not isinstance(a, np.ndarray) or a.dtype != np.float32:
        raise ValueError(f"{name} must be a float32 numpy array, got {type(a).__name__} {getattr(a, 'dtype', '')}")
    if not a.flags.c_contiguous:
        raise ValueError(f"{name} must be C-contiguous")
    if writable and not a.flags.writeable:
        raise ValueError(f"{name} must be writable")
    if ndim is not None and a.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dims, got shape {a.shape}")
    return a


def _i32(a, name: str, n: int) -> np.ndarray:
    a = np.ascontiguousarray(a, dtype=np.int32).reshape(-1)
    if a.size != n:
        raise ValueError(f"{name} needs {n} entries, got {a.size}")
    return a


def _bytes(a, name: str, nbytes: int) -> np.ndarray:
    """A contiguous array holding at least nbytes, returned as is (the pointer is taken from it)."""
    if not isinstance(a, np.ndarray) or not a.flags.c_contiguous:
        raise ValueError(f"{name} must be a C-contiguous numpy array")
    if a.nbytes < nbytes:
        raise ValueError(f"{name} holds {a.nbytes} bytes, {nbytes} needed")
    return a


def _ptr(a: np.ndarray, ctype: str = "void *"):
    return ffi.cast(ctype, a.ctypes.data)


def _weights(W, wtype, rows: int, cols: int):
    t = GGMLType.parse(wtype)
    if rows <= 0 or cols <= 0 or rows > INT_MAX or cols > INT_MAX:
        raise ValueError(f"bad weight shape {rows} x {cols}")
    return t, _bytes(W, "W", rows * row_bytes(t, cols))


def matmul(W: np.ndarray, wtype, rows: int, cols: int, X: np.ndarray, hp: bool = False) -> np.ndarray:
    """Y[n, rows] = X[n, cols] @ W.T for W: `rows` rows of `cols` elements in GGML layout of wtype.
    hp: ~16-bit activations (an 8-bit plane plus an 8-bit residual plane, el_matmul_hp) instead of 8-bit."""
    t, W = _weights(W, wtype, int(rows), int(cols))
    X = _f32(X, "X")
    if X.ndim not in (1, 2) or X.shape[-1] != cols:
        raise ValueError(f"X must be [n, {cols}] (or [{cols}]), got {X.shape}")
    X2 = X.reshape(-1, cols)
    Y = np.empty((X2.shape[0], rows), np.float32)
    fn = lib.el_matmul_hp if hp else lib.el_matmul
    fn(_ptr(W), int(t), rows, cols, _ptr(X2, "float *"), X2.shape[0], _ptr(Y, "float *"), rows)
    return Y.reshape(*X.shape[:-1], rows)


def weight(W: np.ndarray, wtype, rows: int, cols: int):
    """The el_weight of a matrix. The C side repacks the matrix in place on first use and updates the struct's type,
    so a matrix must have one struct, not copies, and its type is read from it at each call."""
    w = ffi.new("el_weight *")
    w.w, w.type, w.rows, w.cols = _ptr(W), int(wtype), rows, cols
    return w


def l1_ratio(W: np.ndarray, wtype, rows: int, cols: int) -> np.ndarray:
    """Per row, 255 x the largest block L1 norm over 32 x its scales' bound on |w| (el_weight_l1_ratio), uint8."""
    t, W = _weights(W, wtype, int(rows), int(cols))
    rho = np.empty(rows, np.uint8)
    if lib.el_weight_l1_ratio(weight(W, t, rows, cols), _ptr(rho, "uint8_t *")) != 0:
        raise ValueError(f"el_weight_l1_ratio needs a quantized matrix, not {t.name}")
    return rho


def logits_refine(W: np.ndarray, wtype, rows: int, cols: int, x: np.ndarray,
                  rho: np.ndarray) -> tuple[np.ndarray, int, int]:
    """W x for one row x by el_logits_refine: (y, number of rows recomputed by the two-plane product, the first
    largest of y as el_logits_refine finds it)."""
    t, W = _weights(W, wtype, int(rows), int(cols))
    x = _f32(x, "x", 1)
    rho = np.ascontiguousarray(rho, np.uint8)
    if x.size != cols or rho.size != rows:
        raise ValueError(f"x must have {cols} values and rho {rows}")
    y, best = np.empty(rows, np.float32), ffi.new("int32_t *")
    n = lib.el_logits_refine(weight(W, t, rows, cols), _ptr(rho, "uint8_t *"), _ptr(x, "float *"), _ptr(y, "float *"),
                             best)
    if n < 0:
        raise MemoryError("el_logits_refine: out of memory")
    return y, n, best[0]


def get_rows(W: np.ndarray, wtype, rows: int, cols: int, ids) -> np.ndarray:
    """out[i] = dequantized row ids[i] of W."""
    t, W = _weights(W, wtype, int(rows), int(cols))
    ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= rows):
        raise ValueError(f"row ids must be in [0, {rows})")
    ids = ids.astype(np.int32)
    out = np.empty((ids.size, cols), np.float32)
    lib.el_get_rows(_ptr(W), int(t), cols, _ptr(ids, "int32_t *"), ids.size, _ptr(out, "float *"))
    return out


def repack(W: np.ndarray, wtype, rows: int, cols: int) -> GGMLType:
    """Rewrite W in place into the layout the active kernels read fastest (el_repack); returns W's type now."""
    t, W = _weights(W, wtype, int(rows), int(cols))
    if not W.flags.writeable:
        raise ValueError("W must be writable")
    return GGMLType(lib.el_repack(_ptr(W), int(t), rows, cols))


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float = 1e-5, out: np.ndarray | None = None) -> np.ndarray:
    x = _f32(x, "x")
    dim = x.shape[-1] if x.ndim else 0
    w = _f32(w, "w", 1)
    if dim == 0 or w.size != dim:
        raise ValueError(f"w must have {dim} elements, got {w.size}")
    out = np.empty_like(x) if out is None else _f32(out, "out", writable=True)
    if out.shape != x.shape:
        raise ValueError(f"out shape {out.shape} != x shape {x.shape}")
    lib.el_rmsnorm(_ptr(x, "float *"), _ptr(w, "float *"), x.size // dim, dim, float(eps), _ptr(out, "float *"))
    return out


def rope(x: np.ndarray, pos, rope_dim: int | None = None, freq_base: float = 10000.0, neox: bool = False) -> np.ndarray:
    """Rotate x[n, n_heads, head_dim] in place (and return it)."""
    x = _f32(x, "x", 3, writable=True)
    n, n_heads, hd = x.shape
    rope_dim = hd if rope_dim is None else int(rope_dim)
    if rope_dim <= 0 or rope_dim > hd or rope_dim % 2:
        raise ValueError(f"rope_dim must be even and in (0, {hd}], got {rope_dim}")
    pos = _i32(pos, "pos", n)
    lib.el_rope(_ptr(x, "float *"), n, n_heads, hd, rope_dim, _ptr(pos, "int32_t *"), float(freq_base), int(bool(neox)))
    return x


def silu_mul(gate: np.ndarray, up: np.ndarray) -> np.ndarray:
    """gate = silu(gate) * up, in place (and returned)."""
    gate, up = _f32(gate, "gate", writable=True), _f32(up, "up")
    if gate.shape != up.shape:
        raise ValueError(f"gate {gate.shape} and up {up.shape} differ")
    lib.el_silu_mul(_ptr(gate, "float *"), _ptr(up, "float *"), gate.size)
    return gate


def softmax(x: np.ndarray) -> np.ndarray:
    """Softmax over the last axis, in place (and returned); rows with no finite entry become zeros."""
    x = _f32(x, "x", writable=True)
    if x.ndim == 0 or x.shape[-1] == 0:
        raise ValueError("softmax needs a non-empty last axis")
    lib.el_softmax(_ptr(x, "float *"), x.size // x.shape[-1], x.shape[-1])
    return x


def hadamard(x: np.ndarray) -> np.ndarray:
    """Rows of x (last dim a power of 2) times the normalized Walsh-Hadamard matrix, in place (and returned)."""
    x = _f32(x, "x", writable=True)
    d = x.shape[-1]
    if d <= 0 or d & (d - 1):
        raise ValueError(f"hadamard needs a power-of-2 row length, got {d}")
    lib.el_hadamard(_ptr(x, "float *"), x.size // d, d)
    return x


def quantize_row(x: np.ndarray, wtype) -> np.ndarray:
    t = GGMLType.parse(wtype)
    x = _f32(x, "x").reshape(-1)
    out = np.empty(row_bytes(t, x.size), np.uint8)
    lib.el_quantize_row(_ptr(x, "float *"), _ptr(out), x.size, int(t))
    return out


def dequantize_row(raw: np.ndarray, wtype, n: int) -> np.ndarray:
    t = GGMLType.parse(wtype)
    if t in INTERLEAVED.values():
        raise ValueError(f"{t.name} rows are interleaved in groups of 8, not contiguous: use get_rows")
    raw = _bytes(raw, "raw", row_bytes(t, int(n)))
    y = np.empty(int(n), np.float32)
    lib.el_dequantize_row(_ptr(raw), _ptr(y, "float *"), int(n), int(t))
    return y


def _attention_args(q, q_pos, n_kv_head, blocks, scale):
    """Checked arguments shared by attention() and attention_mass(): (q, q_pos, n_kv_head, scale, cblocks, keep)."""
    q = _f32(q, "q", 3)
    n_q, n_head, hd = q.shape
    n_kv_head = int(n_kv_head)
    if n_kv_head <= 0 or n_head % n_kv_head:
        raise ValueError(f"n_head {n_head} is not a multiple of n_kv_head {n_kv_head}")
    if n_head // n_kv_head > MAX_GROUP or hd > MAX_HEAD_DIM:
        raise ValueError(f"at most {MAX_GROUP} query heads per kv head and head_dim <= {MAX_HEAD_DIM}")
    q_pos = _i32(q_pos, "q_pos", n_q)
    scale = 1.0 / np.sqrt(hd) if scale is None else float(scale)
    cblocks = ffi.new("el_kvblock[]", max(len(blocks), 1))
    keep = []   # arrays referenced by cblocks must outlive the call
    for i, blk in enumerate(blocks):
        if len(blk) != 5:
            raise ValueError("each block is (k, v, pos, n, dtype)")
        k, v, pos, n, dtype = blk
        t = GGMLType.parse(dtype)
        if t not in KV_TYPES:
            raise ValueError(f"KV dtype must be one of {[x.name for x in KV_TYPES]}, got {t.name}")
        rb = row_bytes(t, hd)
        n = int(n)
        if not isinstance(k, np.ndarray) or not isinstance(v, np.ndarray):
            raise ValueError("k and v must be numpy arrays")
        if k.nbytes != v.nbytes or k.nbytes % (n_kv_head * rb):
            raise ValueError(f"block {i}: k/v must hold n_kv_head * cap rows of {rb} bytes")
        cap = k.nbytes // (n_kv_head * rb)
        if not 0 <= n <= cap:
            raise ValueError(f"block {i}: n={n} outside [0, cap={cap}]")
        k, v = _bytes(k, "k", 0), _bytes(v, "v", 0)
        if t in GROUPED_KEYS:
            k, v, cap = _grouped(k, v, t, n_kv_head, cap, hd)
        pos = _i32(np.asarray(pos).reshape(-1)[:n], "pos", n)
        keep += [k, v, pos]
        cb = cblocks[i]
        cb.k, cb.v, cb.pos = _ptr(k), _ptr(v), _ptr(pos, "int32_t *")
        cb.n, cb.cap, cb.dtype = n, cap, int(t)
    return q, q_pos, n_kv_head, scale, cblocks, keep


def _grouped(k: np.ndarray, v: np.ndarray, t: GGMLType, n_kv_head: int, cap: int, hd: int):
    """A quantized block's K rows in the kernels' grouped layout (el_kv_group), each head's rows padded with zero rows
    to a multiple of 8 (V alike, a head's rows cap apart in both): (k, v, cap)."""
    rb, padded = row_bytes(t, hd), -(-cap // 8) * 8
    k, v = (np.pad(a.reshape(n_kv_head, cap, rb), ((0, 0), (0, padded - cap), (0, 0))) for a in (k, v))
    return group_keys(k.reshape(-1, rb), t, hd), v, padded


def attention(q: np.ndarray, q_pos, n_kv_head: int, blocks: Sequence[tuple], scale: float | None = None):
    """Causal attention of q[n_q, n_head, hd] over K/V blocks.

    blocks: (k, v, pos, n, dtype) each; k and v hold [n_kv_head][cap] rows of hd elements of dtype
    (any array shape, C-contiguous, bytes = n_kv_head * cap * row bytes), pos the positions of the first n rows.
    Returns (out[n_q, n_head, hd], lse[n_q, n_head]).
    """
    q, q_pos, n_kv_head, scale, cblocks, keep = _attention_args(q, q_pos, n_kv_head, blocks, scale)
    n_q, n_head, hd = q.shape
    out = np.zeros((n_q, n_head, hd), np.float32)
    lse = np.full((n_q, n_head), -np.inf, np.float32)
    lib.el_attention(_ptr(q, "float *"), n_q, _ptr(q_pos, "int32_t *"), n_head, n_kv_head, hd, scale,
                     cblocks, len(blocks), _ptr(out, "float *"), _ptr(lse, "float *"))
    del keep
    return out, lse


def attention_mass(q: np.ndarray, q_pos, n_kv_head: int, blocks: Sequence[tuple], lse: np.ndarray,
                   scale: float | None = None, reduce_max: bool = False) -> np.ndarray:
    """Per kv head and key (numbered across blocks), the sum or max over queries and query heads of the attention
    probability; lse from attention() over the same blocks. Returns [n_kv_head, n_keys] float32."""
    q, q_pos, n_kv_head, scale, cblocks, keep = _attention_args(q, q_pos, n_kv_head, blocks, scale)
    n_q, n_head, hd = q.shape
    lse = _f32(lse, "lse", 2)
    if lse.shape != (n_q, n_head):
        raise ValueError(f"lse must be [{n_q}, {n_head}], got {lse.shape}")
    out = np.zeros((n_kv_head, sum(int(b[3]) for b in blocks)), np.float32)
    if lib.el_attention_mass(_ptr(q, "float *"), n_q, _ptr(q_pos, "int32_t *"), n_head, n_kv_head, hd, scale, cblocks,
                             len(blocks), _ptr(lse, "float *"), int(reduce_max), _ptr(out, "float *")):
        raise ValueError("el_attention_mass rejected its arguments (head_dim must be a multiple of 32)")
    del keep
    return out
