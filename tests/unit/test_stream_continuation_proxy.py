"""Continuation through the proxy with scripted engines: every lease settled once, whatever
fails where, and the README's list of what is not continued exactly (gateway/resume.py)."""


from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import pydantic_core
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from controller.protocol import Snapshot, WorkerRecord, WorkerState
from gateway.asgi import ClientWatch, RelayResponse
from gateway.breaker import BreakerState
from gateway.continuation import CHAT, ResumePlan, plan
from gateway.engine_client import EngineBroke, EngineClient, EngineTimeout
from gateway.metrics import GatewayMetrics
from gateway.proxy import Proxy
from gateway.reshape import Reshaper, continuation_body
from gateway.routed_request import RoutedRequest
from gateway.routing import Choice, RouteRequest
from gateway.routing_table import RoutingTable
from tests.unit.test_stream_continuation import (
    _answer,
    _events,
    _plan,
    chat_event,
    completion_event,
)

CHAT_BODY: dict[str, Any] = {"model": "m", "stream": True, "max_tokens": 10,
                             "messages": [{"role": "user", "content": "hi"}]}


# --- the proxy with scripted engines: leases settled once, whatever fails where ---

def _worker(wid: str) -> WorkerRecord:
    return WorkerRecord(worker_id=wid, engine_url=f"http://{wid}.invalid:9", model_names=["m"],
                        state=WorkerState.READY, registered_at=0.0, last_heartbeat=0.0)


class ScriptedResponse:
    def __init__(self, chunks: list[bytes], fail: BaseException | None, status: int = 200
                 ) -> None:
        self.status = status
        self.content_type = "text/event-stream"
        self.headers: list[tuple[str, str]] = []
        self._chunks = list(chunks)
        self._fail = fail
        self.closed = self.released = False
        self.read_timeout: float | None = None

    async def read_chunk(self) -> bytes:
        await asyncio.sleep(0)
        if self.closed:
            raise EngineBroke("closed")
        if self._chunks:
            return self._chunks.pop(0)
        if self._fail is not None:
            raise self._fail
        return b""

    async def read(self) -> bytes:
        parts = []
        while chunk := await self.read_chunk():
            parts.append(chunk)
        return b"".join(parts)

    def set_read_timeout(self, seconds: float) -> None:
        self.read_timeout = seconds

    def release(self) -> None:
        self.released = True

    def close(self) -> None:
        self.closed = True


TOKENS = [" a", " b", " c", " d", " e", " f"]


def generate(start: int, limit: int, stops: list[str]) -> list[tuple[str, list[int], str | None]]:
    """TOKENS from `start`, streamed as vLLM streams them: stop strings found in the output,
    which holds back the last len(longest stop) - 1 characters until the end."""
    hold = max((len(s) for s in stops), default=1) - 1
    text, emitted, out = "", 0, []
    for n, i in enumerate(range(start, len(TOKENS)), 1):
        text += TOKENS[i]
        hit = next((s for s in stops if s in text), None)
        if hit is not None:
            text = text[:text.index(hit)]
        finish = ("stop" if hit is not None or i == len(TOKENS) - 1
                  else "length" if n == limit else None)
        upto = len(text) if finish else max(emitted, len(text) - hold)
        out.append((text[emitted:upto], [10 + i], finish))
        emitted = upto
        if finish:
            break
    return out


class First:
    """Routing to the first candidate by id: the tests say which worker fails first."""

    name = "first"

    def choose(self, request: RouteRequest, candidates: Any, inflight: Any) -> Choice:
        return Choice(sorted(candidates, key=lambda w: w.worker_id)[0], "first")

    def forget(self, live_worker_ids: set[str]) -> None:
        pass


class ScriptedEngines(EngineClient):
    """Each worker answers chat from the prompt and continuations from token ids, and breaks
    after `breaks[worker]` events (None: never)."""

    def __init__(self, breaks: dict[str, int | None], failure: str,
                 refuse: frozenset[str] = frozenset()) -> None:
        super().__init__(connect_timeout=1, read_timeout=1, dead_peer_timeout=1)
        self.breaks = breaks
        self.refuse = refuse  # workers that answer a continuation with a 400
        self.failure = failure
        self.bodies: list[tuple[str, dict]] = []
        self.responses: list[ScriptedResponse] = []

    async def request(self, method: str, endpoint: Any, headers: Any,  # type: ignore[override]
                      body: Any = None) -> ScriptedResponse:
        wid = endpoint.host.split(".")[0]
        data = json.loads(body)
        self.bodies.append((wid, data))
        if endpoint.target == "/detokenize":
            text = "".join(TOKENS[t - 10] for t in data["tokens"])
            return ScriptedResponse([json.dumps({"prompt": text}).encode()], None)
        chat = endpoint.target == "/v1/chat/completions"
        if not chat and wid in self.refuse:
            return ScriptedResponse([b'{"error":{"message":"no"}}'], None, status=400)
        events = [chat_event("", None, role=True, prompt=[1, 2, 3])] if chat else []
        start = 0 if chat else len(data["prompt"]) - 3
        stop = data.get("stop") or []
        for delta, ids, finish in generate(start, data["max_tokens"], stop):
            events.append(chat_event(delta, ids, finish=finish) if chat
                          else completion_event(delta, ids, finish=finish))
        events.append(b"data: [DONE]\n\n")
        response = self._script(wid, events)
        self.responses.append(response)
        return response

    def _script(self, wid: str, events: list[bytes]) -> ScriptedResponse:
        cut = self.breaks.get(wid)
        if cut is None or cut >= len(events):
            return ScriptedResponse(events, None)
        failure: BaseException = {"broke": EngineBroke("reset"),
                                  "stall": EngineTimeout("silent")}.get(
            self.failure, EngineBroke("x"))
        if self.failure == "error_event":
            events = [*events[:cut], b'data: {"error":{"message":"boom"}}\n\n',
                      b"data: [DONE]\n\n"]
            return ScriptedResponse(events, None)
        return ScriptedResponse(events[:cut], failure)


def _run(breaks: dict[str, int | None], failure: str, max_continuations: int = 2,
         body: dict | None = None, leave_after: int | None = None,
         refuse: frozenset[str] = frozenset(),
         ) -> tuple[bytes, RoutingTable, ScriptedEngines, RoutedRequest]:
    table = RoutingTable(First())
    table.update(Snapshot(generation=1, heartbeat_interval=2, expiry=6, models=["m"],
                          workers=[_worker(w) for w in breaks]))
    engines = ScriptedEngines(breaks, failure, refuse)
    proxy = Proxy(engines, table, GatewayMetrics(table), max_attempts=1,
                  max_continuations=max_continuations)
    data = body or {**CHAT_BODY, "max_tokens": 100}
    resume = plan(CHAT, data, None, True)
    routed = RoutedRequest(request_id="r1", started=0.0, path=CHAT,
                           body=pydantic_core.to_json({**data, "return_token_ids": True}),
                           stream=True, route=RouteRequest(model="m", path=CHAT),
                           resume=resume if isinstance(resume, ResumePlan) else None)

    async def receive() -> dict:
        await asyncio.Event().wait()
        return {}

    async def scenario() -> bytes:
        watch = ClientWatch(receive)
        response = await proxy.forward(routed, watch)
        assert isinstance(response, RelayResponse)
        sent: list[bytes] = []

        async def send(message: dict) -> None:
            if leave_after is not None and len(sent) >= leave_after:
                raise OSError("the client left")
            sent.append(message.get("body", b""))

        with contextlib.suppress(OSError):
            await response({"type": "http"}, receive, send)
        return b"".join(sent)

    return asyncio.run(scenario()), table, engines, routed


def _text(out: bytes) -> str:
    return "".join(c["delta"].get("content") or "" for e in _events(out)
                   for c in e.get("choices", []))


@pytest.mark.parametrize("failure", ["broke", "stall", "error_event"])
def test_a_stream_whose_worker_fails_is_finished_by_another(failure: str) -> None:
    out, table, engines, routed = _run({"a": 3, "b": None}, failure)
    assert _text(out) == "".join(TOKENS)
    assert out.endswith(b"data: [DONE]\n\n") and b"error" not in out
    assert table.inflight == {}
    continuation = next(d for w, d in engines.bodies if d.get("prompt"))
    assert continuation["prompt"][:3] == [1, 2, 3]
    assert routed.tried == {"a", "b"}
    # Once each stream began, silence longer than the stall timeout (capped by the read
    # timeout, 1 s here) ends it.
    assert [r.read_timeout for r in engines.responses] == [1.0, 1.0]


def test_a_stream_that_cannot_be_continued_ends_with_the_error_event_as_before() -> None:
    out, table, _, _ = _run({"a": 3, "b": None}, "broke", max_continuations=0)
    events = _events(out)
    assert "error" in events[-1] and out.endswith(b"data: [DONE]\n\n")
    assert table.inflight == {}


def test_continuations_are_bounded() -> None:
    out, table, engines, _ = _run({"a": 3, "b": 1, "c": 1}, "broke", max_continuations=1)
    assert "error" in _events(out)[-1] and table.inflight == {}
    assert sum(1 for _, d in engines.bodies if "prompt" in d) == 1


def test_a_worker_that_refuses_a_continuation_is_not_taken_for_dead() -> None:
    out, table, _, _ = _run({"a": 3, "b": None, "c": None}, "broke", refuse=frozenset("b"))
    assert _text(out) == "".join(TOKENS)  # b said no; c continued it
    assert table.breakers.states().get("b", BreakerState.CLOSED) is BreakerState.CLOSED
    assert table.inflight == {}


def test_max_tokens_holds_across_the_seam() -> None:
    out, _, engines, _ = _run({"a": 3, "b": None}, "broke",
                              body={**CHAT_BODY, "max_tokens": 4})
    assert _text(out) == "".join(TOKENS[:4])
    finishes = [c["finish_reason"] for e in _events(out) for c in e["choices"]
                if c.get("finish_reason")]
    assert finishes == ["length"]


def test_a_stop_string_held_by_the_dead_engine_is_found_at_the_seam() -> None:
    # The client has " a" and the dead engine held " b" (its stop buffer is 2 characters);
    # the stop "b c" begins there and ends in the continuation, whose engine cannot see it.
    out, _, _, _ = _run({"a": 3, "b": None}, "broke",
                        body={**CHAT_BODY, "max_tokens": 100, "stop": ["b c"]})
    assert _text(out) == " a "
    finishes = [c["finish_reason"] for e in _events(out) for c in e["choices"]
                if c.get("finish_reason")]
    assert finishes == ["stop"]


def test_a_client_that_leaves_during_a_continuation_ends_it_on_the_new_worker() -> None:
    _, table, engines, _ = _run({"a": 3, "b": None}, "broke", leave_after=5)
    continuation = engines.responses[-1]
    assert engines.bodies[-1][0] == "b" and continuation.closed
    assert table.inflight == {}


@settings(max_examples=60, deadline=None)
@given(breaks=st.lists(st.one_of(st.none(), st.integers(0, 9)), min_size=1, max_size=3),
       failure=st.sampled_from(["broke", "stall", "error_event"]),
       max_continuations=st.integers(0, 3),
       leave_after=st.one_of(st.none(), st.integers(1, 12)))
def test_every_lease_is_settled_once_whatever_fails_where(
        breaks: list[int | None], failure: str, max_continuations: int,
        leave_after: int | None) -> None:
    workers = {w: b for w, b in zip("abc", breaks, strict=False)}
    out, table, engines, _ = _run(workers, failure, max_continuations,
                                  leave_after=leave_after)
    assert table.inflight == {}
    assert all(r.closed or r.released for r in engines.responses)
    if leave_after is not None:
        return
    assert out.endswith(b"data: [DONE]\n\n")
    events = _events(out)
    if "error" not in events[-1]:
        assert _text(out) == "".join(TOKENS)
        assert len([c for e in events for c in e["choices"] if c.get("finish_reason")]) == 1


# --- the README's list of what is not continued exactly, case by case ---

def test_a_stream_that_may_not_be_continued_ends_with_the_error_event_as_before() -> None:
    out, table, engines, routed = _run({"a": 3, "b": None}, "broke",
                                       body={**CHAT_BODY, "max_tokens": 100, "n": 2})
    assert routed.resume is None and "error" in _events(out)[-1]
    assert not any("prompt" in d for _, d in engines.bodies)
    assert table.inflight == {}


def test_penalties_are_carried_over_and_restart_at_the_seam() -> None:
    answer = _answer(_plan(presence_penalty=0.5, frequency_penalty=0.2,
                           repetition_penalty=1.1), [10])
    body = pydantic_core.from_json(continuation_body(answer, "m", 1))
    assert (body["presence_penalty"], body["frequency_penalty"],
            body["repetition_penalty"]) == (0.5, 0.2, 1.1)


def test_continuous_usage_is_the_whole_answers_in_every_continued_chunk() -> None:
    answer = _answer(_plan(stream_options={"include_usage": True,
                                           "continuous_usage_stats": True}), [10, 11])
    shaper = Reshaper(answer, 2, "")
    out = shaper.feed(pydantic_core.from_json(completion_event(" c", [12])[6:]))
    assert _events(out)[0]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3,
                                        "total_tokens": 6}


def test_token_ids_the_client_asked_for_continue_in_its_chunks() -> None:
    answer = _answer(_plan(return_token_ids=True), [10])
    shaper = Reshaper(answer, 1, "")
    out = shaper.feed(pydantic_core.from_json(completion_event(" b", [11])[6:]))
    assert _events(out)[0]["choices"][0]["token_ids"] == [11]
