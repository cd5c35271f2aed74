"""The public API end to end on the default model."""
import sys

import numpy as np
import psutil
import pytest

import edgellm
from edgellm.cli.common import CHAT_SAMPLING
from edgellm.runtime.model import Model

PROMPT = "The three primary colors are"


@pytest.fixture(scope="module")
def llm(model_path):
    with edgellm.LLM(str(model_path), n_threads=2) as m:
        yield m


def test_kvconfig_rejects_bad_choices():
    with pytest.raises(ValueError, match="not available"):
        edgellm.KVConfig(spill="ssd")
    with pytest.raises(ValueError, match="choose one of"):
        edgellm.KVConfig(policy="lru")
    with pytest.raises(ValueError, match="kv_dtype"):
        edgellm.KVConfig(kv_dtype="int3")
    with pytest.raises(ValueError, match="budget"):
        edgellm.KVConfig(policy="window", budget="lots")
    with pytest.raises(TypeError):
        edgellm.KVConfig(polcy="full")


def test_budget_in_bytes_converts_with_the_kv_dtype():
    kv = edgellm.KVConfig(policy="infinipot", budget="64MB", kv_dtype="q8_0")
    assert kv.budget_tokens(30 * 2 * 3 * 68, 8192) == 64 * 2**20 // (30 * 2 * 3 * 68)
    assert edgellm.KVConfig(policy="window").budget_tokens(1.0, 8192) == 2048
    assert edgellm.KVConfig().budget_tokens(1.0, 8192) == 8192


def test_unknown_model_name():
    with pytest.raises(FileNotFoundError, match="neither a registry name"):
        edgellm.LLM("no-such-model")


def test_tokenize_roundtrip(llm):
    ids = llm.tokenize("Hello, world! 123")
    assert llm.detokenize(ids) == "Hello, world! 123"


def test_greedy_matches_numpy_reference(llm, model_path):
    ids = llm.tokenize(PROMPT)
    ours = llm.generate(ids, max_tokens=6, ignore_eos=True)
    ref = edgellm.LLM(str(model_path), backend="numpy").generate(ids, max_tokens=6, ignore_eos=True)
    assert ours == ref and len(ours) > 0


def test_stream_equals_blocking(llm):
    text = llm.generate(PROMPT, max_tokens=16, ignore_eos=True)
    pieces = list(llm.generate(PROMPT, max_tokens=16, ignore_eos=True, stream=True))
    assert "".join(pieces) == text and len(pieces) > 1


def test_max_tokens_and_stats(llm):
    llm.generate(PROMPT, max_tokens=5, ignore_eos=True)
    s = llm.stats()
    assert s["decode_tokens"] == 5 and s["decode_tok_s"] > 0 and s["prefill_tok_s"] > 0
    assert s["peak_rss_mb"] > 0 and s["kv_bytes"]["hot"] > 0 and s["kv_bytes"]["ssd"] == 0


def test_stop_string(llm):
    full = llm.generate(PROMPT, max_tokens=16, ignore_eos=True)
    stop = full.strip().split()[1]
    cut = llm.generate(PROMPT, max_tokens=16, ignore_eos=True, stop=[stop])
    assert stop not in cut and full.startswith(cut)
    assert "".join(llm.generate(PROMPT, max_tokens=16, ignore_eos=True, stop=stop, stream=True)) == cut


def test_prefix_reuse_equals_fresh_run(llm, model_path):
    llm.generate("Once upon a time", max_tokens=4)
    cont = llm.generate("Once upon a time there was", max_tokens=8, ignore_eos=True)
    fresh = edgellm.LLM(str(model_path)).generate("Once upon a time there was", max_tokens=8, ignore_eos=True)
    assert cont == fresh


def test_seeded_sampling_is_reproducible(llm):
    kw = dict(max_tokens=12, temperature=0.9, top_k=40, top_p=0.95, min_p=0.02, ignore_eos=True)
    a, b = llm.generate(PROMPT, seed=1, **kw), llm.generate(PROMPT, seed=1, **kw)
    others = {llm.generate(PROMPT, seed=s, **kw) for s in range(2, 6)}
    assert a == b and len(others | {a}) > 1


def test_chat_uses_template_and_stops(llm):
    reply = llm.chat([{"role": "user", "content": "What is the capital of Germany?"}], max_tokens=24)
    # the reply ends at <|im_end|> (an end-of-turn stop id), well before max_tokens, and never shows it
    assert "Berlin" in reply and "<|im_end|>" not in reply and llm.stats()["decode_tokens"] < 24


def test_logits_every_position(llm):
    ids = llm.tokenize(PROMPT)
    lg = llm.logits(ids)
    assert lg.shape == (len(ids), 49152) and lg.dtype == np.float32
    # teacher forcing: the last row is the next-token distribution generate() starts from
    assert llm.detokenize([int(lg[-1].argmax())]) == llm.generate(ids, max_tokens=1, ignore_eos=True)


def test_over_long_prompt_is_refused(model_path):
    small = edgellm.LLM(str(model_path), n_ctx=64)
    with pytest.raises(ValueError, match="the context holds 64"):
        small.generate(list(range(100, 200)))


def test_chunked_prefill_equals_single_chunk(model_path, parity_ref):
    model = Model(model_path)
    ids = parity_ref["ids"][0][:100]
    one = model.forward(ids, model.new_cache(128), logits="all", chunk=512)
    many = model.forward(ids, model.new_cache(128), logits="all", chunk=7)
    np.testing.assert_allclose(many, one, atol=2e-3, rtol=0)


@pytest.mark.parametrize("chunk", [1, 2, 7])
def test_f16_cache_logits_do_not_depend_on_chunking(model_path, parity_ref, chunk):
    """Decode-sized steps (1-2 tokens: attention keeps few rows as rows, keys in lanes) give the same logits, bit for
    bit, as one prefill chunk (rows in lanes)."""
    model = Model(model_path)
    ids = parity_ref["ids"][0][:70]
    one = model.forward(ids, model.new_cache(128), logits="all", chunk=512)
    np.testing.assert_array_equal(model.forward(ids, model.new_cache(128), logits="all", chunk=chunk), one)


@pytest.mark.parametrize("kv_dtype", ["q8_0", "q4_0"])
@pytest.mark.parametrize("chunk", [1, 7])
def test_quantized_cache_logits_do_not_depend_on_chunking(model_path, parity_ref, chunk, kv_dtype):
    """After a sealed (quantized) block, tokens fed one by one or in chunks get the logits of one chunk, bit for bit:
    every score and output value is one chain of operations whatever the unit's row count."""
    model = Model(model_path)
    ids = parity_ref["ids"][0][:84]

    def rest(c):
        cache = model.new_cache(128, kv_dtype)
        model.forward(ids[:64], cache, logits="last")   # fills and seals the first block
        return model.forward(ids[64:], cache, logits="all", chunk=c)
    np.testing.assert_array_equal(rest(chunk), rest(512))


def test_info(llm):
    info = llm.info()
    assert info["arch"] == "llama" and info["n_layer"] == 30 and info["context_length"] == 8192
    assert info["quant_types"]["Q4_1"] == 210 and 130e6 < info["n_params"] < 140e6


def test_generate_alone_never_loads_jinja_or_openssl(model_path):
    # Peak RSS is a benchmark figure: Jinja (~5 MB) loads only when a chat template is needed, and greedy generation
    # never imports hashlib (OpenSSL, ~4 MB), which numpy.random's import brings in through `secrets`.
    import subprocess
    code = ("import sys, edgellm\n"
            f"llm = edgellm.LLM({str(model_path)!r}, n_threads=1)\n"
            "llm.generate('Hello', max_tokens=2)\n"
            "print('jinja2' in sys.modules or 'hashlib' in sys.modules)\n"
            "print(llm.chat([{'role': 'user', 'content': 'Hi'}], max_tokens=1) is not None, 'jinja2' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert out == ["False", "True", "True"]


def test_loader_drops_the_tokenizers_build_inputs(llm):
    """The vocabulary and merges (megabytes of str) are read once, to build the tokenizer, which keeps its own packed
    copy; the loaded LLM's metadata holds none of them."""
    assert not {"tokenizer.ggml.tokens", "tokenizer.ggml.merges"} & llm.model.gguf.metadata.keys()
    assert llm.tokenizer.token_text(llm.tokenizer.eos_id) == "<|im_end|>"
    assert llm.detokenize(llm.tokenize("unbelievably tokenized")) == "unbelievably tokenized"


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc_trim")
def test_trim_heap_returns_free_pages_below_a_live_block():
    """Freed heap memory under a block still in use stays in RSS until trim_heap hands its pages back."""
    from edgellm.runtime.memory import trim_heap
    blocks = [bytearray(2048) for _ in range(15_000)]   # ~30 MB from the C heap (too big for python's small-object pool)
    top = blocks.pop()   # the newest block stays: the heap cannot shrink from its end
    del blocks
    before = psutil.Process().memory_info().rss
    assert trim_heap()
    assert before - psutil.Process().memory_info().rss > 10e6
    del top


@pytest.fixture(scope="module")
def run_pair(model_path):
    """Two q8_0 LLMs on one model file: runs of tokens in native calls (the default) and one token per call."""
    fast = edgellm.LLM(str(model_path), n_threads=2, kv=edgellm.KVConfig(kv_dtype="q8_0"), n_ctx=512)
    slow = edgellm.LLM(str(model_path), n_threads=2, kv=edgellm.KVConfig(kv_dtype="q8_0"), n_ctx=512)
    slow.run_tokens = 0
    yield fast, slow
    fast.close(), slow.close()


def _same_state(a, b):
    assert a._tokens == b._tokens and len(a._cache) == len(b._cache) == len(a._tokens)
    for x, y in zip(a._cache.dequantized(29), b._cache.dequantized(29)):
        np.testing.assert_array_equal(x, y)


@pytest.mark.parametrize("kv_dtype", ["q8_0", "q4_0"])
@pytest.mark.parametrize("prompt", [PROMPT, PROMPT + " red, green and blue." * 12], ids=["short", "past-a-block"])
def test_reused_prompt_gives_a_fresh_prompts_text(model_path, kv_dtype, prompt):
    """Generating again from a prompt the cache holds, after the first answer sealed the prompt's block into 8 bits,
    gives the text a fresh LLM gives: the reused prefix keeps whole quantized blocks only and feeds the rest again,
    so the prompt's last rows are the f16 rows a fresh prefill writes, not rows rounded through 8 bits."""
    def make():
        return edgellm.LLM(str(model_path), n_threads=2, kv=edgellm.KVConfig(kv_dtype=kv_dtype), n_ctx=512)
    with make() as llm:
        first = llm.generate(prompt, max_tokens=100, ignore_eos=True)
        again = llm.generate(prompt, max_tokens=100, ignore_eos=True)
        reused = llm.stats()["prefill_tokens"]
    with make() as fresh:
        assert fresh.generate(prompt, max_tokens=100, ignore_eos=True) == first == again
    n = len(fresh.tokenize(prompt))
    assert reused == (n if n < 64 else n - 64)   # whole blocks of 64 reused, the partly sealed one fed again


@pytest.mark.parametrize("sampling", [{}, {**CHAT_SAMPLING, "seed": 5}], ids=["greedy", "sampled"])
def test_runs_equal_token_by_token(run_pair, sampling):
    """Runs (el_decode_run) give token-by-token decoding's text and cache, greedy or sampled with a seed (one draw
    stream either way): across block boundaries (runs stop short of a tail's end, whose token then goes alone and
    seals it), at a stop string inside a run (the run's extra tokens leave the cache), when the consumer stops
    reading a stream, at EOS, and on the next turn."""
    fast, slow = run_pair
    runs, count = [], fast.model.decode_run

    def counting(*a, **k):
        runs.append(count(*a, **k))
        return runs[-1]
    fast.model.decode_run = counting
    try:
        for llm in run_pair:
            llm.reset()
        long = [m.generate(PROMPT, max_tokens=150, ignore_eos=True, **sampling) for m in run_pair]
        assert long[0] == long[1] and len(runs) > 5 and all(0 < len(r) <= 16 for r in runs if r)
        _same_state(fast, slow)
        stop = long[1].split()[len(long[1].split()) // 2]   # a word far into a run
        cut = [m.generate(PROMPT, max_tokens=150, stop=stop, ignore_eos=True, **sampling) for m in run_pair]
        assert cut[0] == cut[1] and len(cut[0]) < len(long[0])
        _same_state(fast, slow)
        turn = fast._tokens + [28]   # the next turn reuses the cache's prefix
        follow = [m.generate(turn, max_tokens=40, ignore_eos=True, **sampling) for m in run_pair]
        assert follow[0] == follow[1]
        _same_state(fast, slow)
        for llm in run_pair:   # the reader leaves after three pieces
            pieces = llm.generate(PROMPT, max_tokens=100, ignore_eos=True, stream=True, **sampling)
            [next(pieces) for _ in range(3)]
            pieces.close()
        _same_state(fast, slow)
        chat = [m.chat([{"role": "user", "content": "hi"}], max_tokens=100, **sampling) for m in run_pair]
        assert chat[0] == chat[1] and fast.stats()["decode_tokens"] == slow.stats()["decode_tokens"] < 100
        _same_state(fast, slow)
    finally:
        del fast.model.decode_run




def test_next_product_fetch_is_a_knob_only(llm):
    """el_next_bytes moves what an idle worker fetches between decode products (2 threads here), not the tokens."""
    from edgellm import native as N
    default = N.next_bytes()
    texts = []
    for n in (0, 1 << 20, default):
        assert N.next_bytes(n) == n
        llm.reset()
        texts.append(llm.generate(PROMPT, max_tokens=24, ignore_eos=True))
    assert texts[0] == texts[1] == texts[2] and N.next_bytes() == default > 0
