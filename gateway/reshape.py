"""A continuation's events, re-shaped as the original stream's chunks; the whole answer's count.

The continuation is a completion from token ids; the client asked for a chat (or completion)
stream and gets that: the original `id`, `object`, `created` and `model`, no second role chunk,
one `finish_reason`, and at the end `usage` for the whole answer with the prompt counted once.

Two things happen at the seam, both from how vLLM streams text:
- the engine's detokenizer holds back an unfinished UTF-8 character, and a continuation whose
  token-id prompt ends inside one emits garbage (tokenizers' DecodeStream re-emits its whole
  prefill). So the seam goes after the last token whose text was relayed (`Answer.cut`), and
  the tokens after it are generated again;
- with stop strings the engine holds back the last `len(longest stop) - 1` characters, which
  the client never got. That text (`held`) is sent first, and a stop string that begins in it
  and ends in the continuation's text (which the new engine cannot see) is found here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pydantic_core

from gateway.continuation import ResumePlan, StreamTrack


@dataclass
class Answer:
    """The answer so far, across the original stream and its continuations."""

    plan: ResumePlan
    head: dict[str, Any]
    prompt_ids: list[int]
    generated: list[int]
    pending: int = 0  # trailing tokens whose text was not relayed yet
    multi: bool = False
    finished: bool = False
    texts: list[str] | None = None  # relayed text, kept when stop strings are set
    completion_tokens: int = 0  # counted in usage: what the engines generated and we kept
    continuations: int = 0
    usage_sent: bool = False  # the engine's own usage chunk got through

    @classmethod
    def from_track(cls, track: StreamTrack) -> Answer | None:
        """None when the stream cannot be continued from what it relayed."""
        head = track.head
        if head is None or track.prompt_ids is None or track.done or track.unparsed:
            return None
        generated = track.generated_ids()
        return cls(plan=track.plan, head=head,
                   prompt_ids=[int(x) for x in track.prompt_ids.split(b",") if x.strip()],
                   generated=generated, pending=track.pending, multi=track.multi,
                   finished=track.finished, texts=track.texts,
                   completion_tokens=len(generated), usage_sent=track.usage_sent)

    @property
    def needs_text(self) -> bool:
        """Whether the seam needs the text of the generated tokens (an engine's detokenize):
        for the text the old engine held back for stop strings, or an unclear tail."""
        return bool(self.plan.hold) or self.multi

    def cut(self) -> int:
        """How many generated tokens the continuation's prompt keeps: all but those whose
        text the old engine still held (an unfinished character)."""
        return len(self.generated) - self.pending

    def remaining(self, kept: int) -> int | None:
        if self.plan.max_tokens is None:
            return None
        return self.plan.max_tokens - kept

    def relayed_text(self) -> str:
        return "".join(self.texts or ())

    def usage(self) -> dict[str, Any]:
        prompt = len(self.prompt_ids)
        return {"prompt_tokens": prompt, "completion_tokens": self.completion_tokens,
                "total_tokens": prompt + self.completion_tokens}


def held_text(decoded: str, relayed: str, hold: int) -> str:
    """The text of the kept tokens the client has not seen, from their decoded text."""
    if decoded.startswith(relayed):
        return decoded[len(relayed):]
    # A tokenizer that drops a leading space when decoding without the prompt before it.
    if relayed.startswith(" ") and decoded.startswith(relayed[1:]):
        return decoded[len(relayed) - 1:]
    return decoded[-hold:] if hold else ""


def continuation_body(answer: Answer, model: str, kept: int) -> bytes:
    """A completion from token ids: the prompt and the kept tokens, the same sampling."""
    plan = answer.plan
    body: dict[str, Any] = {
        **plan.sampling, "model": model,
        "prompt": answer.prompt_ids + answer.generated[:kept],
        "max_tokens": answer.remaining(kept), "stream": True, "return_token_ids": True,
        "stream_options": {"include_usage": True}, "add_special_tokens": False,
    }
    if plan.min_tokens > kept:
        body["min_tokens"] = plan.min_tokens - kept
    return pydantic_core.to_json(body)


@dataclass
class Seam:
    """The join of held text and a continuation's first text, checked for stop strings."""

    held: str
    stops: tuple[str, ...]
    hold: int
    include_stop: bool
    _buffer: str = ""
    _open: bool = field(default=True)

    def feed(self, text: str, final: bool) -> tuple[str, str | None]:
        """Text to relay, and the stop string that ended the answer here, if one did."""
        if not self._open:
            return text, None
        buffer = self._buffer + text
        if not final and len(buffer) < self.hold:
            self._buffer = buffer
            return "", None
        self._open = False
        joined = self.held + buffer
        found: tuple[int, str] | None = None
        for stop in self.stops:
            at = joined.find(stop)
            # Only a stop that begins in the held text: one within the continuation's own
            # text the new engine finds itself.
            if 0 <= at < len(self.held) and (found is None or at < found[0]):
                found = (at, stop)
        if found is None:
            return joined, None
        at, stop = found
        return joined[:at] + (stop if self.include_stop else ""), stop


class Reshaper:
    """A continuation's completion events in, the client's chunks out."""

    def __init__(self, answer: Answer, kept: int, held: str) -> None:
        self.answer = answer
        plan = answer.plan
        # The tokens after the cut are generated again.
        del answer.generated[kept:]
        answer.completion_tokens = kept
        answer.pending = 0
        self.seam = Seam(held, plan.stops, plan.hold, plan.include_stop)
        self._base = {k: answer.head.get(k) for k in ("id", "object", "created", "model")}
        self.stopped: str | None = None  # a stop string the seam found: the answer is over

    def feed(self, data: dict[str, Any]) -> bytes:
        """One continuation event (parsed); the bytes for the client (maybe none)."""
        answer = self.answer
        choices = data.get("choices") or []
        if not choices:
            return b""  # its usage chunk: the whole answer's is sent instead
        choice = choices[0]
        ids = choice.get("token_ids") or []
        text = choice.get("text") or ""
        finish = choice.get("finish_reason")
        stop_reason = choice.get("stop_reason")
        answer.generated.extend(ids)
        answer.completion_tokens += len(ids)
        if ids:
            if text:
                answer.pending, answer.multi = 0, len(ids) > 1
            else:
                answer.pending += len(ids)
        text, stopped = self.seam.feed(text, final=finish is not None)
        if stopped is not None:
            self.stopped = stopped
            finish, stop_reason = "stop", stopped
        if finish is not None:
            answer.finished = True
        if answer.texts is not None and text:
            answer.texts.append(text)
        if not text and finish is None and not (answer.plan.keep_ids and ids):
            return b""
        return self.chunk(text, finish, stop_reason, ids)

    def chunk(self, text: str, finish: str | None, stop_reason: Any,
              ids: list[int]) -> bytes:
        plan = self.answer.plan
        choice: dict[str, Any] = {"index": 0}
        if plan.chat:
            choice["delta"] = {"content": text}
        else:
            choice["text"] = text
        choice["logprobs"] = None
        choice["finish_reason"] = finish
        if finish is not None:
            choice["stop_reason"] = stop_reason
        if not plan.chat:
            choice["prompt_token_ids"] = None
        choice["token_ids"] = ids if plan.keep_ids else None
        event: dict[str, Any] = {**self._base, "choices": [choice]}
        if plan.continuous_usage:
            event["usage"] = self.answer.usage()
        return b"data: " + pydantic_core.to_json(event) + b"\n\n"

    def end(self) -> bytes:
        """What ends the client's stream: the usage chunk if it asked for one, and [DONE]."""
        tail = b""
        if self.answer.plan.include_usage and not self.answer.usage_sent:
            event: dict[str, Any] = {**self._base, "choices": [],
                                     "usage": self.answer.usage()}
            tail = b"data: " + pydantic_core.to_json(event) + b"\n\n"
        return tail + b"data: [DONE]\n\n"


def finish_only(answer: Answer, reason: str) -> bytes:
    """The end of an answer with nothing left to generate (its finish came, or its limit)."""
    shaper = Reshaper(answer, len(answer.generated), "")
    head = b"" if answer.finished else shaper.chunk("", reason, None, [])
    answer.finished = True
    return head + shaper.end()
