"""Tokenizer built from a GGUF file's vocabulary.

Encoding runs through a HF `tokenizers.Tokenizer` assembled from the GGUF tokens/merges, so ids
match the reference HF tokenizer. Decoding maps every id to its raw bytes instead: one byte-exact
path serves both `decode` and `StreamDecoder`, so streamed text always equals decoded text.

Two GGUF tokenizer models are supported:
  * 'gpt2'  -- byte-level BPE (SmolLM2, GPT-2 family);
  * 'llama' -- SentencePiece-style BPE with '▁' for spaces and <0xXX> byte-fallback tokens (Gemma 3).
"""
from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
from tokenizers import AddedToken, normalizers, pre_tokenizers
from tokenizers import Tokenizer as HFTokenizer
from tokenizers.models import BPE

# tokenizer.ggml.token_type values
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Control tokens that end an assistant turn in common chat formats (as llama.cpp's end-of-generation set).
END_OF_TURN_TEXTS = frozenset({
    "<|im_end|>", "<end_of_turn>", "<|eot_id|>", "<|eom_id|>", "<|end|>", "<|endoftext|>",
})

SPM_SPACE = "\u2581"  # '▁'
_BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


@functools.cache
def _byte_level_alphabet() -> dict[int, str]:
    """GPT-2's reversible byte -> printable unicode char map (byte-level BPE vocab alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
                 *range(ord("®"), ord("ÿ") + 1)]
    mapping, shift = {}, 0
    for b in range(256):
        if b in printable:
            mapping[b] = chr(b)
        else:
            mapping[b] = chr(256 + shift)
            shift += 1
    return mapping


@functools.cache
def _byte_level_inverse() -> dict[str, int]:
    return {c: b for b, c in _byte_level_alphabet().items()}


def _byte_level_pre_tokenizer(pre: str):
    """The HF pre-tokenizer for a gpt2-type vocab, keyed by GGUF tokenizer.ggml.pre."""
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in ("default", "gpt2", "gpt-2"):
        return byte_level
    if pre in ("smollm", "starcoder", "refact"):
        # StarCoder-family vocabularies split every digit on its own before the GPT-2 regex.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    raise ValueError(f"unsupported tokenizer.ggml.pre {pre!r} for a 'gpt2' tokenizer "
                     "(supported: default, gpt2, smollm, starcoder, refact)")


def _merges_from_scores(tokens: list[str], types: list[int], scores: list[float]) -> list[tuple[str, str]]:
    """SentencePiece BPE merges: every split of a normal vocab piece into two vocab pieces, ranked
    by the merged piece's score (higher merges first), as HF's SentencePieceExtractor derives them.
    Control, byte and unused pieces are never merge results, so plain text cannot spell them."""
    index = {tok: i for i, tok in enumerate(tokens)}
    ranked = []
    for i, tok in enumerate(tokens):
        if types[i] != NORMAL:
            continue
        for cut in range(1, len(tok)):
            left, right = tok[:cut], tok[cut:]
            if left in index and right in index:
                ranked.append((-scores[i], index[left], index[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _split_merges(merges: list[str]) -> list[tuple[str, str]]:
    pairs = []
    for merge in merges:
        left, sep, right = merge.partition(" ")
        if not sep:
            raise ValueError(f"malformed merge {merge!r}: expected 'left right'")
        pairs.append((left, right))
    return pairs


def read_tokenizer_metadata(path) -> dict:
    """The GGUF's tokenizer.* metadata (tokens, merges, special ids, chat template) as python values."""
    from ..formats.gguf import GGUFFile
    return {k: v for k, v in GGUFFile(Path(path)).metadata.items() if k.startswith("tokenizer.")}


class _Packed:
    """A sequence of byte strings in one buffer: item i is blob[off[i]:off[i + 1]]."""

    def __init__(self, items):
        items = list(items)
        self._blob = b"".join(items)
        self._off = np.zeros(len(items) + 1, np.int64)
        np.cumsum([len(x) for x in items], out=self._off[1:])

    def __getitem__(self, i: int) -> bytes:
        return self._blob[self._off[i]:self._off[i + 1]]


class Tokenizer:
    # the metadata a Tokenizer reads only while it is built (it keeps its own compact copy): a loader may drop them
    BUILD_KEYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges", "tokenizer.ggml.scores")
    vocab_size: int
    bos_id: int | None
    eos_id: int | None
    add_bos: bool
    add_eos: bool
    stop_ids: frozenset[int]

    def __init__(self, md: dict):
        self.model = md.get("tokenizer.ggml.model")
        if self.model not in ("gpt2", "llama"):
            raise ValueError(f"unsupported tokenizer.ggml.model {self.model!r} (supported: gpt2, llama)")
        if "tokenizer.ggml.tokens" not in md:
            raise ValueError("GGUF metadata has no tokenizer.ggml.tokens")
        tokens: list[str] = list(md["tokenizer.ggml.tokens"])
        types: list[int] = list(md.get("tokenizer.ggml.token_type") or [NORMAL] * len(tokens))
        if len(types) != len(tokens):
            raise ValueError(f"{len(types)} token types for {len(tokens)} tokens")
        self.vocab_size = len(tokens)
        self.bos_id = md.get("tokenizer.ggml.bos_token_id")
        self.eos_id = md.get("tokenizer.ggml.eos_token_id")
        self.unk_id = md.get("tokenizer.ggml.unknown_token_id")
        # llama.cpp defaults: SentencePiece vocabularies add BOS, byte-level BPE ones do not.
        self.add_bos = bool(md.get("tokenizer.ggml.add_bos_token", self.model == "llama"))
        self.add_eos = bool(md.get("tokenizer.ggml.add_eos_token", False))
        # Only SentencePiece vocabularies mark word starts with '▁'; byte-level BPE ignores the flag.
        self.add_space_prefix = self.model == "llama" and bool(md.get("tokenizer.ggml.add_space_prefix", True))
        self._special = frozenset(i for i, t in enumerate(types) if t in (CONTROL, UNKNOWN))
        self.stop_ids = self._find_stop_ids(md, tokens)
        self._hf = self._build_hf(md, tokens, types)
        # one buffer each instead of 2 x vocab_size python objects (~5 MB of RSS for a 49K vocabulary)
        self._text = _Packed(t.encode("utf-8") for t in tokens)
        self._bytes = _Packed(self._piece_bytes(t, k) for t, k in zip(tokens, types))

    @classmethod
    def from_metadata(cls, md: dict) -> "Tokenizer":
        return cls(md)

    @classmethod
    def from_gguf(cls, path) -> "Tokenizer":
        return cls(read_tokenizer_metadata(path))

    # -- construction -------------------------------------------------------------------------

    def _find_stop_ids(self, md: dict, tokens: list[str]) -> frozenset[int]:
        ids = {md.get(k) for k in ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id",
                                   "tokenizer.ggml.eom_token_id")}
        ids.update(i for i in self._special if tokens[i] in END_OF_TURN_TEXTS)
        return frozenset(i for i in ids if i is not None)

    def _build_hf(self, md: dict, tokens: list[str], types: list[int]) -> HFTokenizer:
        vocab = {tok: i for i, tok in enumerate(tokens)}
        if self.model == "gpt2":
            if "tokenizer.ggml.merges" not in md:
                raise ValueError("a 'gpt2' tokenizer needs tokenizer.ggml.merges")
            merges = _split_merges(md["tokenizer.ggml.merges"])
            hf = HFTokenizer(BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
            hf.pre_tokenizer = _byte_level_pre_tokenizer(md.get("tokenizer.ggml.pre", "default"))
        else:
            if "tokenizer.ggml.merges" in md:
                merges = _split_merges(md["tokenizer.ggml.merges"])
            elif "tokenizer.ggml.scores" in md:
                merges = _merges_from_scores(tokens, types, list(md["tokenizer.ggml.scores"]))
            else:
                raise ValueError("a 'llama' tokenizer needs tokenizer.ggml.merges or tokenizer.ggml.scores")
            unk = tokens[self.unk_id] if self.unk_id is not None else None
            hf = HFTokenizer(BPE(vocab, merges, unk_token=unk, fuse_unk=True, byte_fallback=True))
            steps = [normalizers.Replace(" ", SPM_SPACE)]
            if self.add_space_prefix:
                # Applied per text segment between special tokens, matching llama.cpp's SPM path.
                steps.insert(0, normalizers.Prepend(SPM_SPACE))
            hf.normalizer = normalizers.Sequence(steps)
        hf.add_tokens([AddedToken(tokens[i], special=False, normalized=False)
                       for i, t in enumerate(types) if t == USER_DEFINED])
        hf.add_special_tokens([AddedToken(tokens[i], special=True, normalized=False)
                               for i in sorted(self._special)])
        return hf

    @functools.cached_property
    def _hf_literal(self) -> HFTokenizer:
        """A copy that encodes control-token text as plain text (parse_special=False); kept separate
        rather than toggling the shared tokenizer so concurrent encodes cannot interfere."""
        hf = HFTokenizer.from_str(self._hf.to_str())
        hf.encode_special_tokens = True
        return hf

    def _piece_bytes(self, tok: str, kind: int) -> bytes:
        if kind in (CONTROL, UNKNOWN, USER_DEFINED, UNUSED):
            return tok.encode("utf-8")
        if self.model == "gpt2":
            inverse = _byte_level_inverse()
            if all(c in inverse for c in tok):
                return bytes(inverse[c] for c in tok)
            return tok.encode("utf-8")  # a piece outside the byte alphabet stands for itself
        if kind == BYTE and (m := _BYTE_TOKEN.fullmatch(tok)):
            return bytes([int(m.group(1), 16)])
        return tok.replace(SPM_SPACE, " ").encode("utf-8")

    # -- public API ---------------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids for `text`. add_bos=None follows the metadata's add_bos_token; EOS is appended
        only when the metadata sets add_eos_token and add_bos is not False (llama.cpp's add_special).
        parse_special=False encodes control-token text such as '<|im_start|>' as ordinary text."""
        hf = self._hf if parse_special else self._hf_literal
        ids = hf.encode(text, add_special_tokens=False).ids
        if (self.add_bos if add_bos is None else add_bos):
            ids.insert(0, self._require(self.bos_id, "BOS"))
        if self.add_eos and add_bos is not False:
            ids.append(self._require(self.eos_id, "EOS"))
        return ids

    def decode(self, ids, skip_special: bool = False) -> str:
        stream = self.stream_decoder(skip_special)
        return "".join(stream.push(i) for i in ids) + stream.flush()

    def token_text(self, id) -> str:
        return self._text[self._check_id(id)].decode("utf-8")

    def stream_decoder(self, skip_special: bool = False) -> "StreamDecoder":
        return StreamDecoder(self, skip_special)

    def token_bytes(self, id) -> bytes:
        """The raw bytes token `id` contributes to decoded text."""
        return self._bytes[self._check_id(id)]

    def is_special(self, id) -> bool:
        return self._check_id(id) in self._special

    def _check_id(self, id) -> int:
        i = int(id)
        if not 0 <= i < self.vocab_size:
            raise IndexError(f"token id {i} out of range for a vocabulary of {self.vocab_size}")
        return i

    @staticmethod
    def _require(id: int | None, name: str) -> int:
        if id is None:
            raise ValueError(f"the tokenizer metadata defines no {name} token")
        return id


class StreamDecoder:
    """Incremental decoding: push ids one at a time and get back only complete UTF-8 text.

    Bytes of a character split across tokens are held until the character is complete; bytes that
    can never complete are emitted as U+FFFD, exactly as `Tokenizer.decode` would.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special: bool = False):
        self._tok = tokenizer
        self._skip_special = skip_special
        self._pending = b""
        # SentencePiece vocabularies with a space prefix drop the first leading space they decode.
        self._strip_space = tokenizer.add_space_prefix

    def push(self, id: int) -> str:
        if self._skip_special and self._tok.is_special(id):
            return ""
        data = self._tok.token_bytes(id)
        if self._strip_space and data:
            self._strip_space = False
            data = data.removeprefix(b" ")
        self._pending += data
        cut = _complete_prefix_len(self._pending)
        text, self._pending = self._pending[:cut], self._pending[cut:]
        return text.decode("utf-8", errors="replace")

    def flush(self) -> str:
        text, self._pending = self._pending, b""
        return text.decode("utf-8", errors="replace")


def _complete_prefix_len(data: bytes) -> int:
    """Length of `data` minus a trailing incomplete (but so far valid) UTF-8 sequence."""
    for back in range(1, min(4, len(data)) + 1):
        b = data[-back]
        if b & 0xC0 != 0x80:  # not a continuation byte: the start of the last sequence
            need = 2 if b & 0xE0 == 0xC0 else 3 if b & 0xF0 == 0xE0 else 4 if b & 0xF8 == 0xF0 else 1
            return len(data) - back if need > back else len(data)
    return len(data)
