"""A conversation with the gateway: history, one streamed answer, and errors in plain words.

Nothing here knows Gradio. A history is a list of `{"role", "content"}` dicts (user and assistant
turns, in order; the system prompt is kept apart). Every request is built from a fresh copy of
it, so a turn that fails or is stopped cannot change the history it started from.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
from collections.abc import AsyncGenerator, Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar, cast

import openai
from openai import AsyncOpenAI
from openai.types.chat import ChatCompletionMessageParam

Message = dict[str, str]
_T = TypeVar("_T")


@dataclass(frozen=True)
class Params:
    """Sampling parameters of one request."""

    temperature: float
    top_p: float
    max_tokens: int

    def as_dict(self) -> dict[str, Any]:
        return {"temperature": self.temperature, "top_p": self.top_p,
                "max_tokens": self.max_tokens}


def user(text: str) -> Message:
    return {"role": "user", "content": text}


def assistant(text: str) -> Message:
    return {"role": "assistant", "content": text}


def copy_history(history: Sequence[Message]) -> list[Message]:
    """Only the user and assistant messages, each a new dict (the chatbot may add fields)."""
    return [{"role": m["role"], "content": str(m["content"])} for m in history
            if m.get("role") in ("user", "assistant")]


def request_messages(system_prompt: str, history: Sequence[Message], text: str) -> list[Message]:
    """What one request sends: the system prompt, the whole history so far, the new message."""
    system = [{"role": "system", "content": system_prompt}] if system_prompt.strip() else []
    return [*system, *copy_history(history), user(text)]


def with_answer(history: Sequence[Message], text: str, answer: str) -> list[Message]:
    """A new history: `history` followed by this exchange."""
    return [*copy_history(history), user(text), assistant(answer)]


class NothingToRegenerate(ValueError):
    pass


def regenerate_split(history: Sequence[Message]) -> tuple[list[Message], str]:
    """The history before the last exchange, and that exchange's user message, to ask again."""
    messages = copy_history(history)
    if messages and messages[-1]["role"] == "assistant":
        messages.pop()
    if not messages or messages[-1]["role"] != "user":
        raise NothingToRegenerate("There is no answer to regenerate yet.")
    return messages[:-1], messages[-1]["content"]


def pick_model(current: str | None, served: Sequence[str]) -> tuple[list[str], str | None]:
    """Dropdown choices and value after a refresh of the served models.

    The current model stays chosen while it is served. When nothing is served at all (say its
    only worker is restarting), it stays as the one choice, so that the conversation is kept.
    """
    choices = sorted(served)
    if current in choices:
        return choices, current
    if not choices:
        return ([current], current) if current else ([], None)
    return choices, choices[0]


class Stopped(Exception):
    """The user pressed Stop."""


async def _unless_stopped(awaitable: Awaitable[_T], stop: asyncio.Event) -> _T:
    """Await `awaitable`, or cancel it as soon as `stop` is set and raise Stopped."""
    if stop.is_set():
        if asyncio.iscoroutine(awaitable):
            awaitable.close()
        raise Stopped
    work = asyncio.ensure_future(awaitable)
    stopping = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait({work, stopping}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Also on our own cancellation (the browser went away): nothing is left running.
        stopping.cancel()
        if not work.done():
            work.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await work
    if work.cancelled():
        raise Stopped
    return work.result()


async def stream_answer(
    client: AsyncOpenAI, model: str, messages: list[Message], params: Params,
    stop: asyncio.Event,
) -> AsyncGenerator[str, None]:
    """Yield the answer's text as it arrives, piece by piece, until it ends or `stop` is set.

    On Stop (or if the caller goes away) the HTTP response is closed at once: the gateway sees
    the client leave and has the engine abort the request, so no GPU time is spent on it.
    Errors are the `openai` exceptions; `describe_error` words them.
    """
    try:
        # Role and content strings: the shape the SDK's TypedDicts name, checked by the gateway.
        sdk_messages = cast("list[ChatCompletionMessageParam]", messages)
        stream = await _unless_stopped(client.chat.completions.create(
            model=model, messages=sdk_messages, stream=True, **params.as_dict(),
        ), stop)
    except Stopped:
        return
    try:
        chunks = stream.__aiter__()
        while True:
            try:
                chunk = await _unless_stopped(anext(chunks), stop)
            except (Stopped, StopAsyncIteration):
                return
            if chunk.choices and chunk.choices[0].delta.content:
                yield chunk.choices[0].delta.content
    finally:
        await stream.close()


async def list_models(client: AsyncOpenAI) -> list[str]:
    """The chat models the gateway serves: not an embedding model, whose card lists the
    endpoints it serves without chat. (A card that lists none is from another server: kept.)"""
    page = await client.models.list()
    return sorted(m.id for m in page.data
                  if CHAT_PATH in (getattr(m, "endpoints", None) or [CHAT_PATH]))


CHAT_PATH = "/v1/chat/completions"
_CONTEXT = re.compile(r"context length|max_model_len|context window|maximum context", re.I)


def _detail(exc: openai.APIError) -> str:
    body = exc.body
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and isinstance(inner.get("message"), str):
            return str(inner["message"])
    return exc.message


def describe_error(exc: BaseException, *, model: str | None, gateway_url: str) -> str:
    """One message per way a chat can fail, for the person at the browser.

    Never includes the API key: the messages are built from status codes and the gateway's own
    error text, which does not echo keys.
    """
    name = f"'{model}'" if model else "this model"
    if isinstance(exc, openai.APITimeoutError):
        return ("The gateway did not answer in time (timeout). The model may be busy or the "
                "answer too long: try again, or ask for fewer tokens.")
    if isinstance(exc, openai.APIConnectionError):
        return (f"Cannot reach the gateway at {gateway_url}. Is it running? "
                "Try again once it is up.")
    if isinstance(exc, openai.AuthenticationError):
        return ("The gateway refused the API key (401). Set the right key with --api-key or "
                "FLEET_WEBUI_API_KEY and restart the web UI.")
    if isinstance(exc, openai.PermissionDeniedError):
        return "The gateway does not allow this API key to use the model (403)."
    if isinstance(exc, openai.APIStatusError):
        detail = _detail(exc)
        if exc.code == "no_worker_available" or exc.status_code == 503:
            return (f"No worker is serving {name} right now (503). Workers may be starting or "
                    "restarting: try again in a few seconds, or press ↻ to refresh the models.")
        if exc.code == "model_not_found" or exc.status_code == 404:
            return f"The gateway does not know {name} (404). Press ↻ to refresh the models."
        if exc.status_code == 429:
            return "The gateway is overloaded (429). Wait a moment and try again."
        if exc.status_code == 400 and _CONTEXT.search(detail):
            return (f"The conversation is too long for the context of {name}: {detail} "
                    "Clear the conversation, or lower the max output tokens.")
        if exc.status_code == 400:
            return f"The gateway rejected the request (400): {detail}"
        return f"The gateway answered with an error ({exc.status_code}): {detail}"
    if isinstance(exc, openai.APIError):
        # An error event in the middle of a stream: the worker failed while answering.
        return f"The answer was cut off by an error: {_detail(exc)} Press Regenerate to retry."
    return f"Unexpected error ({type(exc).__name__}): {exc}"
