"""The web UI's conversation logic: history copies, streaming with Stop, and error messages.

Requests go through the real `openai` client into a mock HTTP transport, so the errors are the
ones the client really raises for each gateway answer.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Coroutine
from typing import Any

import openai
import pytest

try:  # The HTTP library under the openai client: httpx2 since openai 3, httpx before.
    import httpx2
except ImportError:  # pragma: no cover
    import httpx as httpx2  # type: ignore[no-redef]

from webui import chat
from webui.chat import Params

GATEWAY = "http://gateway.test:8000"
PARAMS = Params(temperature=0.0, top_p=0.9, max_tokens=64)
HISTORY = [chat.user("What is the capital of France?"), chat.assistant("Paris.")]

Handler = Callable[[httpx2.Request], Coroutine[Any, Any, httpx2.Response]]


def client_for(handler: Handler) -> openai.AsyncOpenAI:
    transport = httpx2.MockTransport(handler)
    return openai.AsyncOpenAI(
        base_url=f"{GATEWAY}/v1", api_key="sk-secret-key", max_retries=0,
        http_client=openai.DefaultAsyncHttpxClient(transport=transport),
    )


def sse(*pieces: str) -> bytes:
    events = [{"id": "c", "object": "chat.completion.chunk", "created": 0, "model": "m",
               "choices": [{"index": 0, "delta": {"content": p}, "finish_reason": None}]}
              for p in pieces]
    return b"".join(f"data: {json.dumps(e)}\n\n".encode() for e in events) + b"data: [DONE]\n\n"


def error(status: int, message: str, code: str | int | None = None) -> Handler:
    async def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(status, json={"error": {
            "message": message, "type": "invalid_request_error", "param": None, "code": code}})
    return handler


async def collect(client: openai.AsyncOpenAI, stop: asyncio.Event | None = None,
                  messages: list[chat.Message] | None = None) -> list[str]:
    messages = messages or chat.request_messages("Be brief.", HISTORY, "And of Italy?")
    return [p async for p in chat.stream_answer(client, "m", messages, PARAMS,
                                                 stop or asyncio.Event())]


# --- history ------------------------------------------------------------------------------------

def test_a_request_carries_the_system_prompt_the_whole_history_and_the_new_message() -> None:
    messages = chat.request_messages("Be brief.", HISTORY, "And of Italy?")
    assert messages == [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ]


def test_each_request_gets_its_own_copy_of_the_history() -> None:
    history = [dict(m) for m in HISTORY]
    messages = chat.request_messages("", history, "And of Italy?")
    messages[0]["content"] = "changed"
    messages.append(chat.assistant("Rome."))
    assert history == HISTORY
    assert messages[0] is not history[0]


def test_an_empty_system_prompt_is_left_out_and_chatbot_extras_are_dropped() -> None:
    shown = [{"role": "user", "content": "hi", "metadata": {"title": "x"}, "options": []}]
    assert chat.request_messages("  ", shown, "again") == [chat.user("hi"), chat.user("again")]


def test_with_answer_builds_a_new_history() -> None:
    history = list(HISTORY)
    new = chat.with_answer(history, "And of Italy?", "Rome.")
    assert new == [*HISTORY, chat.user("And of Italy?"), chat.assistant("Rome.")]
    assert history == HISTORY


def test_regenerate_asks_the_last_question_again_without_its_answer() -> None:
    history = [*HISTORY, chat.user("And of Italy?"), chat.assistant("Milan.")]
    before, text = chat.regenerate_split(history)
    assert before == HISTORY
    assert text == "And of Italy?"
    assert len(history) == 4


def test_regenerate_with_nothing_asked_yet_is_refused() -> None:
    with pytest.raises(chat.NothingToRegenerate):
        chat.regenerate_split([])


@pytest.mark.parametrize("current, served, expected", [
    (None, ["b", "a"], (["a", "b"], "a")),
    ("b", ["a", "b"], (["a", "b"], "b")),
    ("gone", ["a"], (["a"], "a")),
    # Its only worker is restarting: keep the model (and so the conversation).
    ("m", [], (["m"], "m")),
    (None, [], ([], None)),
])
def test_pick_model(current: str | None, served: list[str],
                    expected: tuple[list[str], str | None]) -> None:
    assert chat.pick_model(current, served) == expected


# --- streaming ----------------------------------------------------------------------------------

def test_the_answer_streams_piece_by_piece_and_the_request_holds_history_and_params() -> None:
    seen: list[dict[str, Any]] = []

    async def handler(request: httpx2.Request) -> httpx2.Response:
        seen.append(json.loads(request.content))
        return httpx2.Response(200, headers={"content-type": "text/event-stream"},
                               content=sse("Rome", " is", " the capital."))

    pieces = asyncio.run(collect(client_for(handler)))
    assert pieces == ["Rome", " is", " the capital."]
    (body,) = seen
    assert body["stream"] is True
    assert body["messages"] == chat.request_messages("Be brief.", HISTORY, "And of Italy?")
    assert (body["temperature"], body["top_p"], body["max_tokens"]) == (0.0, 0.9, 64)


class EndlessAnswer(httpx2.AsyncByteStream):
    """An engine far from done: one piece, then silence; notes when the client hangs up."""

    def __init__(self) -> None:
        self.closed = asyncio.Event()

    async def __aiter__(self) -> AsyncIterator[bytes]:
        yield sse("Once")[: -len(b"data: [DONE]\n\n")]
        await asyncio.Event().wait()

    async def aclose(self) -> None:
        self.closed.set()


@pytest.mark.parametrize("while_waiting", [True, False],
                         ids=["stop-while-waiting-for-a-token", "stop-between-tokens"])
def test_stop_ends_the_answer_at_once_and_closes_the_connection(while_waiting: bool) -> None:
    answer = EndlessAnswer()

    async def handler(request: httpx2.Request) -> httpx2.Response:
        return httpx2.Response(200, headers={"content-type": "text/event-stream"},
                               stream=answer)

    async def scenario() -> list[str]:
        stop = asyncio.Event()
        pieces = []
        async for piece in chat.stream_answer(client_for(handler), "m", [chat.user("story")],
                                              PARAMS, stop):
            pieces.append(piece)
            if while_waiting:
                asyncio.get_running_loop().call_later(0.1, stop.set)
            else:
                stop.set()
        # The gateway sees the client go, and has the engine abort the request.
        await asyncio.wait_for(answer.closed.wait(), 1)
        return pieces

    assert asyncio.run(asyncio.wait_for(scenario(), 5)) == ["Once"]


def test_stop_before_the_gateway_answers_gives_up_the_request() -> None:
    async def handler(request: httpx2.Request) -> httpx2.Response:
        await asyncio.Event().wait()  # queued behind busy workers
        raise AssertionError("unreachable")

    async def scenario() -> list[str]:
        stop = asyncio.Event()
        asyncio.get_running_loop().call_later(0.1, stop.set)
        return await collect(client_for(handler), stop)

    assert asyncio.run(asyncio.wait_for(scenario(), 5)) == []


def test_a_stopped_or_failed_turn_leaves_the_history_as_it_was() -> None:
    history = [dict(m) for m in HISTORY]
    messages = chat.request_messages("", history, "Next?")

    with pytest.raises(openai.InternalServerError):
        asyncio.run(collect(client_for(error(503, "none", "no_worker_available")),
                            messages=messages))
    stop = asyncio.Event()
    stop.set()
    assert asyncio.run(collect(client_for(error(500, "unused")), stop, messages)) == []
    assert history == HISTORY


def test_list_models_is_sorted_and_leaves_out_models_without_chat() -> None:
    async def handler(request: httpx2.Request) -> httpx2.Response:
        assert request.url.path == "/v1/models"
        assert request.headers["authorization"] == "Bearer sk-secret-key"
        return httpx2.Response(200, json={"object": "list", "data": [
            {"id": "b", "object": "model", "created": 0, "owned_by": "fleet",
             "endpoints": ["/tokenize", "/v1/chat/completions"]},
            {"id": "embed", "object": "model", "created": 0, "owned_by": "fleet",
             "endpoints": ["/tokenize", "/v1/embeddings"]},
            # Another server's card says nothing of endpoints: shown.
            {"id": "a", "object": "model", "created": 0, "owned_by": "fleet"}]})

    assert asyncio.run(chat.list_models(client_for(handler))) == ["a", "b"]


# --- errors -------------------------------------------------------------------------------------

def failure_of(handler: Handler) -> BaseException:
    with pytest.raises(openai.OpenAIError) as info:
        asyncio.run(collect(client_for(handler)))
    return info.value


def message_for(handler: Handler) -> str:
    return chat.describe_error(failure_of(handler), model="SmolLM2", gateway_url=GATEWAY)


def raising(exc: type[Exception]) -> Handler:
    async def handler(request: httpx2.Request) -> httpx2.Response:
        raise exc("boom", request=request)
    return handler


async def mid_stream_error(request: httpx2.Request) -> httpx2.Response:
    # What the gateway sends when the worker dies in the middle of an answer.
    failure = {"error": {"message": "The worker failed mid-stream.", "type": "server_error",
                         "param": None, "code": "upstream_error"}}
    content = sse("Par")[: -len(b"data: [DONE]\n\n")] + \
        f"data: {json.dumps(failure)}\n\ndata: [DONE]\n\n".encode()
    return httpx2.Response(200, headers={"content-type": "text/event-stream"}, content=content)


CONTEXT_400 = ("This model's maximum context length is 4096 tokens. However, your prompt "
               "contains 5000 input tokens, which exceeds this limit even without any output "
               "tokens. Please reduce the length of the input prompt.")


@pytest.mark.parametrize("handler, expected", [
    (error(503, "No worker is available for model 'SmolLM2' right now.", "no_worker_available"),
     "No worker is serving 'SmolLM2' right now (503)"),
    (error(401, "Invalid API key.", "invalid_api_key"), "refused the API key (401)"),
    (raising(httpx2.ConnectError), f"Cannot reach the gateway at {GATEWAY}"),
    (raising(httpx2.ReadTimeout), "did not answer in time (timeout)"),
    (error(400, CONTEXT_400, 400), "too long for the context of 'SmolLM2': This model's maximum"),
    (error(400, "'max_tokens' is too large: 9000. max_model_len is 4096.", 400),
     "too long for the context of 'SmolLM2'"),
    (error(404, "The model 'SmolLM2' does not exist.", "model_not_found"),
     "does not know 'SmolLM2' (404)"),
    (error(429, "Overloaded.", "overloaded"), "overloaded (429)"),
    (error(400, "messages: field required", None), "rejected the request (400): messages"),
    (error(500, "Internal error.", None), "an error (500): Internal error."),
    (mid_stream_error, "cut off by an error: The worker failed mid-stream."),
], ids=["no-worker", "bad-key", "unreachable", "timeout", "context", "context-max-tokens",
        "unknown-model", "overloaded", "bad-request", "server-error", "mid-stream"])
def test_each_failure_has_its_own_message(handler: Handler, expected: str) -> None:
    text = message_for(handler)
    assert expected in text
    assert "sk-secret-key" not in text


def test_every_message_is_different() -> None:
    handlers = [error(503, "x", "no_worker_available"), error(401, "x"),
                raising(httpx2.ConnectError), raising(httpx2.ReadTimeout),
                error(400, CONTEXT_400), error(404, "x", "model_not_found")]
    texts = {message_for(h).split(":")[0].split("(")[0] for h in handlers}
    assert len(texts) == len(handlers)


def test_an_unexpected_exception_still_gets_a_message() -> None:
    text = chat.describe_error(RuntimeError("kaput"), model=None, gateway_url=GATEWAY)
    assert text == "Unexpected error (RuntimeError): kaput"
