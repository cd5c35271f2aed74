"""Pieces shared by the subcommands: model/sampling flags, loading a model, the stats line."""
from __future__ import annotations

import argparse
import sys

import edgellm
from edgellm.kv.config import KV_DTYPES
from edgellm.runtime.sampling import SamplingParams
from edgellm.runtime.registry import DEFAULT_MODEL, resolve


def add_model_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", nargs="?", default=None, metavar="MODEL",
                        help="registry name or path to a .gguf file (default: the registry default)")


def add_load_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--threads", type=int, default=None, metavar="N",
                        help="worker threads (default: the runtime's choice)")
    parser.add_argument("--kv-dtype", choices=KV_DTYPES, default="f16", help="KV cache element type")


GREEDY = {f: getattr(SamplingParams, f) for f in ("temperature", "top_k", "top_p", "min_p", "repeat_penalty")}
# an interactive chat samples as llama.cpp's and Ollama's do by default (their temperature, top-k, top-p and min-p,
# Ollama's repeat penalty): greedy replies of a small model loop on a phrase
CHAT_SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05, "repeat_penalty": 1.1}


def add_sampling_flags(parser: argparse.ArgumentParser, defaults: dict = GREEDY) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument("--max-tokens", type=int, default=128, metavar="N", help="default: %(default)s")
    group.add_argument("--temperature", type=float, default=defaults["temperature"], metavar="T",
                       help="0 = greedy (default: %(default)s)")
    group.add_argument("--top-k", type=int, default=defaults["top_k"], metavar="K", help="0 = off (default: %(default)s)")
    group.add_argument("--top-p", type=float, default=defaults["top_p"], metavar="P", help="default: %(default)s")
    group.add_argument("--min-p", type=float, default=defaults["min_p"], metavar="P", help="default: %(default)s")
    group.add_argument("--repeat-penalty", type=float, default=defaults["repeat_penalty"], metavar="R",
                       help=f"over the last {SamplingParams.repeat_last_n} tokens (default: %(default)s)")
    group.add_argument("--seed", type=int, default=None)


def sampling_kwargs(args: argparse.Namespace) -> dict:
    return {"max_tokens": args.max_tokens, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "min_p": args.min_p, "repeat_penalty": args.repeat_penalty,
            "seed": args.seed}


def load_llm(model: str | None, threads: int | None = None, kv_dtype: str = "f16",
             n_ctx: int | None = None):
    """Open `model` (a registry name, pulled on first use, or a path) as an edgellm.LLM."""
    # resolve() first: its errors name the registry models, clearer than a loader's failure
    path = resolve(model or DEFAULT_MODEL)
    return edgellm.LLM(model=str(path), n_threads=threads, kv=edgellm.KVConfig(kv_dtype=kv_dtype),
                       n_ctx=n_ctx)


def stream_to(pieces, out, shown: list[str]) -> None:
    """Write streamed text pieces to `out` as they come, keeping them in `shown`
    (filled in place so a caller interrupted half-way still has what was printed)."""
    for piece in pieces:
        out.write(piece)
        out.flush()
        shown.append(piece)


def print_note(text: str, err=None) -> None:
    """A dimmed `[...]` status line on stderr, e.g. `[N tokens, X tok/s]` after a reply."""
    err = err or sys.stderr
    line = f"[{text}]"
    if err.isatty():
        line = f"\x1b[2m{line}\x1b[0m"
    err.write(line + "\n")
    err.flush()


def speed_note(stats: dict) -> str:
    return f"{stats['decode_tokens']} tokens, {stats['decode_tok_s']:.1f} tok/s"
