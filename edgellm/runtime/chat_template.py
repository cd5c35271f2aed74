"""Chat templates: the model's Jinja template (tokenizer.chat_template) rendered as HF transformers does.

Templates come from model files, so they run in Jinja's immutable sandbox; trim_blocks/lstrip_blocks
and the `raise_exception` / `strftime_now` helpers match what HF templates are written against.
"""
from __future__ import annotations

import json
from datetime import datetime

from jinja2 import TemplateError
from jinja2.sandbox import ImmutableSandboxedEnvironment

# ChatML, for models that ship no template.
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class ChatTemplateError(ValueError):
    """A template that does not compile, or that rejected the conversation while rendering."""


def _raise_exception(message: str):
    raise ChatTemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value, indent=None) -> str:
    # HF overrides Jinja's tojson: no HTML escaping, non-ASCII kept as is.
    return json.dumps(value, indent=indent, ensure_ascii=False)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now)
    env.filters["tojson"] = _tojson
    return env


def validate_messages(messages) -> None:
    """Each message must be a dict with string 'role' and 'content'; errors name the offending index."""
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages must be a list of dicts, got {type(messages).__name__}")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise TypeError(f"messages[{i}] must be a dict, got {type(message).__name__}")
        for key in ("role", "content"):
            if key not in message:
                raise ValueError(f"messages[{i}] has no {key!r}")
            if not isinstance(message[key], str):
                raise TypeError(f"messages[{i}][{key!r}] must be a str, "
                                f"got {type(message[key]).__name__}")
        if not message["role"]:
            raise ValueError(f"messages[{i}] has an empty role")


class ChatTemplate:
    def __init__(self, source: str | None, bos_token: str = "", eos_token: str = ""):
        self.source = CHATML_TEMPLATE if source is None else source
        self.bos_token, self.eos_token = bos_token, eos_token
        try:
            self._template = _environment().from_string(self.source)
        except TemplateError as e:
            raise ChatTemplateError(f"invalid chat template: {e}") from e

    @classmethod
    def from_metadata(cls, md: dict, tokenizer) -> "ChatTemplate":
        """The GGUF's tokenizer.chat_template (ChatML when absent), with the tokenizer's BOS/EOS text."""
        def text(id):
            return "" if id is None else tokenizer.token_text(id)
        return cls(md.get("tokenizer.chat_template"), text(tokenizer.bos_id), text(tokenizer.eos_id))

    def render(self, messages: list[dict], add_generation_prompt: bool = True) -> str:
        """The prompt text for `messages`. Templates may emit the BOS text themselves: encode the
        result with add_bos=False when they do, or BOS ends up doubled."""
        validate_messages(messages)
        try:
            return self._template.render(
                messages=messages, add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token, eos_token=self.eos_token)
        except ChatTemplateError:
            raise
        except TemplateError as e:
            raise ChatTemplateError(f"chat template failed to render: {e}") from e
