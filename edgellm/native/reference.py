"""Numpy references of the native kernels (slow, straightforward, float64 where it keeps them exact)."""
from __future__ import annotations

import numpy as np

from edgellm.quant.blocks import (BLOCK_DTYPES, GGMLType, dequantize, dequantize_activations,
                                  quantize_activations, row_bytes)


def dequantize_matrix(W: np.ndarray, wtype, rows: int, cols: int) -> np.ndarray:
    return dequantize(W, wtype, rows * cols).reshape(rows, cols)


def matmul_exact(W, wtype, rows: int, cols: int, X: np.ndarray) -> np.ndarray:
    """X @ dequant(W).T in float64, with unquantized activations."""
    return (X.astype(np.float64) @ dequantize_matrix(W, wtype, rows, cols).T.astype(np.float64)).astype(np.float32)


def matmul(W, wtype, rows: int, cols: int, X: np.ndarray) -> np.ndarray:
    """What the native matmul computes: for quantized W the activations are first quantized to 8-bit blocks
    of 32 (quantize_activations); F16/F32 W use X as is."""
    t = GGMLType.parse(wtype)
    if t in (GGMLType.F32, GGMLType.F16):
        return matmul_exact(W, t, rows, cols, X)
    Xq = dequantize_activations(quantize_activations(X.reshape(-1, cols))).reshape(X.shape)
    return matmul_exact(W, t, rows, cols, Xq)


def rmsnorm(x: np.ndarray, w: np.ndarray, eps: float) -> np.ndarray:
    x64 = x.astype(np.float64)
    return (x64 / np.sqrt((x64 * x64).mean(-1, keepdims=True) + eps) * w).astype(np.float32)


def rope(x: np.ndarray, pos, rope_dim: int, freq_base: float, neox: bool) -> np.ndarray:
    """x[n, heads, hd] -> rotated copy."""
    y = x.astype(np.float64)
    half = rope_dim // 2
    ang = np.asarray(pos, np.float64)[:, None] * float(freq_base) ** (-2.0 * np.arange(half) / rope_dim)
    c, s = np.cos(ang)[:, None, :], np.sin(ang)[:, None, :]
    a, b = (np.arange(half), np.arange(half) + half) if neox else (np.arange(0, rope_dim, 2), np.arange(1, rope_dim, 2))
    x0, x1 = y[..., a].copy(), y[..., b].copy()
    y[..., a], y[..., b] = x0 * c - x1 * s, x0 * s + x1 * c
    return y.astype(np.float32)


def kv_gather(k: np.ndarray, v: np.ndarray, pos, idx: np.ndarray, rope_dim: int = 0, freq_base: float = 10000.0,
              neox: bool = False):
    """el_kv_gather: k, v [n_kv_head, n, hd] (model basis) and their positions -> survivors idx [n_kv_head, keep] as
    [keep, n_kv_head, hd]; rope_dim > 0 re-rotates each kept key from its position to its rank (CR-RoPE)."""
    heads, keep = idx.shape
    ko = np.stack([k[h, idx[h]] for h in range(heads)], axis=1)
    vo = np.stack([v[h, idx[h]] for h in range(heads)], axis=1)
    if rope_dim:
        for h in range(heads):
            ko[:, h] = rope(ko[:, h][:, None], np.arange(keep) - np.asarray(pos)[idx[h]], rope_dim, freq_base, neox)[:, 0]
    return ko, vo


def silu_mul(g: np.ndarray, u: np.ndarray) -> np.ndarray:
    g64 = g.astype(np.float64)
    return (g64 / (1 + np.exp(-g64)) * u).astype(np.float32)


def softmax(x: np.ndarray) -> np.ndarray:
    x64 = x.astype(np.float64)
    m = x64.max(-1, keepdims=True)
    finite = np.isfinite(m)
    e = np.exp(x64 - np.where(finite, m, 0))
    return np.where(finite, e / np.maximum(e.sum(-1, keepdims=True), 1e-300), 0).astype(np.float32)


def _kv_rows(arr: np.ndarray, dtype: GGMLType, n_kv: int, n: int, hd: int) -> np.ndarray:
    """First n rows of each kv head of a cache block -> float64 [n_kv, n, hd]."""
    rb = row_bytes(dtype, hd)
    raw = np.ascontiguousarray(arr).reshape(-1).view(np.uint8).reshape(n_kv, -1, rb)[:, :n]
    return dequantize(raw, dtype, n_kv * n * hd).reshape(n_kv, n, hd).astype(np.float64)


def attention_probs(q: np.ndarray, q_pos, n_kv_head: int, blocks, scale: float):
    """Causal GQA softmax over blocks (k, v, pos, n, dtype) -> (p[n_q, n_head, n_keys] float64, V[n_kv, n_keys, hd],
    lse[n_q, n_head]); keys numbered across the blocks in order, quantized ones dequantized."""
    n_q, n_head, hd = q.shape
    gs = n_head // n_kv_head
    keys, vals, kpos = [], [], []
    qd = q.astype(np.float64).reshape(n_q, n_kv_head, gs, hd)
    for k, v, pos, n, dtype in blocks:
        t = GGMLType.parse(dtype)
        K, V = _kv_rows(k, t, n_kv_head, n, hd), _kv_rows(v, t, n_kv_head, n, hd)
        # scores against this block's keys: [n_q, n_head, n]
        keys.append(np.einsum("qgkd,gnd->qgkn", qd, K).reshape(n_q, n_head, n))
        vals.append(V)
        kpos.append(np.asarray(pos, np.int64).reshape(-1)[:n])
    s = np.concatenate(keys, -1) * scale if keys else np.zeros((n_q, n_head, 0))
    V = np.concatenate(vals, 1) if vals else np.zeros((n_kv_head, 0, hd))
    kp = np.concatenate(kpos) if kpos else np.zeros(0, np.int64)
    mask = kp[None, :] <= np.asarray(q_pos, np.int64)[:, None]        # [n_q, n]
    s = np.where(mask[:, None, :], s, -np.inf)
    m = s.max(-1, keepdims=True, initial=-np.inf)
    visible = np.isfinite(m)
    e = np.where(visible, np.exp(s - np.where(visible, m, 0)), 0)
    lsum = e.sum(-1, keepdims=True)
    p = np.where(visible, e / np.where(visible, lsum, 1), 0)
    with np.errstate(divide="ignore"):
        lse = np.where(visible, m + np.log(np.where(visible, lsum, 1)), -np.inf)[..., 0]
    return p, V, lse


def attention(q: np.ndarray, q_pos, n_kv_head: int, blocks, scale: float):
    """Causal GQA attention over blocks (k, v, pos, n, dtype) -> (out[n_q, n_head, hd], lse[n_q, n_head])."""
    n_q, n_head, hd = q.shape
    p, V, lse = attention_probs(q, q_pos, n_kv_head, blocks, scale)
    out = np.einsum("qgkn,gnd->qgkd", p.reshape(n_q, n_kv_head, n_head // n_kv_head, -1), V).reshape(n_q, n_head, hd)
    return out.astype(np.float32), lse.astype(np.float32)


def attention_mass(q: np.ndarray, q_pos, n_kv_head: int, blocks, scale: float, reduce_max: bool = False):
    """Per kv head and key, the sum (or max) over queries and the group's query heads of the attention probability."""
    n_q, n_head, _ = q.shape
    p = attention_probs(q, q_pos, n_kv_head, blocks, scale)[0].reshape(n_q, n_kv_head, n_head // n_kv_head, -1)
    return (p.max(axis=(0, 2)) if reduce_max else p.sum(axis=(0, 2))).astype(np.float32)


def hadamard(x: np.ndarray) -> np.ndarray:
    """Rows of x times the normalized Walsh-Hadamard matrix (Sylvester order)."""
    d = x.shape[-1]
    H = np.ones((1, 1))
    while H.shape[0] < d:
        H = np.block([[H, H], [H, -H]])
    return (x.astype(np.float64) @ H / np.sqrt(d)).astype(np.float32)


def merge(o1, l1, o2, l2):
    """Combine two partial attentions over disjoint key sets by their log-sum-exp."""
    o1, l1, o2, l2 = (np.asarray(a, np.float64) for a in (o1, l1, o2, l2))
    with np.errstate(invalid="ignore"):
        l = np.logaddexp(l1, l2)
        w1 = np.where(np.isfinite(l1), np.exp(l1 - l), 0)[..., None]
        w2 = np.where(np.isfinite(l2), np.exp(l2 - l), 0)[..., None]
    return (w1 * o1 + w2 * o2).astype(np.float32), l.astype(np.float32)


def uniforms(seed: int, n: int) -> list[float]:
    """el_uniform's first n draws from state seed: splitmix64, the top 53 bits over 2^53."""
    out, state, mask = [], seed % 2**64, 2**64 - 1
    for _ in range(n):
        state = (state + 0x9E3779B97F4A7C15) & mask
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        out.append(((z ^ (z >> 31)) >> 11) / 2.0**53)
    return out


def sample(logits, history, temperature: float, top_k: int = 0, top_p: float = 1.0, min_p: float = 0.0,
           repeat_penalty: float = 1.0, repeat_last_n: int = 64, u: float = 0.0) -> int:
    """el_sample with the uniform u: the whole vocabulary sorted, the weights and their running sums in float64
    (the native one sorts only the candidates it needs and, without top-k, sums the vocabulary's weight in float)."""
    f32 = np.float32
    v = np.asarray(logits, f32).reshape(-1).copy()
    recent = np.unique([t for t in list(history)[max(len(history) - repeat_last_n, 0):] if 0 <= t < v.size])
    if repeat_penalty != 1.0 and recent.size:
        old = v[recent]
        v[recent] = np.where(old > 0, old / f32(repeat_penalty), old * f32(repeat_penalty))
    ids = np.flatnonzero(~np.isnan(v))
    order = ids[np.lexsort((ids, -v[ids]))]   # larger value first, then smaller id
    if temperature == 0:
        return int(order[0])
    if top_k:
        order = order[:top_k]
    w = np.exp((v[order].astype(np.float64) - float(v[order[0]])) / float(f32(temperature)))
    cum = np.cumsum(w)
    keep = order.size
    low = np.flatnonzero(w[1:] < float(f32(min_p)))
    if low.size:
        keep = int(low[0]) + 1
    if top_p < 1:
        reach = np.flatnonzero(cum >= float(f32(top_p)) * cum[-1])
        keep = min(keep, int(reach[0]) + 1)
    j = int(np.searchsorted(cum[:keep], u * cum[keep - 1], side="right"))
    return int(order[min(j, keep - 1)])


__all__ = ["BLOCK_DTYPES", "attention", "attention_mass", "attention_probs", "dequantize_matrix", "hadamard", "matmul", "matmul_exact", "merge", "rmsnorm", "rope",
           "sample", "silu_mul", "softmax", "uniforms"]
