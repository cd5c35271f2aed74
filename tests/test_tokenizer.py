import pytest

from edgellm.runtime.tokenizer import Tokenizer

ROUND_TRIP_TEXTS = {
    "ascii": "The quick brown fox jumps over the lazy dog.",
    "unicode": "Café naïve — Ünïcødé; Привет мир; مرحبا; 你好，世界；こんにちは",
    "emoji": "Rockets 🚀🚀 and families 👨‍👩‍👧 and flags 🇫🇷!",
    "code": 'def f(x):\n\tif x > 0:\n\t\treturn {"k": [x, x**2]}  # ok\n    return None\r\n',
    "whitespace": "  leading\n\n\n  and   runs\t\t of \u00a0 spaces   ",
    "digits": "0 1 12 123 1234 12345 3.14159 -42 1e-9 2024-12-11",
    "empty": "",
}


def test_ids_match_hf_reference(tok, parity_ref):
    for text, ids in zip(parity_ref["text"], parity_ref["ids"]):
        assert tok.encode(str(text)) == ids.tolist()


def test_reference_windows_decode_to_their_text(tok, parity_ref):
    for text, ids in zip(parity_ref["text"], parity_ref["ids"]):
        assert tok.decode(ids) == str(text)


def test_from_gguf_matches_from_metadata(model_path, tok):
    assert Tokenizer.from_gguf(model_path).encode("hello <|im_end|>") == tok.encode("hello <|im_end|>")


@pytest.mark.parametrize("name", ROUND_TRIP_TEXTS)
def test_round_trip(tok, name):
    text = ROUND_TRIP_TEXTS[name]
    assert tok.decode(tok.encode(text)) == text


def test_digits_are_split_individually(tok):
    assert [tok.token_text(i) for i in tok.encode("12345")] == list("12345")


def test_metadata_special_ids(tok):
    assert tok.vocab_size == 49152
    assert (tok.bos_id, tok.eos_id) == (1, 2)
    assert tok.token_text(tok.bos_id) == "<|im_start|>"
    assert tok.token_text(tok.eos_id) == "<|im_end|>"
    assert tok.add_bos is False and tok.add_eos is False


def test_stop_ids_include_end_of_turn(tok):
    assert {2, 0} <= tok.stop_ids  # <|im_end|> (eos) and <|endoftext|>
    assert 1 not in tok.stop_ids


def test_bos_only_when_asked(tok):
    assert tok.encode("hi")[0] != tok.bos_id
    assert tok.encode("hi", add_bos=True) == [tok.bos_id, *tok.encode("hi")]


def test_special_tokens_parsed_as_single_ids(tok):
    ids = tok.encode("<|im_start|>user\nhi<|im_end|>\n")
    assert ids[0] == 1 and ids[-2] == 2
    assert tok.decode(ids) == "<|im_start|>user\nhi<|im_end|>\n"
    assert tok.decode(ids, skip_special=True) == "user\nhi\n"


def test_special_text_kept_literal_without_parse_special(tok):
    text = "<|im_start|>user<|im_end|>"
    ids = tok.encode(text, parse_special=False)
    assert not set(ids) & {1, 2}
    assert tok.decode(ids) == text
    assert tok.encode(text) == [1, *tok.encode("user"), 2]  # the literal copy leaves the main one alone


def test_token_text_rejects_out_of_range(tok):
    with pytest.raises(IndexError, match="out of range"):
        tok.token_text(tok.vocab_size)


@pytest.mark.parametrize("name", ["unicode", "emoji", "code"])
def test_stream_decoder_matches_decode(tok, name):
    text = ROUND_TRIP_TEXTS[name]
    ids = tok.encode(text)
    stream = tok.stream_decoder()
    pieces = [stream.push(i) for i in ids] + [stream.flush()]
    assert "".join(pieces) == tok.decode(ids) == text
    assert not any("\ufffd" in p for p in pieces)


def test_stream_decoder_holds_back_split_characters(tok):
    ids = tok.encode("🚀")
    assert len(ids) > 1  # the emoji's four bytes span several tokens
    stream = tok.stream_decoder()
    assert [stream.push(i) for i in ids[:-1]] == [""] * (len(ids) - 1)
    assert stream.push(ids[-1]) == "🚀"


def test_stream_flush_emits_incomplete_bytes_as_replacement(tok):
    stream = tok.stream_decoder()
    assert stream.push(tok.encode("🚀")[0]) == ""
    assert stream.flush() == "\ufffd"


def test_stream_decoder_skips_special(tok):
    stream = tok.stream_decoder(skip_special=True)
    assert "".join(stream.push(i) for i in tok.encode("<|im_start|>hi<|im_end|>")) == "hi"


def test_unsupported_models_are_rejected():
    with pytest.raises(ValueError, match="no tokenizer.ggml.tokens"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "gpt2"})
    with pytest.raises(ValueError, match="tokenizer.ggml.model"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "bert", "tokenizer.ggml.tokens": ["a"]})
    with pytest.raises(ValueError, match="tokenizer.ggml.pre"):
        Tokenizer.from_metadata({"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": "mystery",
                                 "tokenizer.ggml.tokens": ["a"], "tokenizer.ggml.merges": []})


# -- SentencePiece-style ('llama') vocabularies, as Gemma 3 ships: a tiny synthetic one ------------

SPM_PIECES = {  # piece -> score; SentencePiece ranks merges by the merged piece's score
    "▁": -1.0, "h": -2.0, "e": -2.0, "l": -2.0, "o": -2.0, "w": -2.0, "r": -2.0, "d": -2.0,
    "he": -3.0, "ll": -4.0, "llo": -5.0, "hello": -6.0, "▁w": -7.0, "or": -8.0, "▁wor": -9.0,
    "▁world": -10.0, "▁h": -11.0, "▁hello": -12.0, "ld": -13.0,
}


def spm_metadata(**overrides):
    controls = ["<pad>", "<eos>", "<bos>", "<unk>", "<start_of_turn>", "<end_of_turn>"]
    bytes_ = [f"<0x{b:02X}>" for b in range(256)]
    tokens = controls + bytes_ + list(SPM_PIECES)
    md = {
        "tokenizer.ggml.model": "llama",
        "tokenizer.ggml.tokens": tokens,
        "tokenizer.ggml.scores": [0.0] * (len(controls) + 256) + list(SPM_PIECES.values()),
        "tokenizer.ggml.token_type": [3, 3, 3, 2, 3, 3] + [6] * 256 + [1] * len(SPM_PIECES),
        "tokenizer.ggml.bos_token_id": 2, "tokenizer.ggml.eos_token_id": 1,
        "tokenizer.ggml.unknown_token_id": 3, "tokenizer.ggml.padding_token_id": 0,
        "tokenizer.ggml.add_bos_token": True, "tokenizer.ggml.add_space_prefix": False,
    }
    md.update(overrides)
    return md


@pytest.fixture(scope="module")
def spm():
    return Tokenizer.from_metadata(spm_metadata())


def pieces(tok, ids):
    return [tok.token_text(i) for i in ids]


def test_spm_merges_by_score(spm):
    assert pieces(spm, spm.encode("hello world", add_bos=False)) == ["hello", "▁world"]
    assert spm.encode("hello")[0] == spm.bos_id == 2  # add_bos_token from the metadata


def test_spm_byte_fallback_for_unknown_characters(spm):
    assert pieces(spm, spm.encode("hé", add_bos=False)) == ["h", "<0xC3>", "<0xA9>"]


@pytest.mark.parametrize("text", ["hello world", "Hello, World!\n\tx = 42", "héllo wörld 你好 🚀", ""])
def test_spm_round_trip(spm, text):
    ids = spm.encode(text)
    assert spm.decode(ids, skip_special=True) == text
    stream = spm.stream_decoder(skip_special=True)
    assert "".join(stream.push(i) for i in ids) + stream.flush() == text


def test_spm_literal_control_text_is_not_merged_into_the_control_token():
    md = spm_metadata()
    md["tokenizer.ggml.tokens"] = [*md["tokenizer.ggml.tokens"], "<e", "os>"]
    md["tokenizer.ggml.scores"] = [*md["tokenizer.ggml.scores"], -1.0, -1.0]
    md["tokenizer.ggml.token_type"] = [*md["tokenizer.ggml.token_type"], 1, 1]
    tok = Tokenizer.from_metadata(md)
    assert 1 not in tok.encode("<eos>", add_bos=False, parse_special=False)


def test_spm_control_tokens_and_stop_ids(spm):
    ids = spm.encode("<start_of_turn>hello<end_of_turn>", add_bos=False)
    assert pieces(spm, ids) == ["<start_of_turn>", "hello", "<end_of_turn>"]
    assert spm.stop_ids == {1, 5}  # <eos> and <end_of_turn>


def test_spm_space_prefix():
    tok = Tokenizer.from_metadata(spm_metadata(**{"tokenizer.ggml.add_space_prefix": True}))
    ids = tok.encode("hello world", add_bos=False)
    assert pieces(tok, ids) == ["▁hello", "▁world"]
    assert tok.decode(ids) == "hello world"


def test_spm_explicit_merges_are_used():
    md = spm_metadata(**{"tokenizer.ggml.merges": ["h e", "l l"]})
    tok = Tokenizer.from_metadata(md)
    assert pieces(tok, tok.encode("hello", add_bos=False)) == ["he", "ll", "o"]
