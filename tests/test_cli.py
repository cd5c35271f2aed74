import io
import json
import subprocess
import sys

import pytest

from edgellm import native as N
from edgellm.cli import common
from edgellm.cli.main import build_parser, cmd_run, main, parse_args


def test_model_is_optional_before_the_prompt():
    args = build_parser().parse_args(["run", "hello there"])
    assert (args.model, args.prompt) == (None, "hello there")
    args = build_parser().parse_args(["run", "m.gguf", "hello", "--max-tokens", "3"])
    assert (args.model, args.prompt, args.max_tokens) == ("m.gguf", "hello", 3)
    for argv in (["run", "m.gguf", "--max-tokens", "3", "hello"], ["run", "--max-tokens", "3", "m.gguf", "hello"]):
        args = parse_args(argv)
        assert (args.model, args.prompt, args.max_tokens, args.func) == ("m.gguf", "hello", 3, cmd_run)
    assert (parse_args(["run", "--chat", "hi"]).model, parse_args(["run", "--chat", "hi"]).prompt) == (None, "hi")


def test_chat_samples_by_default_and_run_is_greedy():
    """chat's defaults are llama.cpp's / Ollama's sampling; run completes greedily; flags override both."""
    keys = ("temperature", "top_k", "top_p", "min_p", "repeat_penalty")
    sampling = common.sampling_kwargs(build_parser().parse_args(["chat"]))
    assert {k: sampling[k] for k in keys} == {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05,
                                              "repeat_penalty": 1.1}
    greedy = common.sampling_kwargs(parse_args(["run", "hi"]))
    assert {k: greedy[k] for k in keys} == {"temperature": 0.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0,
                                            "repeat_penalty": 1.0}
    assert common.sampling_kwargs(build_parser().parse_args(["chat", "--temperature", "0"]))["temperature"] == 0.0


def test_bench_passkey_takes_kv_fields():
    args = build_parser().parse_args(["bench-passkey", "--kv", "alpha=0.25", "--kv", "pool=1", "--kv", "query_aware=true"])
    assert dict(args.kv) == {"alpha": 0.25, "pool": 1, "query_aware": True}
    with pytest.raises(SystemExit):
        build_parser().parse_args(["bench-passkey", "--kv", "nonsense=3"])


def test_passkey_seed_draws_other_keys():
    from edgellm.cli.passkey import passkey_keys
    assert parse_args(["bench", "passkey", "--seed", "2"]).seed == 2
    assert build_parser().parse_args(["bench-passkey"]).seed == 0
    assert passkey_keys(0, 9) == passkey_keys(0, 9) != passkey_keys(1, 9)
    assert all(10000 <= k < 100000 for k in passkey_keys(1, 9))


class SharedLLM:
    """One loaded model lent to every in-process command (loading takes seconds): `close` is a
    no-op, and the message lists sent to `chat` are recorded."""

    def __init__(self, llm):
        self._llm, self.sent = llm, []

    def chat(self, messages, **kwargs):
        self.sent.append([dict(m) for m in messages])
        return self._llm.chat(messages, **kwargs)

    def close(self):
        pass

    def __getattr__(self, name):
        return getattr(self._llm, name)


@pytest.fixture(scope="module")
def loaded(model_path):
    import edgellm
    with edgellm.LLM(model=str(model_path)) as llm:
        yield llm


@pytest.fixture
def shared(loaded, monkeypatch):
    """Commands get the shared model; returns it, with the load_llm arguments in `.loads`."""
    llm = SharedLLM(loaded)
    llm.loads = []

    def load_llm(model, threads=None, kv_dtype="f16", n_ctx=None):
        llm.loads.append({"model": model, "threads": threads, "kv_dtype": kv_dtype, "n_ctx": n_ctx})
        loaded.reset()
        return llm

    monkeypatch.setattr(common, "load_llm", load_llm)
    return llm


def test_info_default_model(model_path, capsys):
    assert main(["info", "--json"]) == 0  # the real loader: resolves the default model's name
    info = json.loads(capsys.readouterr().out)
    assert info["path"] == str(model_path)
    assert info["arch"] == "llama" and info["context_length"] > 0
    est = info["memory_estimate"]
    assert est["q4_0"]["kv_bytes"] < est["q8_0"]["kv_bytes"] < est["f16"]["kv_bytes"]
    assert est["f16"]["total_bytes"] == info["weights_bytes"] + est["f16"]["kv_bytes"]


def test_info_table(shared, capsys):
    assert main(["info"]) == 0
    table = capsys.readouterr().out
    assert "quant types" in table and "q8_0" in table


def test_run_streams_a_greedy_completion(shared, capsys):
    assert main(["run", "m.gguf", "The capital of France is", "--max-tokens", "8", "--threads", "2"]) == 0
    out, err = capsys.readouterr()
    assert out.strip()
    assert "8 tokens," in err and "tok/s" in err
    assert shared.loads == [{"model": "m.gguf", "threads": 2, "kv_dtype": "f16", "n_ctx": None}]


def test_chat_with_piped_stdin(shared, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n/reset\nhello\n/exit\nnot read\n"))
    assert main(["chat", "--system", "Be brief.", "--max-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    first, second = shared.sent
    assert [m["role"] for m in first] == ["system", "user"]
    assert second == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    assert err.count("tok/s]") == 2 and "conversation cleared" in err
    assert len(out.strip().splitlines()) >= 2 and "not read" not in out


def test_bench_tiny(shared, capsys):
    assert main(["bench", "--prompt-tokens", "32", "--gen-tokens", "4", "--kv-dtype", "q8_0", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert (result["prompt_tokens"], result["gen_tokens"]) == (32, 4)
    assert result["prefill_tok_s"] > 0 and result["decode_tok_s"] > 0
    assert result["peak_rss_mb"] > 0 and result["kv_bytes_per_token"] > 0
    assert result["kernels"] == N.SIMD_NAMES[N.simd_level()]
    assert shared.loads[0]["n_ctx"] == 32 + 4 + 16 and shared.loads[0]["kv_dtype"] == "q8_0"


@pytest.mark.parametrize("content", [None, b"not a gguf file"], ids=["missing", "garbage"])
def test_bad_model_exits_2_with_one_line(tmp_path, content):
    path = tmp_path / "bad.gguf"
    if content is not None:
        path.write_bytes(content)
    proc = subprocess.run([sys.executable, "-m", "edgellm.cli.main", "info", str(path)],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("edgellm: error: ") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr
