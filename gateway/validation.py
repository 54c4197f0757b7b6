"""Hostile input: what a request must look like before any engine work is spent on it.

Headers, body size, JSON and the gateway's limits (messages, `n`, `max_tokens`, prompt length
against the model's context) are checked here; each refusal is a 400 naming the field.

The gateway does not tokenize. The prompt check assumes no tokenizer packs more than
`prompt_chars_per_token` characters into one token on average (English prose averages about 4),
so it only catches prompts far beyond the context, cheaply. Prompts given as token ids are
counted exactly. The engine still makes the exact check and answers 400 itself.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import pydantic_core
from fastapi import Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect

from fleetcore.errors import InvalidRequestError, validation_error
from gateway.protocol import ChatCompletionRequest, CompletionRequest

GenerationRequest = ChatCompletionRequest | CompletionRequest
Model = TypeVar("Model", bound=BaseModel)

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:@/+=-]{1,128}")
_JSON_TYPES = ("application/json",)


@dataclass(frozen=True)
class InputLimits:
    max_body_bytes: int = 32 * 1024 * 1024
    max_messages: int = 1024
    max_n: int = 16
    max_tokens: int = 65536
    prompt_chars_per_token: float = 10.0
    max_header_value: int = 256


def request_id(value: str | None) -> str | None:
    """The client's X-Request-Id if it is a sane id; None if absent; 400 otherwise."""
    if value is None:
        return None
    if not _REQUEST_ID.fullmatch(value):
        raise InvalidRequestError(
            "X-Request-Id must be 1-128 characters of letters, digits and ._:@/+=-.",
            param="X-Request-Id", code="invalid_header",
        )
    return value


def check_headers(request: Request, limits: InputLimits, session_header: str) -> None:
    content_type = request.headers.get("content-type")
    if content_type is not None:
        media = content_type.split(";", 1)[0].strip().lower()
        if media not in _JSON_TYPES and not media.endswith("+json"):
            raise InvalidRequestError(
                f"Content-Type must be application/json, not '{media[:64]}'.",
                param="Content-Type", code="invalid_header",
            )
    session = request.headers.get(session_header)
    if session is not None and len(session) > limits.max_header_value:
        raise InvalidRequestError(
            f"{session_header} is longer than {limits.max_header_value} characters.",
            param=session_header, code="invalid_header",
        )


def _too_large(limit: int) -> InvalidRequestError:
    return InvalidRequestError(f"The request body is larger than {limit} bytes.",
                               code="body_too_large")


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The whole body, refused as soon as it passes `max_bytes` (also without Content-Length)."""
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > max_bytes:
        raise _too_large(max_bytes)
    # Straight from the ASGI messages, as Starlette's `Request.stream` reads them, without
    # its generator: this runs once per request. The body is read here only.
    receive = request.receive
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        if message["type"] != "http.request":
            continue
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > max_bytes:
            raise _too_large(max_bytes)
        chunks.append(chunk)
        if not message.get("more_body", False):
            return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def parse(body: bytes, schema: type[Model]) -> Model:
    """The body as `schema`: 400 for empty, non-JSON, non-object or wrongly typed input."""
    return validate(json_object(body), schema)


def json_object(body: bytes) -> dict[str, Any]:
    """The body as a JSON object: 400 for empty, non-JSON or non-object input."""
    if not body:
        raise InvalidRequestError("The request body is empty; expected a JSON object.")
    try:
        data = pydantic_core.from_json(body, allow_inf_nan=False)
    except ValueError as exc:
        raise InvalidRequestError(f"The request body is not valid JSON: {exc}.") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    return data


def validate(data: dict[str, Any], schema: type[Model]) -> Model:
    """A parsed body as `schema`: 400 for wrongly typed input."""
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def with_fields(body: bytes, data: dict[str, Any], added: dict[str, Any]) -> bytes:
    """`body` (the JSON object `data`) with the fields of `added` set.

    Fields it lacks are written in before its closing brace (a JSON object's last `}` closes
    it), so the rest goes to the engine byte for byte and nothing is encoded again; a field
    it has already is replaced, by writing the whole body anew."""
    if not data or not data.keys().isdisjoint(added):
        return pydantic_core.to_json({**data, **added})
    end = body.rindex(b"}")
    return b"".join((body[:end], b",", pydantic_core.to_json(added)[1:-1], body[end:]))


def _refuse(param: str, message: str, code: str = "limit_exceeded") -> None:
    raise InvalidRequestError(message, param=param, code=code)


def _longest_prompt(request: GenerationRequest, chars_per_token: float) -> int:
    """A lower bound on the tokens of the longest prompt in the request."""
    if isinstance(request, ChatCompletionRequest):
        return math.ceil(len(request.prompt_text()) / chars_per_token)
    prompt = request.prompt
    if isinstance(prompt, str):
        return math.ceil(len(prompt) / chars_per_token)
    longest = 0
    for p in prompt:
        if isinstance(p, int):
            return len(prompt)  # one prompt as token ids: exact
        longest = max(longest, len(p) if isinstance(p, list)
                      else math.ceil(len(p) / chars_per_token))
    return longest


def check_limits(request: GenerationRequest, limits: InputLimits,
                 max_model_len: int | None) -> None:
    """Raise a 400 naming the field if the request passes one of the gateway's limits."""
    if isinstance(request, ChatCompletionRequest):
        prompt_param, count, what = "messages", len(request.messages), "messages"
    else:
        prompt = request.prompt
        batched = isinstance(prompt, list) and not isinstance(prompt[0], int)
        prompt_param, count, what = "prompt", len(prompt) if batched else 1, "prompts"
    if count > limits.max_messages:
        _refuse(prompt_param, f"'{prompt_param}' has {count} {what}; this gateway takes at most "
                f"{limits.max_messages}.")
    if request.n is not None and request.n > limits.max_n:
        _refuse("n", f"'n' is {request.n}; this gateway allows at most {limits.max_n}.")
    out_param, out_tokens = request.output_limit()
    if out_tokens is not None and out_tokens > limits.max_tokens:
        _refuse(out_param, f"'{out_param}' is {out_tokens}; this gateway allows at most "
                f"{limits.max_tokens}.")
    if max_model_len is None:
        return
    prompt_tokens = _longest_prompt(request, limits.prompt_chars_per_token)
    if prompt_tokens > max_model_len:
        _refuse(prompt_param, f"The prompt in '{prompt_param}' is longer than the model's "
                f"context of {max_model_len} tokens (at least {prompt_tokens} tokens).",
                "context_length_exceeded")
    if out_tokens is not None and prompt_tokens + out_tokens > max_model_len:
        _refuse(out_param, f"'{out_param}' is {out_tokens}; with the prompt (at least "
                f"{prompt_tokens} tokens) that passes the model's context of {max_model_len} "
                "tokens.", "context_length_exceeded")


def _set_in(field: dict[str, Any] | None, keyword: str, value: int,
            member: Callable[[dict[str, Any]], bool]) -> None:
    if field is None:
        return
    for schema in field.get("anyOf", [field]):
        if member(schema):
            schema[keyword] = value


def describe_limits(schema: dict[str, Any], limits: InputLimits) -> None:
    """Write this gateway's limits into a request model's JSON schema, for its OpenAPI spec."""
    props = schema.get("properties", {})

    def is_int(s: dict[str, Any]) -> bool:
        return s.get("type") == "integer"

    def is_batch(s: dict[str, Any]) -> bool:
        return s.get("type") == "array" and s.get("items", {}).get("type") in ("string", "array")

    for name in ("max_tokens", "max_completion_tokens"):
        _set_in(props.get(name), "maximum", limits.max_tokens, is_int)
    _set_in(props.get("n"), "maximum", limits.max_n, is_int)
    _set_in(props.get("messages"), "maxItems", limits.max_messages,
            lambda s: s.get("type") == "array")
    _set_in(props.get("prompt"), "maxItems", limits.max_messages, is_batch)
