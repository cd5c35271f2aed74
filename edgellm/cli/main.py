"""The `edgellm` command: pull, run, chat, info, bench."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
from dataclasses import fields

from edgellm.cli import common
from edgellm.kv.config import POLICIES, KVConfig
from edgellm.cli.bench import format_bench, run_bench
from edgellm.cli.chat import repl
from edgellm.cli.info import format_info, memory_estimate
from edgellm.runtime.registry import pull

# errors a user causes (bad name, missing or unreadable file, bad value): shown without their type
USER_ERRORS = (KeyError, FileNotFoundError, ValueError, OSError)


def cmd_pull(args) -> None:
    print(pull(args.name, force=args.force))


def cmd_run(args) -> None:
    sampling = common.sampling_kwargs(args)
    with contextlib.closing(common.load_llm(args.model, args.threads, args.kv_dtype)) as llm:
        if args.chat:
            pieces = llm.chat([{"role": "user", "content": args.prompt}], stream=True, **sampling)
        else:
            pieces = llm.generate(args.prompt, stream=True, **sampling)
        common.stream_to(pieces, sys.stdout, [])
        sys.stdout.write("\n")
        common.print_note(common.speed_note(llm.stats()))


def cmd_chat(args) -> None:
    with contextlib.closing(common.load_llm(args.model, args.threads, args.kv_dtype)) as llm:
        repl(llm, args.system, common.sampling_kwargs(args))


def cmd_info(args) -> None:
    # opened with an f16 KV cache: memory_estimate derives the other dtypes from its size
    with contextlib.closing(common.load_llm(args.model, kv_dtype="f16")) as llm:
        info = llm.info()
    estimate = memory_estimate(info)
    if args.json:
        print(json.dumps({**info, "memory_estimate": estimate}, indent=2, default=str))
    else:
        print(format_info(info, estimate))


def cmd_bench(args) -> None:
    result = run_bench(args.model, args.prompt_tokens, args.gen_tokens, args.threads,
                       args.kv_dtype, args.context, args.repeat)
    print(json.dumps(result, indent=2, default=str) if args.json else format_bench(result))


def cmd_bench_passkey(args) -> None:
    from edgellm.cli.passkey import HEADER, run_table
    from edgellm.runtime.registry import DEFAULT_MODEL
    options = dict(args.kv)
    extra = "".join(f", {k}={v}" for k, v in options.items())
    print(f"passkey retrieval, budget {args.budget} tokens, kv {args.kv_dtype}{extra}, depths {args.depths}, "
          f"seed {args.seed}")
    print(HEADER)
    print("|---|---|---|---|---|---|---|", flush=True)
    run_table(args.model or DEFAULT_MODEL, args.lengths, args.policies, args.depths, args.budget, args.kv_dtype,
              args.threads, args.text, seed=args.seed, progress=sys.stdout, kv_options=options)


def kv_option(text: str) -> tuple[str, object]:
    """FIELD=VALUE for a KVConfig field other than policy/budget/kv_dtype, VALUE read as that field's type."""
    name, _, value = text.partition("=")
    kinds = {f.name: f.default for f in fields(KVConfig) if f.name not in ("policy", "budget", "kv_dtype")}
    if not value or name not in kinds:
        raise argparse.ArgumentTypeError(f"{text!r}: give FIELD=VALUE with FIELD one of {', '.join(kinds)}")
    default = kinds[name]
    if isinstance(default, bool):
        return name, value.lower() in ("1", "true", "yes")
    return name, type(default)(value) if default is not None else value


def positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="edgellm", description="On-device LLM inference.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pull", help="download a registry model into the cache")
    p.add_argument("name")
    p.add_argument("--force", action="store_true", help="download again even if cached")
    p.set_defaults(func=cmd_pull)

    def generating(name: str, help_text: str, func, sampling: dict = common.GREEDY) -> argparse.ArgumentParser:
        """A command that loads a model and samples from it: the model argument, load and sampling flags."""
        p = sub.add_parser(name, help=help_text)
        common.add_model_arg(p)
        common.add_load_flags(p)
        common.add_sampling_flags(p, sampling)
        p.set_defaults(func=func)
        return p

    p = parser.run_parser = generating("run", "complete one prompt, streaming to stdout", cmd_run)
    p.add_argument("prompt")
    p.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")

    p = generating("chat", "interactive chat (reads lines from stdin); samples as llama.cpp and Ollama do, "
                   "--temperature 0 for greedy replies", cmd_chat, common.CHAT_SAMPLING)
    p.add_argument("--system", metavar="TEXT", help="system prompt, kept across /reset")

    p = sub.add_parser("info", help="model architecture, quantization and memory estimate")
    common.add_model_arg(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = sub.add_parser("bench", help="prefill / decode throughput, peak RSS, KV bytes per token")
    common.add_model_arg(p)
    p.add_argument("--prompt-tokens", type=positive_int, default=512, metavar="N")
    p.add_argument("--gen-tokens", type=positive_int, default=128, metavar="N")
    p.add_argument("--context", type=positive_int, default=None, metavar="N",
                   help="measure decode after N tokens of context (a prompt of N tokens)")
    p.add_argument("--repeat", type=positive_int, default=1, metavar="R", help="best of R runs")
    p.add_argument("--json", action="store_true")
    common.add_load_flags(p)
    p.set_defaults(func=cmd_bench)

    # `edgellm bench passkey ...` (main() routes it here: argparse cannot nest it under `bench [MODEL]`)
    p = sub.add_parser("bench-passkey", help="passkey retrieval through a KV budget (also: `bench passkey`)")
    p.add_argument("--model", default=None, help="registry name or .gguf path (default: the registry default)")
    p.add_argument("--text", default=None, metavar="FILE", help="haystack text (default: a repeated filler sentence)")
    p.add_argument("--lengths", type=positive_int, nargs="+", default=[2048, 8192, 16384, 32768, 65536], metavar="N")
    p.add_argument("--policies", nargs="+", default=["full", "window", "infinipot"], choices=POLICIES)
    p.add_argument("--depths", type=float, nargs="+", default=[0.1, 0.3, 0.5, 0.7, 0.9], metavar="D")
    p.add_argument("--budget", type=positive_int, default=1024, metavar="TOKENS")
    p.add_argument("--seed", type=int, default=0, help="draws the keys: another seed, another key at each depth")
    p.add_argument("--kv", type=kv_option, action="append", default=[], metavar="FIELD=VALUE",
                   help="another KVConfig field for the budget policies, e.g. --kv alpha=0.25 --kv pool=1")
    common.add_load_flags(p)
    p.set_defaults(func=cmd_bench_passkey)
    return parser


def one_line(exc: BaseException) -> str:
    """A single line for `exc`: its first line, plus its last when it carries more (e.g. pip's error)."""
    text = str(exc.args[0]) if isinstance(exc, KeyError) and exc.args else str(exc)
    lines = [line.strip() for line in text.splitlines() if line.strip()] or [type(exc).__name__]
    message = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
    return message if isinstance(exc, USER_ERRORS) else f"{type(exc).__name__}: {message}"


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = build_parser()
    if argv[:2] == ["bench", "passkey"]:
        argv = ["bench-passkey"] + argv[2:]
    if argv[:1] == ["run"]:
        # `run MODEL --max-tokens 8 "prompt"`: plain parse_args would hand MODEL to `prompt` and reject the prompt
        return parser.run_parser.parse_intermixed_args(argv[1:])
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else list(argv))
    try:
        args.func(args)
    except KeyboardInterrupt:
        sys.stderr.write("\n")
        return 130
    except BrokenPipeError:
        # stdout closed early (`edgellm run ... | head`): not an error; stop writing to it
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:
        if os.environ.get("EDGELLM_DEBUG") == "1":
            raise
        sys.stderr.write(f"edgellm: error: {one_line(exc)}\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
