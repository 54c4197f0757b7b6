"""Tokenising a request's prompt as the engine will, so the gateway can look it up in the
engines' own prefix caches (gateway/kv_view.py).

The tokenizer and chat template come from a worker (`/kv-cache/tokenizer`), the ones its
engine was started with. Chats are rendered as Hugging Face's `apply_chat_template` renders them
(vLLM's path): a sandboxed Jinja environment with `trim_blocks` and `lstrip_blocks`, the special
tokens as variables, then encoded without adding special tokens; completions are encoded with
them. A prompt rendered a little differently only costs a worse guess, never a wrong answer: the
engine renders for itself.

Tokenising is the cost (about 4 ms of CPU for 4,000 tokens, bench/tokenize_bench.py), and chats
resend their history every turn. Special tokens split a text into pieces that a tokenizer
encodes one by one (their ids are fixed, and no merge crosses them), so the pieces between
them (a system prompt, each earlier turn) are kept in a small LRU and only new pieces are
encoded. Tokenizers whose added tokens strip or match whitespace around them are encoded whole.
"""

from __future__ import annotations

import collections
import datetime as dt
import json
import logging
import re
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

    def __init__(self, files: TokenizerFiles, max_pieces: int = 4096) -> None:
        self._tokenizer = Tokenizer.from_str(files.tokenizer_json)
        self._template = (_environment().from_string(files.chat_template)
                          if files.chat_template else None)
        self._specials = {"bos_token": files.bos_token or "", "eos_token": files.eos_token or ""}
        added = list(self._tokenizer.get_added_tokens_decoder().values())
        plain = all(not (t.lstrip or t.rstrip or t.single_word or t.normalized) for t in added)
        contents = sorted((t.content for t in added if t.content), key=len, reverse=True)
        self._split = re.compile("(" + "|".join(map(re.escape, contents)) + ")") \
            if plain and contents else None
        self._pieces: collections.OrderedDict[str, list[int]] = collections.OrderedDict()
        self._max_pieces = max_pieces

    def _encode_pieces(self, text: str) -> list[int]:
        if self._split is None:
            return list(self._tokenizer.encode(text, add_special_tokens=False).ids)
        ids: list[int] = []
        for piece in self._split.split(text):
            if not piece:
                continue
            cached = self._pieces.get(piece)
            if cached is None:
                cached = list(self._tokenizer.encode(piece, add_special_tokens=False).ids)
                self._pieces[piece] = cached
                if len(self._pieces) > self._max_pieces:
                    self._pieces.popitem(last=False)
            else:
                self._pieces.move_to_end(piece)
            ids.extend(cached)
        return ids

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
        return self._encode_pieces(text)

    def text_ids(self, text: str) -> list[int]:
        return list(self._tokenizer.encode(text, add_special_tokens=True).ids)


# Given a model's tokenizer, a request's prompt ids (None: it cannot say).
PromptIds = Callable[[PromptTokenizer], "list[int] | None"]
