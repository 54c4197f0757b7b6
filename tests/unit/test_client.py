"""The Python client: typed errors from the gateway's error bodies, history copies, sampling.

Requests go through the real `openai` client into a mock HTTP transport that answers with the
bodies the gateway builds itself (`fleetcore.errors`), so the mapping is checked against the real
thing on both ends. The real gateway is in tests/integration/test_client.py.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Callable
from typing import Any

import openai
import pytest

try:  # The HTTP library under the openai client: httpx2 since openai 3, httpx before.
    import httpx2
except ImportError:  # pragma: no cover
    import httpx as httpx2  # type: ignore[no-redef]

from fleet.client import (
    AuthenticationError,
    BadGatewayError,
    BadRequestError,
    Chat,
    FleetAPIError,
    GatewayTimeoutError,
    GatewayUnreachableError,
    ModelNotFoundError,
    NoWorkerError,
    OverloadedError,
    PermissionDeniedError,
    StreamError,
    api_base,
)
from fleetcore import errors as server
from fleetcore.errors import OverloadedError as GatewayOverloaded

Handler = Callable[[httpx2.Request], httpx2.Response]
HISTORY = [{"role": "user", "content": "What is the capital of France?"},
           {"role": "assistant", "content": "Paris."}]


def chat_for(handler: Handler, **kw: Any) -> Chat:
    client = openai.DefaultHttpxClient(transport=httpx2.MockTransport(handler))
    return Chat("http://gateway.test:8000", "sk-test", "m", max_retries=0, http_client=client,
                **kw)


def completion(text: str) -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion", "created": 0, "model": "m",
            "choices": [{"index": 0, "finish_reason": "stop",
                         "message": {"role": "assistant", "content": text}}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6}}


def sse(*events: dict[str, Any]) -> bytes:
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


def chunk(text: str | None, finish: str | None = None) -> dict[str, Any]:
    return {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
            "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": finish}]}


def answering(status: int, body: dict[str, Any], headers: dict[str, str] | None = None
              ) -> Handler:
    return lambda request: httpx2.Response(status, json=body, headers=headers)


@pytest.mark.parametrize("exc, expected", [
    (server.InvalidRequestError("bad 'messages'", param="messages"), BadRequestError),
    (server.AuthenticationError("The API key is not valid."), AuthenticationError),
    (server.NotFoundError("No model 'x'.", code="model_not_found"), ModelNotFoundError),
    (GatewayOverloaded("busy", headers={"Retry-After": "2"}), OverloadedError),
    (server.BadGatewayError("engine failed"), BadGatewayError),
    (server.ServiceUnavailableError("no worker", code="no_worker_available",
                                    headers={"Retry-After": "1"}), NoWorkerError),
    (server.GatewayTimeoutError("engine silent"), GatewayTimeoutError),
])
def test_each_gateway_error_becomes_its_own_class(exc: server.FleetError,
                                                  expected: type[FleetAPIError]) -> None:
    headers = {**exc.headers, "x-request-id": "req-7"}
    chat = chat_for(answering(exc.status_code, exc.body(), headers))
    with pytest.raises(expected) as info:
        chat.chat("Hi")
    error = info.value
    assert error.status_code == exc.status_code
    assert error.message == exc.message
    assert error.code == exc.code and error.param == exc.param
    assert error.request_id == "req-7"
    assert error.retryable == (exc.status_code >= 429)
    if "Retry-After" in exc.headers:
        assert error.retry_after == float(exc.headers["Retry-After"])
    assert isinstance(error.__cause__, openai.APIStatusError)


def test_403_is_permission_denied() -> None:
    body = {"error": {"message": "not for you", "type": "permission_error", "param": None,
                      "code": "forbidden"}}
    with pytest.raises(PermissionDeniedError, match="not for you"):
        chat_for(answering(403, body)).chat("Hi")


def test_an_unreachable_gateway_is_its_own_error() -> None:
    def refuse(request: httpx2.Request) -> httpx2.Response:
        raise httpx2.ConnectError("connection refused")

    with pytest.raises(GatewayUnreachableError) as info:
        chat_for(refuse).chat("Hi")
    assert info.value.retryable and info.value.status_code is None


def test_chat_returns_a_new_history_and_leaves_the_callers_alone() -> None:
    sent: list[dict[str, Any]] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        sent.append(json.loads(request.content))
        return httpx2.Response(200, json=completion("Rome."))

    chat = chat_for(handler, system="Be brief.")
    before = copy.deepcopy(HISTORY)
    answer, history = chat.chat("And of Italy?", HISTORY)
    assert answer == "Rome."
    assert HISTORY == before
    assert history == [*before, {"role": "user", "content": "And of Italy?"},
                       {"role": "assistant", "content": "Rome."}]
    history[0]["content"] = "changed"
    assert HISTORY == before  # the new history shares no dict with the old one
    assert sent[0]["messages"] == [{"role": "system", "content": "Be brief."}, *before,
                                   {"role": "user", "content": "And of Italy?"}]


def test_sampling_defaults_and_per_call_overrides_reach_the_request() -> None:
    sent: list[dict[str, Any]] = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        sent.append(json.loads(request.content))
        return httpx2.Response(200, json=completion("ok"))

    chat = chat_for(handler, temperature=0.2, top_p=0.9, max_tokens=64, stop=["\n\n"],
                    extra_body={"top_k": 20})
    chat.chat("Hi")
    chat.chat("Hi", temperature=0.0, max_tokens=8, stop="END")
    assert {k: sent[0][k] for k in ("temperature", "top_p", "max_tokens", "stop", "top_k")} == \
        {"temperature": 0.2, "top_p": 0.9, "max_tokens": 64, "stop": ["\n\n"], "top_k": 20}
    assert (sent[1]["temperature"], sent[1]["max_tokens"], sent[1]["stop"]) == (0.0, 8, "END")
    with pytest.raises(TypeError, match="tempreature"):
        chat.chat("Hi", tempreature=1)


def test_a_history_with_its_own_system_prompt_keeps_it() -> None:
    chat = chat_for(answering(200, completion("x")), system="Default.")
    messages = chat.messages("Q", [{"role": "system", "content": "Mine."}])
    assert [m["content"] for m in messages] == ["Mine.", "Q"]


def test_stream_yields_pieces_then_knows_the_history() -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        assert json.loads(request.content)["stream"] is True
        return httpx2.Response(200, content=sse(chunk("Ro"), chunk("me."), chunk(None, "stop")),
                               headers={"content-type": "text/event-stream"})

    stream = chat_for(handler).stream_chat("And of Italy?", HISTORY)
    assert list(stream) == ["Ro", "me."]
    assert stream.finish_reason == "stop"
    assert stream.history[-1] == {"role": "assistant", "content": "Rome."}
    assert len(HISTORY) == 2


def test_an_error_event_mid_stream_is_a_stream_error_and_keeps_the_part_so_far() -> None:
    error = {"error": {"message": "worker died", "type": "server_error", "code": "upstream"}}

    def handler(request: httpx2.Request) -> httpx2.Response:
        body = f"data: {json.dumps(chunk('Ro'))}\n\ndata: {json.dumps(error)}\n\n"
        return httpx2.Response(200, content=body.encode(),
                               headers={"content-type": "text/event-stream"})

    stream = chat_for(handler).stream_chat("And of Italy?")
    pieces = []
    with pytest.raises(StreamError, match="worker died"):
        for piece in stream:
            pieces.append(piece)
    assert pieces == ["Ro"]
    assert stream.history[-1]["content"] == "Ro"


def test_a_stream_that_never_started_leaves_the_history_as_it_was() -> None:
    exc = server.ServiceUnavailableError("no worker")
    stream = chat_for(answering(503, exc.body())).stream_chat("Hi", HISTORY)
    with pytest.raises(NoWorkerError):
        next(stream)
    assert stream.history == HISTORY


@pytest.mark.parametrize("url", ["http://g:8000", "http://g:8000/", "http://g:8000/v1",
                                 "http://g:8000/v1/"])
def test_base_url_with_or_without_v1(url: str) -> None:
    assert api_base(url) == "http://g:8000/v1"
