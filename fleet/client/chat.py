"""A chat with history against the gateway, on the `openai` package.

A history is a list of OpenAI messages (`{"role": "user" | "assistant", "content": ...}`), the
system prompt kept apart on the `Chat`. Every call returns a new history and leaves the one it
was given untouched: `chat` deep-copies it, as the seed's Qwen wrapper did, so a caller can keep
several branches of one conversation.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from types import TracebackType
from typing import Any, cast

import openai
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessageParam

try:  # The HTTP library under the openai client: httpx2 since openai 3, httpx before.
    import httpx2 as _http
except ImportError:  # pragma: no cover
    import httpx as _http  # type: ignore[no-redef]

from fleetcore.errors import FleetError
from fleetcore.openai_errors import from_openai

Message = dict[str, Any]


@dataclass(frozen=True)
class Sampling:
    """Sampling parameters; None leaves the choice to the engine (the model's defaults)."""

    temperature: float | None = None
    top_p: float | None = None
    max_tokens: int | None = None
    stop: str | list[str] | None = None
    # Engine-specific parameters the OpenAI API lacks, e.g. vLLM's {"top_k": 20}.
    extra_body: Mapping[str, Any] = field(default_factory=dict)

    def with_overrides(self, overrides: Mapping[str, Any]) -> Sampling:
        known = {f.name for f in fields(self)}
        unknown = set(overrides) - known
        if unknown:
            raise TypeError(f"unknown sampling parameter(s): {', '.join(sorted(unknown))}")
        return replace(self, **{k: v for k, v in overrides.items() if v is not None})

    def request_kwargs(self) -> dict[str, Any]:
        kwargs: dict[str, Any] = {
            name: getattr(self, name) for name in ("temperature", "top_p", "max_tokens", "stop")
            if getattr(self, name) is not None
        }
        if self.extra_body:
            kwargs["extra_body"] = dict(self.extra_body)
        return kwargs


def api_base(url: str) -> str:
    """The OpenAI base URL: the gateway's URL ending in /v1, whichever way it was given."""
    url = url.rstrip("/")
    return url if url.endswith("/v1") else f"{url}/v1"


def _message_copy(history: Sequence[Mapping[str, Any]] | None) -> list[Message]:
    return [copy.deepcopy(dict(m)) for m in history or ()]


class ChatStream(Iterator[str]):
    """The pieces of one streamed answer. Iterate it; `close()` (or leaving a `with` block) ends
    the request at once, and the gateway has the engine abort it.

    After the stream ends or is closed, `history` is the history with this exchange added (the
    answer so far, if it was stopped; unchanged if no text came at all).
    """

    def __init__(self, client: openai.OpenAI, model: str, messages: list[Message],
                 history: list[Message], query: str, sampling: Sampling) -> None:
        self._client = client
        self._model = model
        self._messages = messages
        self._before = history
        self._query = query
        self._sampling = sampling
        self._stream: openai.Stream[ChatCompletionChunk] | None = None
        self._pieces: list[str] = []
        self.finish_reason: str | None = None
        self.usage: dict[str, int] | None = None
        self.closed = False

    @property
    def text(self) -> str:
        return "".join(self._pieces)

    @property
    def history(self) -> list[Message]:
        if not self._pieces:
            return _message_copy(self._before)
        return [*_message_copy(self._before), {"role": "user", "content": self._query},
                {"role": "assistant", "content": self.text}]

    def _open(self) -> openai.Stream[ChatCompletionChunk]:
        # The caller's messages are plain dicts; the SDK's TypedDicts name their shape but
        # check nothing at run time, and the gateway validates them.
        messages = cast("list[ChatCompletionMessageParam]", self._messages)
        try:
            # Typed here: with the sampling keywords spread from a dict[str, Any], mypy cannot
            # tell which overload stream=True picks.
            stream: openai.Stream[ChatCompletionChunk] = self._client.chat.completions.create(
                model=self._model, messages=messages, stream=True,
                stream_options={"include_usage": True}, **self._sampling.request_kwargs(),
            )
            return stream
        except openai.OpenAIError as exc:
            self.closed = True
            raise from_openai(exc) from exc

    def __iter__(self) -> ChatStream:
        return self

    def __next__(self) -> str:
        if self.closed:
            raise StopIteration
        if self._stream is None:
            self._stream = self._open()
        try:
            for chunk in self._stream:
                if chunk.usage is not None:
                    self.usage = chunk.usage.model_dump()
                if not chunk.choices:
                    continue
                choice = chunk.choices[0]
                if choice.finish_reason:
                    self.finish_reason = choice.finish_reason
                if choice.delta.content:
                    self._pieces.append(choice.delta.content)
                    return choice.delta.content
        except openai.OpenAIError as exc:
            self.close()
            raise from_openai(exc) from exc
        self.close()
        raise StopIteration

    def close(self) -> None:
        if self._stream is not None and not self.closed:
            self._stream.close()
        self.closed = True

    def __enter__(self) -> ChatStream:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class Chat:
    """Multi-turn chat with one model behind the gateway.

    >>> chat = Chat("http://127.0.0.1:8000", "token-abc123", "SmolLM2-135M-Instruct",
    ...             system="You are terse.", temperature=0)
    >>> answer, history = chat.chat("What is the capital of France?")
    >>> answer, history = chat.chat("And of Italy?", history)

    Errors are `FleetAPIError` (`fleetcore.errors.FleetError`) and its subclasses
    (`AuthenticationError`, `NoWorkerError`, ...). Sampling parameters given here are defaults;
    `chat` and `stream_chat` take the same keywords to override them for one call. `max_retries`
    are the `openai` package's own retries (429, 5xx, connection errors); `http_client` is an
    HTTP client of your own for it (`openai.DefaultHttpxClient(...)`: proxies, certificates).
    """

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        model: str,
        *,
        system: str | None = None,
        temperature: float | None = None,
        top_p: float | None = None,
        max_tokens: int | None = None,
        stop: str | list[str] | None = None,
        extra_body: Mapping[str, Any] | None = None,
        timeout: float = 120.0,
        max_retries: int = 2,
        http_client: _http.Client | None = None,
    ) -> None:
        self.model = model
        self.system = system
        self.sampling = Sampling(temperature, top_p, max_tokens, stop, dict(extra_body or {}))
        # The gateway accepts any key when it has none configured; openai insists on one.
        self._client = openai.OpenAI(base_url=api_base(base_url), api_key=api_key or "none",
                                     timeout=timeout, max_retries=max_retries,
                                     http_client=http_client)

    def messages(self, query: str, history: Sequence[Mapping[str, Any]] | None = None
                 ) -> list[Message]:
        """What one request sends: the system prompt (unless the history starts with its own),
        the history, and the query."""
        past = _message_copy(history)
        system = [] if not self.system or (past and past[0].get("role") == "system") \
            else [{"role": "system", "content": self.system}]
        return [*system, *past, {"role": "user", "content": query}]

    def chat(self, query: str, history: Sequence[Mapping[str, Any]] | None = None,
             **sampling: Any) -> tuple[str, list[Message]]:
        """Ask `query` after `history`; return the answer and a new history with both."""
        params = self.sampling.with_overrides(sampling)
        try:
            reply = self._client.chat.completions.create(
                model=self.model, messages=self.messages(query, history),  # type: ignore[arg-type]
                **params.request_kwargs(),
            )
        except openai.OpenAIError as exc:
            raise from_openai(exc) from exc
        if not reply.choices:
            raise FleetError("The gateway answered without a choice.")
        answer = reply.choices[0].message.content or ""
        new_history = [*_message_copy(history), {"role": "user", "content": query},
                       {"role": "assistant", "content": answer}]
        return answer, new_history

    def stream_chat(self, query: str, history: Sequence[Mapping[str, Any]] | None = None,
                    **sampling: Any) -> ChatStream:
        """Like `chat`, but the answer comes as text pieces while it is written.

        >>> with chat.stream_chat("Tell me a story", history) as stream:
        ...     for piece in stream:
        ...         print(piece, end="", flush=True)
        >>> history = stream.history
        """
        params = self.sampling.with_overrides(sampling)
        return ChatStream(self._client, self.model, self.messages(query, history),
                          _message_copy(history), query, params)

    def models(self) -> list[str]:
        """The models the gateway serves now."""
        try:
            return sorted(m.id for m in self._client.models.list())
        except openai.OpenAIError as exc:
            raise from_openai(exc) from exc

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> Chat:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()
