"""Streams that survive their worker: what a continuable stream keeps, and what it may be.

A streaming chat or completion goes to its engine with `"return_token_ids": true`. Its relay
(gateway/proxy.py) feeds every chunk through a `StreamTrack`, which keeps the prompt's and the
answer's token ids as the engine's bytes (no JSON per token: a few substring searches per
event, about 2 µs) and gives back the bytes to relay: whole SSE events, with the token ids
the client did not ask for put back to `null`, as the engine sends them without
`return_token_ids`. When the worker fails mid-answer, gateway/resume.py sends the rest to
another worker from those ids.

`plan` decides, once per request, whether a stream can be continued exactly, and if not, why
(the README lists each case and what happens instead).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pydantic_core

OPT_OUT_HEADER = "x-fleet-continue"
CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"

# The sampling parameters a continuation (a completion from token ids) carries over as they
# came; the output limits are carried over reduced by what was generated (`ResumePlan`).
_SAMPLING = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
             "repetition_penalty", "stop", "stop_token_ids", "ignore_eos",
             "include_stop_str_in_output", "skip_special_tokens",
             "spaces_between_special_tokens", "logit_bias", "allowed_token_ids", "bad_words",
             "seed", "user", "priority", "cache_salt")
# Structured output constrains the answer from its first token: a grammar restarted at the
# seam would constrain the rest wrongly.
_STRUCTURED = ("response_format", "structured_outputs", "guided_json", "guided_regex",
               "guided_choice", "guided_grammar")
_SAMPLING_SET, _STRUCTURED_SET = frozenset(_SAMPLING), frozenset(_STRUCTURED)


@dataclass(frozen=True)
class ResumePlan:
    """What a continuation of one stream needs from its request."""

    chat: bool
    keep_ids: bool  # the client asked for token ids itself
    include_usage: bool  # the client gets a usage chunk at the end
    continuous_usage: bool  # ... and usage in every chunk
    max_tokens: int | None  # None: up to the context (chat), vLLM's 16 for completions
    min_tokens: int
    stops: tuple[str, ...]
    include_stop: bool
    sampling: dict[str, Any] = field(default_factory=dict)

    @property
    def hold(self) -> int:
        """Characters an engine holds back for a possible stop string (vLLM's stop buffer)."""
        if not self.stops or self.include_stop:
            return 0
        return max(len(s) for s in self.stops) - 1


def plan(path: str, data: dict[str, Any], opt_out: str | None, enabled: bool
         ) -> ResumePlan | str:
    """A plan to continue this streaming request, or why it will not be continued."""
    if not enabled:
        return "off"
    if opt_out is not None and opt_out.strip().lower() in ("off", "0", "false", "no"):
        return "opted out"
    if path not in (CHAT, COMPLETIONS):
        return "endpoint"
    chat = path == CHAT
    if (data.get("n") or 1) > 1 or data.get("best_of") not in (None, 1):
        return "n"
    if data.get("logprobs") not in (None, False) or data.get("top_logprobs") is not None \
            or data.get("prompt_logprobs") is not None:
        return "logprobs"
    if data.get("tools") and data.get("tool_choice") != "none":
        return "tools"
    if not _STRUCTURED_SET.isdisjoint(data) and any(
            data.get(k) not in (None, {"type": "text"}) for k in _STRUCTURED):
        return "structured output"
    if not chat:
        prompt = data.get("prompt")
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            if len(prompt) > 1:
                return "several prompts"
        if data.get("suffix") is not None:
            return "suffix"
        if data.get("echo"):
            # vLLM echoes no prompt text when token ids are asked for.
            return "echo"
    stop = data.get("stop")
    stops = (stop,) if isinstance(stop, str) else tuple(s for s in stop or () if s)
    options = data.get("stream_options") or {}
    limit = data.get("max_completion_tokens") if chat else None
    if limit is None:
        limit = data.get("max_tokens", None if chat else 16)
    return ResumePlan(
        chat=chat, keep_ids=data.get("return_token_ids") is True,
        include_usage=bool(options.get("include_usage")),
        continuous_usage=bool(options.get("include_usage")
                              and options.get("continuous_usage_stats")),
        max_tokens=limit, min_tokens=int(data.get("min_tokens") or 0), stops=stops,
        include_stop=bool(data.get("include_stop_str_in_output")),
        sampling={k: v for k, v in data.items() if v is not None and k in _SAMPLING_SET},
    )


_DONE = b"data: [DONE]\n\n"
_ERROR = b'data: {"error"'
_IDS = b'token_ids":['  # of '"token_ids":[' and '"prompt_token_ids":['
_PROMPT = b'"prompt_'
_NULL = b'"token_ids":null'
_PROMPT_NULL = b'"prompt_token_ids":null'


def parse_ids(raw: bytes) -> list[int]:
    return [int(x) for x in raw.split(b",") if x.strip()]


class StreamTrack:
    """What a continuable stream's relay keeps of the engine's answer, chunk by chunk.

    The hot path: a few substring searches per event, in C, and no JSON parsing (but for
    the first event, and for the relayed text when the request has stop strings)."""

    __slots__ = ("plan", "prompt_ids", "generated", "_since_text", "multi", "head_event",
                 "finished", "usage_sent", "done", "error", "unparsed", "texts", "_carry", "_keep",
                 "_text_key")

    def __init__(self, plan: ResumePlan) -> None:
        self.plan = plan
        self.prompt_ids: bytes | None = None
        self.generated: list[bytes] = []  # each event's ids, as the engine wrote them
        self._since_text = 0  # generated[_since_text:]: ids of events that had no text
        self.multi = False  # the last event with text had several tokens
        self.head_event: bytes | None = None  # the first event: its id, created, model, object
        self.finished = False  # a finish_reason came
        self.usage_sent = False  # and after it the engine's usage chunk
        self.done = False  # [DONE] came
        self.error: bytes | None = None  # an error event from the engine
        self.unparsed = False  # in the middle of reasoning: not continued as plain text
        self.texts: list[str] | None = [] if plan.stops else None  # relayed text, for stops
        self._carry = b""
        self._keep = plan.keep_ids
        self._text_key = b'"delta":{"content":"' if plan.chat else b'"text":"'

    @property
    def pending(self) -> int:
        """Tokens since the last event that had text: their text is still held."""
        return len(parse_ids(b",".join(self.generated[self._since_text:])))

    def feed(self, chunk: bytes) -> bytes:
        """The bytes to relay for `chunk`: its whole events (the rest waits for the next
        chunk), without an engine's error event (kept in `error`) and what follows it."""
        if self._carry:
            chunk, self._carry = self._carry + chunk, b""
        if not chunk.endswith(b"\n\n"):
            end = chunk.rfind(b"\n\n") + 2
            if end < 2:  # not one whole event yet
                self._carry = chunk
                return b""
            chunk, self._carry = chunk[:end], chunk[end:]
        if chunk.find(b"\n\n") == len(chunk) - 2:  # one event: the usual chunk
            event = self._event(chunk)
            return b"" if event is None else event
        out = []
        for event in chunk[:-2].split(b"\n\n"):
            kept = self._event(event + b"\n\n")
            if kept is not None:
                out.append(kept)
            elif self.error is not None:
                break
        return b"".join(out)

    def _event(self, event: bytes) -> bytes | None:
        """One event, with its blank line, as relayed; None to drop it."""
        at = event.find(_IDS)
        if at < 0:
            if event == _DONE:
                self.done = True
            elif event.startswith(_ERROR):
                self.error = event
                return None
            elif self.head_event is None and event.startswith(b"data: {"):
                self.head_event = event
            if b'"finish_reason":"' in event:
                self.finished = True
            elif self.finished and b'"usage":{' in event:
                self.usage_sent = True
            return event
        if self.head_event is None:
            self.head_event = event
        ids = b""
        counted = False
        while at >= 0:  # the event's ids: the prompt's (first event) and the answer's
            start = at + 12  # len(_IDS)
            stop = event.find(b"]", start)
            if stop < 0:
                break
            if event[at - 1] == 34:  # '"': the answer's
                ids, counted, cut, null = event[start:stop], True, at - 1, _NULL
            elif event.startswith(_PROMPT, at - 8):
                self.prompt_ids, cut, null = event[start:stop], at - 8, _PROMPT_NULL
            else:  # some other key ending in token_ids
                at = event.find(_IDS, stop)
                continue
            if not self._keep:
                event = b"".join((event[:cut], null, event[stop + 1:]))
                stop = cut + len(null)
            at = event.find(_IDS, stop)
        if not counted:
            if b'"finish_reason":"' in event:
                self.finished = True
            return event
        self.generated.append(ids)
        # One search each for: the text (empty or not), the finish, reasoning.
        text = event.find(self._text_key)
        if text < 0 or event[text + len(self._text_key)] == 34:  # no text, or ""
            if text < 0:
                if not self._keep and b'"delta":{}' in event \
                        and b'"finish_reason":null' in event:
                    # Sent only because of return_token_ids: the client would not have had it.
                    return None
                # A delta of reasoning (or a tool call): in the middle of it, the rest cannot
                # be continued as plain text. Once content comes, it can again.
                self.unparsed = b'"reasoning' in event or b'"tool_calls"' in event
        else:
            self._since_text = len(self.generated)
            self.multi = b"," in ids
            self.unparsed = False
        if event.find(b'"finish_reason":"', max(text, 0)) >= 0:
            self.finished = True
        if self.texts is not None:
            self.texts.append(_text_of(event))
        return event

    @property
    def head(self) -> dict[str, Any] | None:
        """The first event, parsed (only when the stream is continued)."""
        if self.head_event is None:
            return None
        head = pydantic_core.from_json(self.head_event[6:])
        return head if isinstance(head, dict) else None

    def generated_ids(self) -> list[int]:
        return parse_ids(b",".join(g for g in self.generated if g))

    def relayed_text(self) -> str:
        return "".join(self.texts or ())


def _text_of(event: bytes) -> str:
    data = pydantic_core.from_json(event[6:])
    choices = data.get("choices") or [{}]
    choice = choices[0]
    if "delta" in choice:
        return str((choice.get("delta") or {}).get("content") or "")
    return str(choice.get("text") or "")
