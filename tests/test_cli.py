import io
import json
import subprocess
import sys

import pytest

from edgellm.cli import common
from edgellm.cli.main import build_parser, main


def test_model_is_optional_before_the_prompt():
    args = build_parser().parse_args(["run", "hello there"])
    assert (args.model, args.prompt) == (None, "hello there")
    args = build_parser().parse_args(["run", "m.gguf", "hello", "--max-tokens", "3"])
    assert (args.model, args.prompt, args.max_tokens) == ("m.gguf", "hello", 3)


def test_info_default_model(model_path, capsys):
    assert main(["info", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["arch"] == "llama" and info["context_length"] > 0
    est = info["memory_estimate"]
    assert est["q4_0"]["kv_bytes"] < est["q8_0"]["kv_bytes"] < est["f16"]["kv_bytes"]
    assert est["f16"]["total_bytes"] == info["weights_bytes"] + est["f16"]["kv_bytes"]

    assert main(["info"]) == 0
    table = capsys.readouterr().out
    assert "quant types" in table and "q8_0" in table


def test_run_streams_a_greedy_completion(model_path, capsys):
    assert main(["run", str(model_path), "The capital of France is", "--max-tokens", "8"]) == 0
    out, err = capsys.readouterr()
    assert out.strip()
    assert "tokens," in err and "tok/s" in err


class SpyLLM:
    """Wraps the real model and records the message lists the REPL sends."""

    def __init__(self, llm):
        self._llm, self.sent = llm, []

    def chat(self, messages, **kwargs):
        self.sent.append([dict(m) for m in messages])
        return self._llm.chat(messages, **kwargs)

    def __getattr__(self, name):
        return getattr(self._llm, name)


def test_chat_with_piped_stdin(model_path, monkeypatch, capsys):
    spies, real_load = [], common.load_llm

    def load_spy(*args, **kwargs):
        spies.append(SpyLLM(real_load(*args, **kwargs)))
        return spies[-1]

    monkeypatch.setattr(common, "load_llm", load_spy)
    monkeypatch.setattr(sys, "stdin", io.StringIO("hi\n/reset\nhello\n/exit\nnot read\n"))

    assert main(["chat", str(model_path), "--system", "Be brief.", "--max-tokens", "6"]) == 0
    out, err = capsys.readouterr()
    first, second = spies[0].sent
    assert [m["role"] for m in first] == ["system", "user"]
    assert second == [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hello"}]
    assert err.count("tok/s]") == 2 and "conversation cleared" in err
    assert len(out.strip().splitlines()) >= 2 and "not read" not in out


def test_bench_tiny(model_path, capsys):
    assert main(["bench", str(model_path), "--prompt-tokens", "32", "--gen-tokens", "4", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["prompt_tokens"] == 32
    assert result["prefill_tok_s"] > 0 and result["decode_tok_s"] > 0
    assert result["peak_rss_mb"] > 0 and result["kv_bytes_per_token"] > 0


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
