#!/usr/bin/env python
"""edgellm vs llama.cpp on the same GGUF, the same prompt token ids and the same thread count.

    python bench/vs_llamacpp.py --threads 1 2 --context 512 4096 [--kv-dtype q8_0] [--bandwidth] [--markdown]

llama.cpp runs through llama-cpp-python from its own venv (--llama-python), never a dependency
of edgellm. Each engine runs in its own child process, one after the other (--rounds K: K turns each,
alternating, and the engine that goes first alternating too), so peak RSS is that child's alone. The child side of
this file (`--worker`) imports only the standard library at module level (and bench/bandwidth.py beside it, which
does too), because the llama.cpp child runs under the other venv's Python, without edgellm.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

import bandwidth   # bench/bandwidth.py, beside this file

LLAMA_VERSION = "0.3.36"
BANDWIDTH_PASSES, BANDWIDTH_PASS_MS = 3, 300   # per round: three reads as long as a decode run (bench/bandwidth.py)
DEFAULT_LLAMA_PYTHON = os.environ.get("EDGELLM_LLAMA_PYTHON", "/work/llamavenv/bin/python")
# GGML type ids for llama.cpp's type_k / type_v
GGML_TYPES = {"f16": 1, "q4_0": 2, "q8_0": 8}
METRICS = (("prefill_tok_s", "prefill tok/s"), ("decode_tok_s", "decode tok/s"),
           ("peak_rss_mb", "peak RSS MB"))


# ---------------------------------------------------------------- child side

def peak_rss_mb() -> float:
    """edgellm.runtime.memory.peak_rss_mb, loaded from its file: it needs only the standard library, and the
    llama.cpp child runs under a Python that cannot import the edgellm package."""
    path = os.path.join(os.path.dirname(os.path.abspath(__file__)), os.pardir, "edgellm", "runtime", "memory.py")
    spec = importlib.util.spec_from_file_location("edgellm_memory", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.peak_rss_mb()


def edgellm_worker(spec: dict) -> dict:
    import edgellm
    from edgellm.cli.bench import measure

    ids, gen = spec["ids"], spec["gen_tokens"]
    llm = edgellm.LLM(model=spec["model"], n_threads=spec["threads"],
                      kv=edgellm.KVConfig(kv_dtype=spec["kv_dtype"]), n_ctx=len(ids) + gen + 16)
    r = measure(llm, ids, gen, spec["repeat"])
    llm.close()
    out = {"prefill_tok_s": r["prefill_tok_s"], "decode_tok_s": r["decode_tok_s"]}
    if spec.get("read_exe"):   # the read right after the decode, so the bound comes from the same seconds
        out["read_gb_s"] = bandwidth.best_read(spec["threads"], BANDWIDTH_PASSES, BANDWIDTH_PASS_MS, spec["read_exe"])
    return out


def llama_worker(spec: dict) -> dict:
    import llama_cpp
    import numpy as np

    ids, gen, kv = spec["ids"], spec["gen_tokens"], spec["kv_dtype"]
    llm = llama_cpp.Llama(
        spec["model"], n_ctx=len(ids) + gen + 16, n_threads=spec["threads"],
        n_threads_batch=spec["threads"], n_batch=512, n_ubatch=512,
        type_k=GGML_TYPES[kv], type_v=GGML_TYPES[kv],
        flash_attn=kv != "f16",  # llama.cpp refuses a quantized V cache without flash attention
        verbose=False)
    n_vocab = llm.n_vocab()

    def greedy_next() -> int:
        # logits_all=False: only the batch's last row exists, and Llama.eval no longer copies it
        row = llama_cpp.llama_get_logits_ith(llm.ctx, -1)
        return int(np.argmax(np.ctypeslib.as_array(row, shape=(n_vocab,))))

    def run(prompt: list[int], n_gen: int) -> tuple[float, float]:
        llm.reset()  # n_tokens = 0: the next eval drops the whole KV cache
        t0 = time.perf_counter()
        llm.eval(prompt)
        t1 = time.perf_counter()
        # counted as edgellm counts decode: n_gen tokens picked, the last one not evaluated
        for i in range(n_gen):
            tok = greedy_next()
            if i + 1 < n_gen:
                llm.eval([tok])
        t2 = time.perf_counter()
        return len(prompt) / (t1 - t0), n_gen / (t2 - t1)

    run(ids[:spec["warmup_prompt"]], spec["warmup_gen"])
    runs = [run(ids, gen) for _ in range(spec["repeat"])]
    llm.close()
    return {"prefill_tok_s": max(p for p, _ in runs), "decode_tok_s": max(d for _, d in runs)}


def worker_main(engine: str) -> None:
    spec = json.load(sys.stdin)
    result = {"edgellm": edgellm_worker, "llama.cpp": llama_worker}[engine](spec)
    print(json.dumps({**result, "peak_rss_mb": peak_rss_mb()}))


# ---------------------------------------------------------------- parent side

def llama_version(python: str) -> str | None:
    try:
        proc = subprocess.run([python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                              capture_output=True, text=True)
    except OSError:
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def venv_instructions(python: str) -> str:
    venv = os.path.dirname(os.path.dirname(python))
    return (f"{python} cannot import llama_cpp. Create that venv with:\n"
            f"  python3 -m venv {venv} && CMAKE_ARGS=-DGGML_NATIVE=ON "
            f"{venv}/bin/pip install llama-cpp-python=={LLAMA_VERSION}\n"
            f"or point --llama-python / $EDGELLM_LLAMA_PYTHON at a Python that has it.")


def warn_if_busy() -> None:
    """Under CPU contention llama.cpp's spinning thread pool slows down by up to 100x (edgellm
    far less), which makes the ratios meaningless: say so before measuring."""
    import psutil

    busy = psutil.cpu_percent(interval=1.0)
    if busy > 25:
        print(f"warning: the CPUs are already {busy:.0f}% busy; other processes will distort "
              f"the numbers, llama.cpp's above all", file=sys.stderr)


def run_worker(python: str, engine: str, spec: dict) -> dict:
    proc = subprocess.run([python, os.path.abspath(__file__), "--worker", engine],
                          input=json.dumps(spec), capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"{engine} run failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # last line: C code may print before


def prompt_token_ids(model: str, n: int) -> list[int]:
    import edgellm
    from edgellm.cli.bench import prompt_ids

    llm = edgellm.LLM(model=model)
    ids = prompt_ids(llm, n)
    llm.close()
    return ids


def best_of(a: dict, b: dict) -> dict:
    """Two runs of one engine: the faster prefill and decode, the larger peak RSS (memory is not a race)."""
    if not a:
        return b
    return {**b, "prefill_tok_s": max(a["prefill_tok_s"], b["prefill_tok_s"]),
            "decode_tok_s": max(a["decode_tok_s"], b["decode_tok_s"]), "peak_rss_mb": max(a["peak_rss_mb"], b["peak_rss_mb"])}


def engine_order(rounds: int) -> list[str]:
    """The engines take turns, so a slow spell of the machine hits both, and each goes first in every other round: on a
    shared host the second of two back-to-back processes can run up to 10% faster, and a fixed order would hand that
    slot to one engine in every round."""
    pair = ["edgellm", "llama.cpp"]
    return [engine for r in range(rounds) for engine in (pair if r % 2 == 0 else pair[::-1])]


def compare(args, model: str, ids: list[int], threads: int, read_exe: str | None = None) -> dict:
    from edgellm.cli.bench import WARMUP_GEN, WARMUP_PROMPT

    spec = {"model": model, "ids": ids, "gen_tokens": args.gen_tokens, "threads": threads,
            "kv_dtype": args.kv_dtype, "repeat": args.repeat, "read_exe": read_exe,
            "warmup_prompt": WARMUP_PROMPT, "warmup_gen": WARMUP_GEN}
    python = {"edgellm": sys.executable, "llama.cpp": args.llama_python}
    best, paired = {"edgellm": {}, "llama.cpp": {}}, []
    for engine in engine_order(args.rounds):
        run = run_worker(python[engine], engine, spec)
        if engine == "edgellm":
            paired.append((run["decode_tok_s"], run.get("read_gb_s")))
        best[engine] = best_of(best[engine], run)
    ours, theirs = best["edgellm"], best["llama.cpp"]
    ratio = {key: ours[key] / theirs[key] for key, _ in METRICS}
    row = {"threads": threads, "context": len(ids), "edgellm": ours, "llama.cpp": theirs, "ratio": ratio}
    if read_exe:
        row["bound"] = decode_bound(model, len(ids), args.kv_dtype, paired)
    return row


def decode_bound(model: str, context: int, kv_dtype: str, paired: list[tuple[float, float]]) -> dict:
    """Decode against the bandwidth bound, round by round (each round's decode over the bound from the read right
    after it: the host's memory speed moves from one minute to the next), and the median round."""
    per_token = sum(bandwidth.bytes_per_token(model, context, kv_dtype))
    rounds = sorted(({"decode_tok_s": read * 1e9 / per_token, "read_gb_s": read, "share": tok_s * per_token / (read * 1e9)}
                     for tok_s, read in paired), key=lambda r: r["share"])
    return {**rounds[(len(rounds) - 1) // 2], "mb_per_token": per_token / 1e6,
            "shares": [r["share"] for r in rounds]}


def format_bound(b: dict) -> str:
    rounds = " / ".join(f"{s * 100:.0f}%" for s in b["shares"])
    return (f"{b['share'] * 100:.0f}% of the bound (rounds: {rounds}; median round's bound {b['decode_tok_s']:.1f} tok/s: "
            f"{b['mb_per_token']:.1f} MB/token at {b['read_gb_s']:.2f} GB/s)")


def format_text(rows: list[dict]) -> str:
    head = f"{'threads':>7}  {'context':>7}  {'engine':<10}" + "".join(
        f"  {label:>13}" for _, label in METRICS)
    lines = [head]
    for row in rows:
        for engine in ("edgellm", "llama.cpp", "ratio"):
            values = "".join(f"  {row[engine][key]:13.{3 if engine == 'ratio' else 1}f}"
                             for key, _ in METRICS)
            lines.append(f"{row['threads']:>7}  {row['context']:>7}  {engine:<10}{values}")
        if "bound" in row:
            lines.append(f"{row['threads']:>7}  {row['context']:>7}  {'decode':<10}  {format_bound(row['bound'])}")
    return "\n".join(lines)


def format_markdown(rows: list[dict], model_name: str, kv_dtype: str) -> str:
    bound = all("bound" in row for row in rows)
    lines = ["| model | KV | threads | context | " + " | ".join(
                 f"{label} edgellm / llama.cpp (ratio)" for _, label in METRICS) + " |"
             + (" decode / bandwidth bound |" if bound else ""),
             "|---|---|---|---|" + "---|" * (len(METRICS) + bound)]
    for row in rows:
        cells = [f"{row['edgellm'][key]:.1f} / {row['llama.cpp'][key]:.1f} ({row['ratio'][key]:.2f}x)"
                 for key, _ in METRICS]
        lines.append(f"| {model_name} | {kv_dtype} | {row['threads']} | {row['context']} | "
                     + " | ".join(cells) + " |" + (f" {format_bound(row['bound'])} |" if bound else ""))
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="registry name or .gguf path (default: registry default)")
    p.add_argument("--threads", type=int, nargs="+", default=[2], metavar="N")
    p.add_argument("--prompt-tokens", type=int, default=512, metavar="N")
    p.add_argument("--gen-tokens", type=int, default=128, metavar="N")
    p.add_argument("--context", type=int, nargs="+", default=None, metavar="N",
                   help="prompt lengths to measure decode after (default: --prompt-tokens)")
    p.add_argument("--kv-dtype", choices=sorted(GGML_TYPES), default="f16")
    p.add_argument("--repeat", type=int, default=3, metavar="R", help="best of R timed runs")
    p.add_argument("--rounds", type=int, default=1, metavar="K",
                   help="K processes per engine, alternating engines (and which goes first); best speeds and largest "
                        "peak RSS over them")
    p.add_argument("--markdown", action="store_true", help="print README table rows")
    p.add_argument("--bandwidth", action="store_true",
                   help="also measure the read bandwidth (bench/bandwidth.py, the best of 3 passes in 4 KiB and 3 in "
                        "huge pages) right after edgellm's decode in every round, and give that decode as a share of "
                        "the bound the read sets (the median round)")
    p.add_argument("--llama-python", default=DEFAULT_LLAMA_PYTHON, metavar="PATH",
                   help="Python with llama-cpp-python (default: $EDGELLM_LLAMA_PYTHON or %(default)s)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    version = llama_version(args.llama_python)
    if version is None:
        print(venv_instructions(args.llama_python), file=sys.stderr)
        return 2
    from edgellm.runtime.registry import DEFAULT_MODEL, resolve

    model = str(resolve(args.model or DEFAULT_MODEL))
    warn_if_busy()
    contexts = args.context or [args.prompt_tokens]
    all_ids = prompt_token_ids(model, max(contexts))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        read_exe = bandwidth.build(tmp) if args.bandwidth else None
        for threads in args.threads:
            for n in contexts:
                try:
                    rows.append(compare(args, model, all_ids[:n], threads, read_exe))
                except RuntimeError as exc:  # a child failed: its stderr is in the message
                    print(exc, file=sys.stderr)
                    return 1
                print(f"measured threads={threads} context={n}", file=sys.stderr)
    name = os.path.basename(model)
    if args.markdown:
        print(format_markdown(rows, name, args.kv_dtype))
    else:
        print(f"{name}  kv={args.kv_dtype}  gen={args.gen_tokens}  best of {args.repeat} x {args.rounds} rounds  "
              f"llama-cpp-python {version}  (ratio = edgellm / llama.cpp)")
        print(format_text(rows))
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--worker":
        worker_main(sys.argv[2])
    else:
        sys.exit(main())
