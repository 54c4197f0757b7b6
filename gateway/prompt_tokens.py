"""Tokenising a request's prompt as the engine will, so the gateway can look it up in the
engines' own prefix caches (gateway/kv_view.py).

The tokenizer and chat template come from a worker (`/kv-cache/tokenizer`), the ones its
engine was started with. Chats are rendered as Hugging Face's `apply_chat_template` renders them
(vLLM's path): a sandboxed Jinja environment with `trim_blocks` and `lstrip_blocks`, the special
tokens as variables, then encoded without adding special tokens; completions are encoded with
them. A prompt rendered a little differently only costs a worse guess, never a wrong answer: the
engine renders for itself.
"""

from __future__ import annotations

import datetime as dt
import json
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jinja2
import jinja2.ext
import jinja2.sandbox
from tokenizers import Tokenizer

from worker.protocol import TokenizerFiles

logger = logging.getLogger(__name__)


def _raise(message: str) -> None:
    raise jinja2.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators,
                      sort_keys=sort_keys)


def _environment() -> jinja2.sandbox.ImmutableSandboxedEnvironment:
    env = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: dt.datetime.now().strftime(fmt)
    return env


class PromptTokenizer:
    """One model's tokenizer and chat template (building one reads the files: not per request)."""

    def __init__(self, files: TokenizerFiles) -> None:
        self._tokenizer = Tokenizer.from_str(files.tokenizer_json)
        self._template = (_environment().from_string(files.chat_template)
                          if files.chat_template else None)
        self._specials = {"bos_token": files.bos_token or "", "eos_token": files.eos_token or ""}

    def chat_ids(self, messages: Sequence[Mapping[str, Any]],
                 options: Mapping[str, Any] | None = None) -> list[int] | None:
        """The token ids of a chat as the engine renders it; None without a template."""
        if self._template is None:
            return None
        options = options or {}
        continue_final = bool(options.get("continue_final_message"))
        text = self._template.render(
            messages=list(messages), tools=options.get("tools"),
            add_generation_prompt=bool(options.get("add_generation_prompt", not continue_final)),
            **self._specials, **(options.get("chat_template_kwargs") or {}))
        return list(self._tokenizer.encode(text, add_special_tokens=False).ids)

    def text_ids(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=True).ids)


# Given a model's tokenizer, a request's prompt ids (None: it cannot say).
PromptIds = Callable[[PromptTokenizer], "list[int] | None"]
