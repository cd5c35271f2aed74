"""Kernel micro-benchmarks: el_matmul GEMV/GEMM and el_attention at SmolLM2-135M shapes.

python bench/kernels.py [--threads 1,2] [--simd scalar|avx2|...] [--decode-only] [--calls N]

--calls N runs every case exactly N times instead of timing it: for instruction counts, e.g.
valgrind --tool=callgrind --toggle-collect=el_attention python bench/kernels.py --threads 1 --decode-only --calls 200
"""
import argparse
import time

import numpy as np

from edgellm import native as N
from edgellm.kv.cache import KVCache
from edgellm.quant import GROUPED_KEYS, GGMLType, group_keys, quantize, row_bytes

ffi, lib = N.ffi, N.lib
COLD_BYTES = 96 << 20   # more than any L3 here (32 MiB): the GEMV reads from DRAM


CALLS = None   # --calls: a fixed number of calls per case instead of timing


def timeit(fn, min_time=0.3):
    if CALLS:
        for _ in range(CALLS):
            fn()
        return float("nan")
    fn()
    reps, t0 = 0, time.perf_counter()
    while True:
        fn()
        reps += 1
        dt = time.perf_counter() - t0
        if dt >= min_time:
            return dt / reps


def bench_matmul(t, rows, cols, n, rng):
    W = quantize(rng.standard_normal(rows * cols).astype(np.float32) * 0.05, t)
    t = N.repack(W, t, rows, cols)   # the layout the model runs (GGUF's where the kernels have no other)
    X = rng.standard_normal((n, cols)).astype(np.float32)
    Y = np.empty((n, rows), np.float32)
    pw, px, py = ffi.from_buffer(W), ffi.from_buffer("float[]", X), ffi.from_buffer("float[]", Y)
    s = timeit(lambda: lib.el_matmul(pw, int(t), rows, cols, px, n, py, rows))
    gb = rows * row_bytes(t, cols) / s / 1e9
    gf = 2 * rows * cols * n / s / 1e9
    print(f"  matmul {t.name:6s} {rows:6d}x{cols:<5d} n={n:<4d} {s * 1e6:10.1f} us  {gb:7.2f} GB/s  {gf:7.2f} GFLOP/s"
          + (f"  cold: {cold_gemv_gb_s(W, t, rows, cols, px, py):.2f} GB/s" if n == 1 and not CALLS else ""))


def cold_gemv_gb_s(W, t, rows, cols, px, py, total_bytes=COLD_BYTES):
    """GB/s of the same GEMV over copies of W that together exceed the last-level cache, as decode reads its weights
    (each once per token, from DRAM)."""
    copies = [W.copy() for _ in range(max(2, total_bytes // W.nbytes))]
    ptrs = [ffi.from_buffer(c) for c in copies]
    s = timeit(lambda: [lib.el_matmul(p, int(t), rows, cols, px, 1, py, rows) for p in ptrs]) / len(ptrs)
    return rows * row_bytes(t, cols) / s / 1e9


def bench_attention(t, n_keys, n_q, rng, block=64):
    """n_q queries at the end of n_keys keys, stored in blocks of `block` tokens as the KV manager stores them."""
    n_head, n_kv, hd = 9, 3, 64
    n_blocks = n_keys // block
    k = quantize(rng.standard_normal(n_kv * n_keys * hd).astype(np.float32), t).reshape(n_blocks, -1)
    v = quantize(rng.standard_normal(n_kv * n_keys * hd).astype(np.float32), t).reshape(n_blocks, -1)
    pos = np.arange(n_keys, dtype=np.int32).reshape(n_blocks, block)
    q = rng.standard_normal((n_q, n_head, hd)).astype(np.float32)
    q_pos = np.arange(n_keys - n_q, n_keys, dtype=np.int32)
    out = np.empty((n_q, n_head, hd), np.float32)
    lse = np.empty((n_q, n_head), np.float32)
    k = np.stack([keys_for(N, kb, t) for kb in k])
    blk = ffi.new("el_kvblock[]", n_blocks)
    for b in range(n_blocks):
        blk[b].k, blk[b].v, blk[b].pos = ffi.from_buffer(k[b]), ffi.from_buffer(v[b]), ffi.from_buffer("int32_t[]", pos[b])
        blk[b].n, blk[b].cap, blk[b].dtype = block, block, int(t)
    pq, pqp = ffi.from_buffer("float[]", q), ffi.from_buffer("int32_t[]", q_pos)
    po, pl = ffi.from_buffer("float[]", out), ffi.from_buffer("float[]", lse)
    s = timeit(lambda: lib.el_attention(pq, n_q, pqp, n_head, n_kv, hd, 0.125, blk, n_blocks, po, pl))
    gb = 2 * n_kv * n_keys * row_bytes(t, hd) / s / 1e9
    # visible (query, key) pairs x heads x (K.Q + P.V) x 2 flops
    pairs = sum(min(n_keys, int(p) + 1) for p in q_pos)
    gf = pairs * n_head * hd * 4 / s / 1e9
    print(f"  attention {t.name:4s} keys={n_keys:<5d} n_q={n_q:<4d} {s * 1e6:10.1f} us  {gb:7.2f} GB/s (K+V once)"
          f"  {gf:7.2f} GFLOP/s")


N_HEAD, N_KV, HD, BLOCK, N_LAYER = 9, 3, 64, 64, 30   # SmolLM2-135M's attention and the KV manager's blocks


def random_blocks(t, n_keys, rng, block=BLOCK):
    """N_LAYER layers' K/V of n_keys random keys each as blocks of `block` tokens, (k, v, pos) per block in layer
    order, and one query [1, N_HEAD, HD]. The same rng state gives the same keys whatever the block size."""
    raw = []
    for _ in range(N_LAYER):
        kv = rng.standard_normal((2, N_KV, n_keys, HD)).astype(np.float32)
        for b in range(0, n_keys, block):
            k, v = (quantize(np.ascontiguousarray(x[:, b:b + block]).reshape(-1), t) for x in kv)
            raw.append((k, v, np.arange(b, b + block, dtype=np.int32)))
    return raw, rng.standard_normal((1, N_HEAD, HD)).astype(np.float32)


def keys_for(module, k: np.ndarray, t) -> np.ndarray:
    """Quantized key rows as a build reads them: grouped (el_kv_group) where it has the grouped layout, else rows
    (builds before it), so that native_ab times builds of either layout on the same keys."""
    grouped = t in GROUPED_KEYS and hasattr(module.lib, "el_kv_group")
    return group_keys(k, t, HD).reshape(-1) if grouped else k


class DecodeCaches:
    """random_blocks' caches as one build's el_kvblock descriptors (each block its own allocation, as the KV manager
    keeps them); module: a native library module with ffi and lib (edgellm.native, or another build of it)."""

    def __init__(self, module, raw, q, n_keys: int, t):
        block = len(raw[0][2])
        self.lib, ffi, nb = module.lib, module.ffi, n_keys // block
        raw = [(keys_for(module, k, t), v, pos) for k, v, pos in raw]
        self.layers = []
        for layer in range(N_LAYER):
            blk = ffi.new("el_kvblock[]", nb)
            for b in range(nb):
                k, v, pos = raw[layer * nb + b]
                blk[b].k, blk[b].v, blk[b].pos = ffi.from_buffer(k), ffi.from_buffer(v), ffi.from_buffer("int32_t[]", pos)
                blk[b].n, blk[b].cap, blk[b].dtype = block, block, int(t)
            self.layers.append(blk)
        self.out, self.lse = np.empty((1, N_HEAD, HD), np.float32), np.empty((1, N_HEAD), np.float32)
        # the descriptors and arguments point into these arrays: they live as long as the caches (a block of 512
        # keys is an mmap of its own, unmapped when freed)
        self.held = (raw, q, np.array([n_keys], np.int32))
        self.args = (ffi.from_buffer("float[]", q), 1, ffi.from_buffer("int32_t[]", self.held[2]), N_HEAD, N_KV, HD,
                     1 / np.sqrt(HD))
        self.tail = (nb, ffi.from_buffer("float[]", self.out), ffi.from_buffer("float[]", self.lse))

    def sweep(self) -> float:
        """Seconds per layer of one decode query through every layer."""
        t0 = time.perf_counter()
        for blk in self.layers:
            self.lib.el_attention(*self.args, blk, *self.tail)
        return (time.perf_counter() - t0) / N_LAYER


def bench_attention_cold(t, n_keys, rng, block=BLOCK):
    """Decode attention as a decode step meets it: one query over n_keys keys for each of N_LAYER layers' caches,
    after reading COLD_BYTES evicted them (as the weights do between two visits of a layer's K/V). Per layer; `hot`:
    the same sweep again at once. block: tokens per block (a kv head's rows in runs of that many)."""
    caches = DecodeCaches(N, *random_blocks(t, n_keys, rng, block), n_keys, t)
    junk = np.ones(COLD_BYTES // 4, np.float32)
    hot = min(caches.sweep() for _ in range(20))
    cold = []
    for _ in range(15):
        junk.sum()
        cold.append(caches.sweep())
    print(f"  attention {t.name:4s} keys={n_keys:<5d} n_q=1    cold {np.median(cold) * 1e6:8.1f} us/layer   "
          f"hot {hot * 1e6:8.1f} us/layer ({N_LAYER} layers' K/V, blocks of {block})")


def bench_kv_quantize(t, rng, n_kv=3, block=64, hd=64):
    """A full f16 tail block (one layer's K or V) converted to the cache dtype, as each tail that fills is."""
    x = rng.standard_normal(n_kv * block * hd).astype(np.float16)
    out = np.empty(row_bytes(t, x.size), np.uint8)
    px, po = ffi.from_buffer("uint16_t[]", x.view(np.uint16)), ffi.from_buffer(out)
    s = timeit(lambda: lib.el_kv_quantize(px, po, x.size, int(t)))
    print(f"  kv block f16 -> {t.name:4s} {x.size} values {s * 1e6:10.1f} us  {s * 1e9 / x.size:7.2f} ns/value")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--simd", choices=sorted(N.SIMD_LEVELS),
                    help="a kernel table at or below the detected one (default: the detected one)")
    ap.add_argument("--decode-only", action="store_true", help="one-token cases only (GEMV, decode attention)")
    ap.add_argument("--calls", type=int, help="run each case exactly this many times (no timing)")
    args = ap.parse_args()
    global CALLS
    CALLS = args.calls
    if args.simd:
        level = N.SIMD_LEVELS[args.simd]
        if N.set_simd(level) != level:
            raise SystemExit(f"no {args.simd} kernels on this machine")
    rng = np.random.default_rng(0)
    print(f"simd: {N.SIMD_NAMES[N.simd_level()]}")
    for nth in map(int, args.threads.split(",")):
        N.set_threads(nth)
        print(f"threads={nth}")
        for n in (1,) if args.decode_only else (1, 512):
            for t, rows, cols in [(GGMLType.Q4_1, 1536, 576), (GGMLType.Q4_1, 576, 1536), (GGMLType.Q8_0, 49152, 576)]:
                bench_matmul(t, rows, cols, n, rng)
        for t in (GGMLType.F16, GGMLType.Q8_0):
            for n_keys in (512, 4096):
                bench_attention(t, n_keys, 1, rng)
        for t in () if CALLS else (GGMLType.F16, GGMLType.Q8_0):
            bench_attention_cold(t, 640, rng)
        for block in () if CALLS else (BLOCK, BLOCK * KVCache.slab_blocks):   # a quantized cache's tails, its slabs
            bench_attention_cold(GGMLType.Q8_0, 4096, rng, block)
        for t in () if args.decode_only else (GGMLType.F16, GGMLType.Q8_0):
            for n_keys in (512, 4096):   # a prefill chunk of 512 queries at the end of the context
                bench_attention(t, n_keys, 512, rng)
    for t in (GGMLType.Q8_0, GGMLType.Q4_0):   # serial: once per tail block filled, on the calling thread
        bench_kv_quantize(t, rng)


if __name__ == "__main__":
    main()
