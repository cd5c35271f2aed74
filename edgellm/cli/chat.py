"""`edgellm chat`: a line-based REPL that keeps the conversation and streams each reply."""
from __future__ import annotations

import sys

from edgellm.cli.common import print_note, speed_note, stream_to

HELP = "/reset clears the conversation, /exit or Ctrl-D quits, Ctrl-C stops a reply"


def _fresh_messages(system: str | None) -> list[dict]:
    return [{"role": "system", "content": system}] if system else []


def _read_line(prompt: str) -> str | None:
    """The next user line, or None at EOF / Ctrl-C at the prompt."""
    try:
        return input(prompt)
    except EOFError:
        return None
    except KeyboardInterrupt:
        sys.stdout.write("\n")
        return None


def _reply(llm, messages: list[dict], sampling: dict, out) -> tuple[str, bool]:
    """Stream the assistant's reply; Ctrl-C ends this reply only. Returns (text, interrupted)."""
    pieces = llm.chat(messages, stream=True, **sampling)
    shown: list[str] = []
    try:
        stream_to(pieces, out, shown)
        return "".join(shown), False
    except KeyboardInterrupt:
        return "".join(shown), True
    finally:
        pieces.close()  # runs the generator's cleanup even when it was left half-way
        out.write("\n")
        out.flush()


def repl(llm, system: str | None = None, sampling: dict | None = None, out=None, err=None) -> None:
    out, err = out or sys.stdout, err or sys.stderr
    sampling = sampling or {}
    interactive = sys.stdin.isatty()
    if interactive:
        import readline  # noqa: F401  -- line editing and history for input()
        print_note(HELP, err)
    prompt = ">>> " if interactive else ""  # piped input: keep stdout to the replies alone
    messages = _fresh_messages(system)
    while (line := _read_line(prompt)) is not None:
        line = line.strip()
        if not line:
            continue
        if line == "/exit":
            break
        if line == "/reset":
            messages = _fresh_messages(system)
            llm.reset()
            print_note("conversation cleared", err)
            continue
        messages.append({"role": "user", "content": line})
        text, interrupted = _reply(llm, messages, sampling, out)
        messages.append({"role": "assistant", "content": text})  # what the user saw, even if cut
        if interrupted:
            # a reply cut mid-step may leave the cached state ahead of `messages`: re-prefill next turn
            llm.reset()
            print_note("interrupted", err)
        else:
            print_note(speed_note(llm.stats()), err)
