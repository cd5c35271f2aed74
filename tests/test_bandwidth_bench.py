"""bench/bandwidth.py, whose bound the README's decode share divides by: its C read and its bytes per token."""
import importlib.util
import math
import platform
import shutil
from pathlib import Path

import pytest

from edgellm import native as N
from edgellm.formats.gguf import GGUFFile

BENCH = Path(__file__).parent.parent / "bench"


def load_script(name: str):
    """A bench/ script as a module (bench/ is no package: its scripts import each other from beside them)."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bandwidth():
    return load_script("bandwidth")


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
@pytest.mark.parametrize("ms, ops, prefetch", [(0, 0, 0), (40, 0, 0), (40, 6, 0), (40, 6, 4096)])
def test_read_passes_report_every_pass(bandwidth, ms, ops, prefetch):
    rates = bandwidth.read_passes(2, mb=64, passes=2, ms=ms, ops=ops, prefetch=prefetch)
    assert len(rates) == 2
    # 64 MiB in a pass of 40 ms or one sweep: far above 0.1 GB/s on any machine, and below 10 TB/s
    assert all(math.isfinite(r) and 0.1 < r < 1e4 for r in rates)


@pytest.mark.skipif(shutil.which("cc") is None, reason="no C compiler")
def test_read_in_huge_pages(bandwidth):
    """--huge-pages: the buffer is read from transparent huge pages, or the read says the kernel gave none."""
    try:
        rates = bandwidth.read_passes(1, mb=64, passes=2, ms=40, huge=True)
    except RuntimeError as e:
        assert "no huge pages" in str(e)
        pytest.skip(str(e))
    assert len(rates) == 2 and all(math.isfinite(r) and 0.1 < r < 1e4 for r in rates)


def test_best_read_takes_the_faster_pages(bandwidth, monkeypatch):
    """The bound's read: the best pass of the 4 KiB and the huge-page buffers, the small pages' alone where the kernel
    gives no huge ones."""
    def fake(threads, passes, ms, exe, huge=False, **kw):
        if huge and fake.no_huge:
            raise RuntimeError("the kernel gave the buffer no huge pages")
        return [20.0, 21.0] if huge else [22.0, 19.0]
    monkeypatch.setattr(bandwidth, "read_passes", fake)
    fake.no_huge = False
    assert bandwidth.best_read(2, 2, 300, "bw") == 22.0
    fake.no_huge = True
    assert bandwidth.best_read(2, 2, 300, "bw") == 22.0
    monkeypatch.setattr(bandwidth, "read_passes", lambda *a, huge=False, **k: [25.0] if huge else [22.0])
    assert bandwidth.best_read(2, 2, 300, "bw") == 25.0


def test_bytes_per_token_counts_every_matrix_once_and_the_context(bandwidth, model_path):
    g = GGUFFile(model_path)
    n_layer, n_kv, hd = 30, 3, 64
    # tied embeddings: the output layer multiplies by token_embd, which decode reads whole once per token
    out = g.tensors.get("output.weight") or g.tensors["token_embd.weight"]
    names = ("attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate", "ffn_up", "ffn_down")
    weights = out.data.nbytes + sum(g.tensors[f"blk.{i}.{n}.weight"].data.nbytes
                                    for i in range(n_layer) for n in names)
    wb, kvb = bandwidth.bytes_per_token(str(model_path), 512, "q8_0")
    assert wb == weights
    # q8_0: 34 bytes per 32 values; K and V, every layer and KV head, 512 positions
    assert kvb == 2 * n_layer * n_kv * (hd // 32 * 34) * 512


def test_decode_bound_pairs_each_round_with_its_read(bandwidth, model_path, monkeypatch):
    """vs_llamacpp --bandwidth: each round's decode over the bound of the read right after it; the median round."""
    monkeypatch.syspath_prepend(str(BENCH))
    vs = load_script("vs_llamacpp")
    per_token = sum(bandwidth.bytes_per_token(str(model_path), 512, "q8_0"))
    # (decode tok/s, read GB/s): shares 0.5, 0.8 and 0.6 of 1e9 * read / per_token
    paired = [(r * 1e9 / per_token * s, r) for r, s in ((30.0, 0.5), (20.0, 0.8), (25.0, 0.6))]
    b = vs.decode_bound(str(model_path), 512, "q8_0", paired)
    assert b["shares"] == pytest.approx([0.5, 0.6, 0.8])
    assert b["share"] == pytest.approx(0.6) and b["read_gb_s"] == 25.0
    assert b["decode_tok_s"] == pytest.approx(25e9 / per_token)
    assert "60% of the bound (rounds: 50% / 60% / 80%" in vs.format_bound(b)


def test_engines_take_turns_going_first(monkeypatch):
    """vs_llamacpp: each engine runs once per round, and the one that goes first alternates from round to round."""
    monkeypatch.syspath_prepend(str(BENCH))
    order = load_script("vs_llamacpp").engine_order(3)
    assert order == ["edgellm", "llama.cpp", "llama.cpp", "edgellm", "edgellm", "llama.cpp"]


@pytest.fixture(scope="module")
def native_ab():
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(BENCH))   # it imports bench/kernels.py
        return load_script("native_ab")


def test_native_ab_loads_two_copies_of_a_build(native_ab):
    """One build under two module names (dlopen shares the one library; two builds' paths give two): the same
    caches through both, outputs bit for bit the same, a ratio per round, times that are times."""
    so = native_ab.working_tree_build()
    a, b, ratios, same = native_ab.compare(so, so, 128, 1, native_ab.GGMLType.Q8_0, rounds=2, hot=True, block=64)
    assert same and len(ratios) == 2 and all(math.isfinite(r) and r > 0 for r in ratios)
    assert 0 < a < 1 and 0 < b < 1   # seconds per layer for 128 keys
    # a layout against another: the same keys in blocks of 64 and of 128 (compare exits if the outputs differ)
    assert len(native_ab.compare(so, so, 128, 1, native_ab.GGMLType.Q8_0, rounds=1, hot=True, block=128,
                                 block_a=64)[2]) == 1


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("git") is None or shutil.which("cc") is None, reason="needs git and a C compiler")
def test_native_ab_builds_a_revision(native_ab):
    with native_ab.built_revision("HEAD") as so:
        assert so.is_file() and native_ab.load_build("rev", so).lib.el_attention
        tree = so.parents[2]
    assert not tree.exists()   # the worktree is gone with the context


@pytest.mark.slow   # builds the whole library with -O3 (~50 s)
@pytest.mark.skipif(shutil.which("cc") is None or platform.machine() != "x86_64", reason="x86-64 with a C compiler")
@pytest.mark.parametrize("kv_type", ["q8_0", "q4_0"])
@pytest.mark.parametrize("simd,floor", [("avx2", 24), ("avx512", 12)])
def test_tile_cycles_times_the_tile(kv_type, simd, floor):
    """bench/tile_cycles.py builds the library's sources with its harness and times a table's tile: a time, and no
    fewer FMA cycles (8 lanes, 2 a cycle) a key than its K.Q and P.V of 3 rows of 64 dimensions take: 48 FMAs of 8
    lanes with AVX2, 24 of 16 with AVX-512."""
    if N.SIMD_LEVELS[simd] > N.lib.el_simd_level():
        pytest.skip(f"no {simd} here")
    ns, cycles = load_script("tile_cycles").measure(BENCH.parent, kv_type, rows=3, reps=1, simd=simd)
    assert 0 < ns < 1000 and cycles >= floor


@pytest.mark.slow   # builds the whole library with -O3 (~50 s)
@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_attention_sweep_times_cold_layers(monkeypatch):
    """bench/attention_sweep.py builds the library's sources with its driver and times every layer's decode attention
    over a cold cache: one time a sweep, each a fraction of a second (its driver fails on a NaN output)."""
    monkeypatch.syspath_prepend(str(BENCH))   # it imports tile_cycles' build from beside it
    per_layer = load_script("attention_sweep").sweep(BENCH.parent, "q8_0", keys=1024, layers=4, threads=2, sweeps=2)
    assert len(per_layer) == 2 and all(0 < s < 0.1 for s in per_layer)
    with pytest.raises(ValueError):
        load_script("attention_sweep").sweep(BENCH.parent, keys=1000)


@pytest.mark.slow   # builds the whole library with -O3 (~30 s)
@pytest.mark.skipif(shutil.which("cc") is None, reason="needs a C compiler")
def test_stream_sync_times_every_way(monkeypatch):
    """bench/stream_sync.py builds the library's sources with its harness and sweeps a token's layer matrices each
    way: a median and a best rate for each, the best no slower than the median."""
    monkeypatch.syspath_prepend(str(BENCH))   # it imports tile_cycles' build from beside it
    rates = load_script("stream_sync").measure(BENCH.parent, threads=2, sweeps=3)
    assert list(rates) == ["matmul", "barrier", "free", "read"]
    for median, best in rates.values():
        assert 0.1 < median <= best < 10000
