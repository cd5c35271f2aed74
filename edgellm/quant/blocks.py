"""Numpy reference of the GGUF block formats used by edgellm, and of the 8-bit activation blocks
the native matmul quantizes its input to.

Layouts (little-endian, f16 = IEEE half), one block = 32 elements:
  Q4_0: d f16, qs u8[16]         y[j] = (lo(qs[j]) - 8) * d,  y[j+16] = (hi(qs[j]) - 8) * d
  Q4_1: d f16, m f16, qs u8[16]  y[j] = lo(qs[j]) * d + m,    y[j+16] = hi(qs[j]) * d + m
  Q8_0: d f16, qs i8[32]         y[j] = qs[j] * d
Activation blocks (native scratch only, never stored in files): d f32, s f32 = d * sum(qs), qs i8[32].
Repacked rows (Q4_0R, Q4_1R, Q8_0R: the native kernels' in-place layout of the same bytes, never in files):
  the quantized bytes of all blocks, then every block's d, then (Q4_1R) every block's m; see repack_rows.
Interleaved rows (Q4_0X, Q4_1X: the same for Q4 matrices of whole groups of 8 rows): see interleave_rows.
"""
from __future__ import annotations

from enum import IntEnum

import numpy as np

QK = 32


class GGMLType(IntEnum):
    F32 = 0
    F16 = 1
    Q4_0 = 2
    Q4_1 = 3
    Q8_0 = 8
    # el_repack's layouts of Q4_0, Q4_1, Q8_0 rows (not GGML types)
    Q4_0R = 102
    Q4_1R = 103
    Q8_0R = 108
    # el_repack's layouts of Q4_0, Q4_1 matrices in 8-row groups
    Q4_0X = 112
    Q4_1X = 113

    @classmethod
    def parse(cls, t: "GGMLType | int | str") -> "GGMLType":
        """Accept an enum, its int id or its name ("q8_0"); ValueError otherwise."""
        if isinstance(t, str):
            try:
                return cls[t.upper()]
            except KeyError:
                raise ValueError(f"unknown GGML type name {t!r}") from None
        try:
            return cls(int(t))
        except (ValueError, TypeError):
            raise ValueError(f"unsupported GGML type {t!r}") from None


# type -> (elements per block, bytes per block)
BLOCK_SIZES: dict[GGMLType, tuple[int, int]] = {
    GGMLType.F32: (1, 4),
    GGMLType.F16: (1, 2),
    GGMLType.Q4_0: (QK, 18),
    GGMLType.Q4_1: (QK, 20),
    GGMLType.Q8_0: (QK, 34),
}
REPACKED = {GGMLType.Q4_0: GGMLType.Q4_0R, GGMLType.Q4_1: GGMLType.Q4_1R, GGMLType.Q8_0: GGMLType.Q8_0R}
INTERLEAVED = {GGMLType.Q4_0: GGMLType.Q4_0X, GGMLType.Q4_1: GGMLType.Q4_1X}
BASE = {r: t for layouts in (REPACKED, INTERLEAVED) for t, r in layouts.items()}
BLOCK_SIZES.update({r: BLOCK_SIZES[t] for r, t in BASE.items()})   # a repacked row holds the same bytes

BLOCK_DTYPES: dict[GGMLType, np.dtype] = {
    GGMLType.F32: np.dtype("<f4"),
    GGMLType.F16: np.dtype("<f2"),
    GGMLType.Q4_0: np.dtype([("d", "<f2"), ("qs", "u1", (16,))]),
    GGMLType.Q4_1: np.dtype([("d", "<f2"), ("m", "<f2"), ("qs", "u1", (16,))]),
    GGMLType.Q8_0: np.dtype([("d", "<f2"), ("qs", "i1", (32,))]),
}

# the native activation block (el_block_q8a in kernels.h)
ACT_BLOCK_DTYPE = np.dtype([("d", "<f4"), ("s", "<f4"), ("qs", "i1", (32,))])

for _t, _dtype in BLOCK_DTYPES.items():
    assert _dtype.itemsize == BLOCK_SIZES[_t][1], _t


def row_bytes(t: GGMLType | int, n: int) -> int:
    """Bytes of a row of n elements; ValueError when n is not a whole number of blocks."""
    t = GGMLType.parse(t)
    bs, nb = BLOCK_SIZES[t]
    if n % bs:
        raise ValueError(f"{t.name} rows need a multiple of {bs} elements, got {n}")
    return n // bs * nb


def _blocks(raw: np.ndarray, t: GGMLType, n: int) -> np.ndarray:
    raw = np.ascontiguousarray(raw).reshape(-1).view(np.uint8)
    nbytes = row_bytes(t, n)
    if raw.size < nbytes:
        raise ValueError(f"{t.name}: {n} elements need {nbytes} bytes, got {raw.size}")
    return raw[:nbytes].view(BLOCK_DTYPES[t])


def _nibbles(qs: np.ndarray) -> np.ndarray:
    """u8[nb,16] -> u8[nb,32]: low nibbles are elements 0..15, high nibbles 16..31."""
    return np.concatenate([qs & 0x0F, qs >> 4], axis=1)


def dequantize(raw: np.ndarray, t: GGMLType | int, n: int) -> np.ndarray:
    """First n elements stored in raw (uint8 bytes) as type t -> float32[n]."""
    t = GGMLType.parse(t)
    b = _blocks(raw, t, n)
    if t in (GGMLType.F32, GGMLType.F16):
        return b.astype(np.float32)
    d = b["d"].astype(np.float32)[:, None]
    if t == GGMLType.Q8_0:
        y = b["qs"].astype(np.float32) * d
    elif t == GGMLType.Q4_0:
        y = (_nibbles(b["qs"]).astype(np.int8) - np.int8(8)).astype(np.float32) * d
    else:
        y = _nibbles(b["qs"]).astype(np.float32) * d + b["m"].astype(np.float32)[:, None]
    return y.reshape(-1)


def _roundf(x: np.ndarray) -> np.ndarray:
    """C roundf (half away from zero), as ggml's reference quantizers use."""
    return np.sign(x) * np.floor(np.abs(x) + np.float32(0.5))


def _inverse(d: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore"):
        return np.where(d == 0, np.float32(0), np.float32(1) / d).astype(np.float32)


def quantize(x: np.ndarray, t: GGMLType | int) -> np.ndarray:
    """float32 values -> uint8 bytes of type t, round-to-nearest like ggml's *_ref quantizers."""
    t = GGMLType.parse(t)
    x = np.ascontiguousarray(x, dtype=np.float32).reshape(-1)
    if t == GGMLType.F32:
        return x.view(np.uint8).copy()
    if t == GGMLType.F16:
        return x.astype(np.float16).view(np.uint8)
    if x.size % QK:
        raise ValueError(f"{t.name} needs a multiple of {QK} elements, got {x.size}")
    xb = x.reshape(-1, QK)
    out = np.zeros(xb.shape[0], BLOCK_DTYPES[t])
    if t == GGMLType.Q8_0:
        d = np.abs(xb).max(axis=1) / np.float32(127)
        out["qs"] = _roundf(xb * _inverse(d)[:, None]).astype(np.int8)
    elif t == GGMLType.Q4_0:
        # the signed value of largest magnitude maps to -8
        mx = np.take_along_axis(xb, np.abs(xb).argmax(axis=1)[:, None], axis=1)[:, 0]
        d = mx / np.float32(-8)
        q = np.trunc(xb * _inverse(d)[:, None] + np.float32(8.5))
        out["qs"] = _pack(np.clip(q, 0, 15).astype(np.uint8))
    else:
        lo, hi = xb.min(axis=1), xb.max(axis=1)
        d = (hi - lo) / np.float32(15)
        q = np.trunc((xb - lo[:, None]) * _inverse(d)[:, None] + np.float32(0.5))
        out["qs"] = _pack(np.clip(q, 0, 15).astype(np.uint8))
        out["m"] = lo
    out["d"] = d
    return out.view(np.uint8)


def _pack(q: np.ndarray) -> np.ndarray:
    return q[:, :16] | (q[:, 16:] << 4)


def quantize_activations(x: np.ndarray) -> np.ndarray:
    """float32[..., k] (k % 32 == 0) -> ACT_BLOCK_DTYPE[..., k/32], exactly as the native matmul does:
    d = amax/127, q = round-half-to-even(x * (1/d)), s = d * sum(q)."""
    x = np.asarray(x, dtype=np.float32)
    if x.shape[-1] % QK:
        raise ValueError(f"activation rows need a multiple of {QK} elements, got {x.shape[-1]}")
    xb = x.reshape(*x.shape[:-1], -1, QK)
    d = np.abs(xb).max(axis=-1) / np.float32(127)
    q = np.rint(xb * _inverse(d)[..., None]).astype(np.int8)
    out = np.zeros(xb.shape[:-1], ACT_BLOCK_DTYPE)
    out["d"], out["qs"] = d, q
    out["s"] = d * q.astype(np.int32).sum(axis=-1).astype(np.float32)
    return out


def dequantize_activations(a: np.ndarray) -> np.ndarray:
    """ACT_BLOCK_DTYPE[..., nb] -> float32[..., nb*32]."""
    y = a["qs"].astype(np.float32) * a["d"][..., None]
    return y.reshape(*a.shape[:-1], -1)


def _split(raw: np.ndarray, t: GGMLType, cols: int):
    """uint8 rows of type t -> ([rows, bytes] array, rows, blocks per row, quantized bytes per block)."""
    rows = np.ascontiguousarray(raw).view(np.uint8).reshape(-1, row_bytes(t, cols))
    return rows, rows.shape[0], cols // QK, 32 if t in (GGMLType.Q8_0, GGMLType.Q8_0R) else 16


def repack_rows(raw: np.ndarray, t: GGMLType | int, cols: int) -> np.ndarray:
    """GGUF rows of cols elements of type t (Q4_0, Q4_1, Q8_0) -> the same rows in el_repack's layout (uint8
    [rows, row bytes]): per row the quantized bytes of all nb blocks, then the nb d (f16), then (Q4_1) the nb m.
    Q8_0: 32 bytes per block. Q4: 32 bytes per pair of blocks, byte j = element j of the first block (low nibble)
    and of the second (high nibble); an odd last block keeps GGUF's 16 bytes (byte j: elements j and j + 16)."""
    t = GGMLType.parse(t)
    rows, n, nb, _ = _split(raw, t, cols)
    b = rows.view(BLOCK_DTYPES[t])                     # [n, nb]
    if t == GGMLType.Q8_0:
        qs = b["qs"].view(np.uint8).reshape(n, -1)
    else:
        q = _nibbles(b["qs"].reshape(-1, 16)).reshape(n, nb, QK)
        pairs = q[:, :nb // 2 * 2].reshape(n, nb // 2, 2, QK)
        odd = b["qs"][:, nb // 2 * 2:].reshape(n, -1)   # an odd last block: as it is
        qs = np.concatenate([(pairs[:, :, 0] | pairs[:, :, 1] << 4).reshape(n, -1), odd], 1)
    fields = [qs, np.ascontiguousarray(b["d"]).view(np.uint8)]
    if t == GGMLType.Q4_1:
        fields.append(np.ascontiguousarray(b["m"]).view(np.uint8))
    return np.concatenate(fields, 1)


def _groups(raw: np.ndarray, t: GGMLType, cols: int):
    """Rows of type t in 8-row groups -> ([groups, 8 row bytes] array, groups, blocks per row)."""
    rows, n, nb, _ = _split(raw, t, cols)
    if n % 8:
        raise ValueError(f"the interleaved layout takes whole groups of 8 rows, got {n} rows")
    return rows.reshape(n // 8, -1), n // 8, nb


def interleave_rows(raw: np.ndarray, t: GGMLType | int, cols: int) -> np.ndarray:
    """GGUF Q4_0 / Q4_1 rows (a multiple of 8) -> el_repack's interleaved layout (uint8 [rows, row bytes]; each 8
    rows' bytes hold one group), block by block: 4 chunks of 32 bytes, row i's 4 bytes at 4 i of chunk c being its
    GGUF qs[4 c .. 4 c + 3]; then the 8 rows' d (f16), then (Q4_1) their m."""
    t = GGMLType.parse(t)
    g, ng, nb = _groups(raw, t, cols)
    b = g.view(BLOCK_DTYPES[t]).reshape(ng, 8, nb).transpose(0, 2, 1)        # [group, block, row]
    fields = [b["qs"].reshape(ng, nb, 8, 4, 4).transpose(0, 1, 3, 2, 4).reshape(ng, nb, -1)]   # [.., chunk, row, 4]
    for f in ("d", "m") if t == GGMLType.Q4_1 else ("d",):
        fields.append(np.ascontiguousarray(b[f]).view(np.uint8).reshape(ng, nb, -1))
    return np.concatenate(fields, 2).reshape(ng * 8, -1)


def _deinterleave(raw: np.ndarray, base: GGMLType, cols: int) -> np.ndarray:
    g, ng, nb = _groups(raw, base, cols)
    g = g.reshape(ng, nb, -1)
    out = np.zeros((ng, nb, 8), BLOCK_DTYPES[base])
    out["qs"] = g[:, :, :128].reshape(ng, nb, 4, 8, 4).transpose(0, 1, 3, 2, 4).reshape(ng, nb, 8, 16)
    scales = g[:, :, 128:].copy().view(np.float16).reshape(ng, nb, -1, 8)
    out["d"] = scales[:, :, 0]
    if base == GGMLType.Q4_1:
        out["m"] = scales[:, :, 1]
    return np.ascontiguousarray(out.transpose(0, 2, 1)).view(np.uint8).reshape(ng * 8, -1)


def unpack_rows(raw: np.ndarray, t: GGMLType | int, cols: int) -> np.ndarray:
    """Inverse of repack_rows and interleave_rows: rows of a repacked or interleaved type t (or its GGUF type) ->
    GGUF rows (uint8 [rows, row bytes])."""
    t = GGMLType.parse(t)
    base = BASE.get(t, t)
    if t in INTERLEAVED.values():
        return _deinterleave(raw, base, cols)
    rows, n, nb, qb = _split(raw, base, cols)
    out = np.zeros((n, nb), BLOCK_DTYPES[base])
    qs = rows[:, :nb * qb]
    scales = rows[:, nb * qb:].copy().view(np.float16)
    out["d"] = scales[:, :nb]
    if base == GGMLType.Q4_1:
        out["m"] = scales[:, nb:]
    if base == GGMLType.Q8_0:
        out["qs"] = qs.reshape(n, nb, QK).view(np.int8)
    else:
        pairs = qs[:, :nb // 2 * QK].reshape(n, nb // 2, 1, QK)
        q = np.concatenate([pairs & 0x0F, pairs >> 4], 2).reshape(n, -1, QK)
        out["qs"][:, :nb // 2 * 2] = _pack(q.reshape(-1, QK)).reshape(n, -1, 16)
        out["qs"][:, nb // 2 * 2:] = qs[:, nb // 2 * QK:].reshape(n, -1, 16)
    return out.view(np.uint8).reshape(n, -1)


GROUPED_KEYS = (GGMLType.Q8_0, GGMLType.Q4_0)   # KV types whose keys the kernels read grouped (el_kv_group)


def _key_fields(t: GGMLType, cols: int):
    """(blocks per row, value bytes per block) of a grouped-key type."""
    if t not in GROUPED_KEYS:
        raise ValueError(f"grouped keys are Q8_0 or Q4_0, not {t.name}")
    return cols // QK, row_bytes(t, QK) - 2


def group_keys(raw: np.ndarray, t: GGMLType | int, cols: int) -> np.ndarray:
    """Quantized key rows (a multiple of 8) -> el_kv_group's layout (uint8 [rows, row bytes]; each 8 rows' bytes hold
    one group): per block the 8 rows' f16 scales, then per byte of the blocks' values the 8 rows' bytes."""
    t = GGMLType.parse(t)
    nb, qb = _key_fields(t, cols)
    g, ng, _ = _groups(raw, t, cols)
    b = g.reshape(ng, 8, nb, qb + 2)                                          # [group, row, block, bytes]
    d = np.ascontiguousarray(b[..., :2].transpose(0, 2, 1, 3)).reshape(ng, -1)  # [group, block, row, 2]
    qs = np.ascontiguousarray(b[..., 2:].transpose(0, 2, 3, 1)).reshape(ng, -1)  # [group, block, byte, row]
    return np.concatenate([d, qs], 1).reshape(ng * 8, -1)


def ungroup_keys(raw: np.ndarray, t: GGMLType | int, cols: int) -> np.ndarray:
    """Inverse of group_keys: grouped key rows -> rows (uint8 [rows, row bytes])."""
    t = GGMLType.parse(t)
    nb, qb = _key_fields(t, cols)
    g, ng, _ = _groups(raw, t, cols)
    out = np.empty((ng, 8, nb, qb + 2), np.uint8)
    out[..., :2] = g[:, :nb * 16].reshape(ng, nb, 8, 2).transpose(0, 2, 1, 3)
    out[..., 2:] = g[:, nb * 16:].reshape(ng, nb, qb, 8).transpose(0, 3, 1, 2)
    return out.reshape(ng * 8, -1)
