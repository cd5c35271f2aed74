#!/usr/bin/env python
"""Decode attention of two builds of the native library in one process, rounds alternating between them.

    python bench/native_ab.py --base 2b9f7f4 [--keys 4096] [--threads 2] [--kv-dtype q8_0] [--rounds 8] [--hot]
                              [--block N] [--block-a N]
    python bench/native_ab.py --a /tmp/a.so --b /tmp/b.so ...

A C change cannot be A/B-tested with two LLM instances (one process imports one build), and on a host whose speed
drifts by tens of percent from minute to minute two processes run minutes apart do not compare. So this loads both
builds' extension modules side by side (--base REV: that revision's native library, built in a temporary git worktree,
against the working tree's build; or two built .so files) and times one decode query over --keys keys in each of 30
layers' caches (blocks each its own allocation, as the KV manager keeps them: a quantized cache's slabs of 512 keys,
an f16 cache's blocks of 64; --block N), after reading 96 MiB to evict them as a decode step's weights do (--hot: not),
each round the best of 3 sweeps, the first build alternating. Prints the medians per layer and the ratio B / A of the
medians and, in brackets, the median of the rounds' ratios, and whether the two builds' outputs are bit for bit the
same (outputs apart by more than 1e-4 stop it). --block-a N gives A's caches blocks of N keys (the same
keys): with one build as both A and B, that times a layout, e.g. --block-a 64 a quantized cache before slabs.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib.machinery
import importlib.util
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import kernels   # bench/kernels.py, beside this file: the decode caches and COLD_BYTES
from edgellm.kv.cache import KVCache
from edgellm.quant import GGMLType

ROOT = Path(__file__).resolve().parent.parent


def load_build(tag: str, so: Path):
    """A built _kernels extension as its own module (a distinct name and path: its own copy of the library)."""
    name = f"ab_{tag}._kernels"   # the init function is found by the last part of the name
    loader = importlib.machinery.ExtensionFileLoader(name, str(so))
    module = importlib.util.module_from_spec(importlib.util.spec_from_file_location(name, so, loader=loader))
    loader.exec_module(module)
    return module


@contextlib.contextmanager
def built_revision(rev: str):
    """The path of git revision rev's native library, built in a temporary worktree (removed afterwards)."""
    with tempfile.TemporaryDirectory() as tmp:
        tree = Path(tmp) / "tree"
        subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", "--force", str(tree), rev], check=True,
                       capture_output=True)
        try:
            subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace", "-q"], cwd=tree, check=True,
                           capture_output=True)
            yield next((tree / "edgellm" / "native").glob("_kernels*.so"))
        finally:
            subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tree)], capture_output=True)


def working_tree_build() -> Path:
    return next((ROOT / "edgellm" / "native").glob("_kernels*.so"))


def compare(so_a: Path, so_b: Path, n_keys: int, threads: int, t: GGMLType, rounds: int, hot: bool,
            block: int, block_a: int | None = None) -> tuple:
    """(median A, median B) seconds per layer, the per-round ratios B / A and whether the two builds' outputs are
    bit for bit the same; A's caches in blocks of block_a keys (default: block), the same keys."""
    runs = []
    for tag, so, size in (("a", so_a, block_a or block), ("b", so_b, block)):
        module = load_build(tag, so)
        module.lib.el_set_threads(threads)
        runs.append(kernels.DecodeCaches(module, *kernels.random_blocks(t, n_keys, np.random.default_rng(0), size),
                                         n_keys, t))
    for r in runs:
        r.sweep()
    if not np.allclose(runs[0].out, runs[1].out, atol=1e-4):
        raise SystemExit("the two builds' attention outputs differ")
    same = np.array_equal(runs[0].out, runs[1].out)
    junk = np.ones(kernels.COLD_BYTES // 4, np.float32)
    best = [[], []]
    for i in range(rounds):
        for which in (0, 1) if i % 2 == 0 else (1, 0):
            times = []
            for _ in range(3):
                if not hot:
                    junk.sum()
                times.append(runs[which].sweep())
            best[which].append(min(times))
    a, b = np.array(best[0]), np.array(best[1])
    return float(np.median(a)), float(np.median(b)), b / a, same


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--base", help="git revision whose build is A (B: the working tree's build)")
    src.add_argument("--a", type=Path, help="a built _kernels .so (with --b)")
    ap.add_argument("--b", type=Path)
    ap.add_argument("--keys", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--kv-dtype", default="q8_0", choices=["f16", "q8_0", "q4_0"])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--hot", action="store_true", help="leave the caches warm between sweeps")
    ap.add_argument("--block", type=int,
                    help="keys per block (default: as the KV manager lays the dtype out, a slab for quantized ones)")
    ap.add_argument("--block-a", type=int, help="A's keys per block, to time a layout (default: --block)")
    args = ap.parse_args()
    t = GGMLType[args.kv_dtype.upper()]
    block = args.block or kernels.BLOCK * (KVCache.slab_blocks if t != GGMLType.F16 else 1)
    for size in (block, args.block_a or block):
        if args.keys % size or args.keys <= 0 or size % kernels.BLOCK:
            ap.error(f"--keys: a positive multiple of {size}, itself a multiple of {kernels.BLOCK}")
    if args.a and not args.b:
        ap.error("--a needs --b")
    with built_revision(args.base) if args.base else contextlib.nullcontext(args.a) as so_a:
        so_b = working_tree_build() if args.base else args.b
        ma, mb, ratios, same = compare(so_a, so_b, args.keys, args.threads, t, args.rounds, args.hot, block, args.block_a)
    print(f"{t.name} keys={args.keys} blocks of {args.block_a or block} / {block} threads={args.threads} "
          f"{'hot' if args.hot else 'cold'}: "
          f"A {ma * 1e6:.1f} us a layer, B {mb * 1e6:.1f}; B / A {mb / ma:.3f} ({np.median(ratios):.3f}); outputs "
          + ("bit for bit the same" if same else "within 1e-4, not bit for bit"))


if __name__ == "__main__":
    main()
