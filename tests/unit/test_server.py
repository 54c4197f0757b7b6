"""The gateway's writes: uvicorn's protocol with the head written with the first body bytes
(gateway/server.py), byte for byte what uvicorn writes, in fewer writes; the relay ending a
stream with its [DONE]; a body's added fields written into it as it came."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from uvicorn.config import Config
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
from uvicorn.server import ServerState

from controller.protocol import Snapshot
from gateway import validation
from gateway.asgi import ClientGone, ClientWatch, RelayResponse
from gateway.breaker import BreakerState
from gateway.continuation import CHAT, ResumePlan, plan
from gateway.engine_client import EngineBroke, EngineClient
from gateway.metrics import GatewayMetrics
from gateway.proxy import Proxy
from gateway.routed_request import RoutedRequest
from gateway.routing import RouteRequest
from gateway.routing_table import RoutingTable
from gateway.server import FleetHttpProtocol
from tests.unit.test_stream_continuation import chat_event
from tests.unit.test_stream_continuation_proxy import CHAT_BODY, First, ScriptedResponse, _worker

App = Callable[[Any, Any, Any], Awaitable[None]]
REQUEST = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}"


class Transport:
    """What uvicorn's protocol needs of a transport, keeping every write apart."""

    def __init__(self) -> None:
        self.writes: list[bytes] = []
        self.closed = False
        self.written = asyncio.Event()

    def write(self, data: bytes) -> None:
        assert not self.closed, "written after close"
        self.writes.append(bytes(data))
        self.written.set()

    def close(self) -> None:
        self.closed = True

    def is_closing(self) -> bool:
        return self.closed

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"sockname": ("127.0.0.1", 8000), "peername": ("127.0.0.1", 50000)}.get(
            name, default)

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


async def _serve(protocol: type[HttpToolsProtocol], app: App, data: bytes,
                 between: Callable[[Transport], Awaitable[None]] | None = None) -> Transport:
    config = Config(app, lifespan="off", proxy_headers=False, log_level="warning")
    config.load()
    state = ServerState()
    server = protocol(config, state, {})
    transport = Transport()
    server.connection_made(transport)  # type: ignore[arg-type]
    server.data_received(data)
    if between is not None:
        await between(transport)
    async with asyncio.timeout(5):
        while state.tasks:
            await asyncio.gather(*state.tasks)
        for _ in range(3):  # the head's flush, if one is due, runs on the loop's next turn
            await asyncio.sleep(0)
    return transport


async def streamed(scope: Any, receive: Any, send: Any) -> None:
    await receive()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/event-stream")]})
    await send({"type": "http.response.body", "body": b"data: 1\n\n", "more_body": True})
    await send({"type": "http.response.body", "body": b"data: [DONE]\n\n",
                "more_body": False})


def _both(app: App, data: bytes = REQUEST) -> tuple[Transport, Transport]:
    async def run() -> tuple[Transport, Transport]:
        return (await _serve(HttpToolsProtocol, app, data),
                await _serve(FleetHttpProtocol, app, data))
    return asyncio.run(run())


def test_the_head_goes_out_with_the_first_body_bytes_as_uvicorn_writes_them() -> None:
    stock, ours = _both(streamed)
    head, first, last = stock.writes  # the last chunk comes with the terminator
    assert ours.writes == [head + first, last]
    assert last.endswith(b"data: [DONE]\n\n\r\n0\r\n\r\n")


def test_a_stream_relayed_whole_at_once_is_one_write() -> None:
    async def whole(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"data: [DONE]\n\n",
                    "more_body": False})

    stock, ours = _both(whole)
    assert len(stock.writes) == 2 and ours.writes == [b"".join(stock.writes)]


@pytest.mark.parametrize("close", [False, True])
def test_a_plain_answer_is_one_write_and_connection_close_still_closes(close: bool) -> None:
    async def plain(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 404,
                    "headers": [(b"content-length", b"2")]})
        await send({"type": "http.response.body", "body": b"{}"})

    request = REQUEST.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n") \
        if close else REQUEST
    stock, ours = _both(plain, request)
    assert ours.writes == [b"".join(stock.writes)]
    assert ours.closed is stock.closed is close


def test_pipelined_requests_are_answered_in_order_as_uvicorn_does() -> None:
    stock, ours = _both(streamed, REQUEST * 3)
    assert b"".join(ours.writes) == b"".join(stock.writes)
    assert b"".join(ours.writes).count(b"HTTP/1.1 200 OK") == 3
    assert len(ours.writes) == 6 and len(stock.writes) == 9


def test_a_head_without_a_body_yet_goes_out_on_the_loops_next_turn() -> None:
    """The head waits for nothing but the rest of the step: an engine slow to send its first
    chunk does not delay the client's headers."""
    go = asyncio.Event()

    async def slow(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await go.wait()
        await send({"type": "http.response.body", "body": b"late", "more_body": False})

    async def between(transport: Transport) -> None:
        async with asyncio.timeout(5):
            await transport.written.wait()
        assert transport.writes[0].startswith(b"HTTP/1.1 200 OK")
        assert transport.writes[0].endswith(b"\r\n\r\n")  # the head alone
        go.set()

    async def run() -> Transport:
        return await _serve(FleetHttpProtocol, slow, REQUEST, between)

    ours = asyncio.run(run())
    assert len(ours.writes) == 2 and ours.writes[1] == b"4\r\nlate\r\n0\r\n\r\n"


def test_a_client_gone_before_the_flush_gets_nothing_written() -> None:
    servers: list[FleetHttpProtocol] = []

    class Server(FleetHttpProtocol):
        def connection_made(self, transport: Any) -> None:
            servers.append(self)
            super().connection_made(transport)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        servers[0].connection_lost(None)  # the client leaves within the same step
        await send({"type": "http.response.body", "body": b"x", "more_body": False})

    async def run() -> Transport:
        return await _serve(Server, app, REQUEST)

    assert asyncio.run(run()).writes == []


@pytest.mark.parametrize("protocol", [HttpToolsProtocol, FleetHttpProtocol])
def test_a_client_that_leaves_is_seen_by_the_watch_under_either_server(
        protocol: type[HttpToolsProtocol]) -> None:
    """Under stock uvicorn a task waits for `http.disconnect`; under ours the cycle calls
    back. Either way: a wait on the engine is cancelled as ClientGone, an `on_gone` callback
    runs once, and after `close` nothing runs."""
    servers: list[HttpToolsProtocol] = []
    seen: list[str] = []

    class Server(protocol):  # type: ignore[valid-type,misc]
        def connection_made(self, transport: Any) -> None:
            servers.append(self)
            super().connection_made(transport)

    async def app(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        watch = ClientWatch(receive)
        watch.on_gone(lambda: seen.append("gone"))
        closed = ClientWatch(receive)
        closed.on_gone(lambda: seen.append("closed one ran"))
        closed.close()
        asyncio.get_running_loop().call_later(0.01, servers[0].connection_lost, None)
        try:
            await watch.guard(asyncio.sleep(5))
        except ClientGone:
            seen.append("ClientGone")
        assert watch.gone and not closed.gone
        late: list[str] = []
        watch.on_gone(lambda: late.append("late"))  # already gone: runs soon
        await asyncio.sleep(0)
        seen.extend(late)

    async def run() -> Transport:
        return await _serve(Server, app, REQUEST)

    asyncio.run(run())
    assert sorted(seen) == ["ClientGone", "gone", "late"]


def test_an_app_that_fails_after_the_head_closes_the_connection_unwritten() -> None:
    async def failing(scope: Any, receive: Any, send: Any) -> None:
        await receive()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        raise RuntimeError("the app broke")

    stock, ours = _both(failing)
    assert stock.closed and ours.closed
    assert ours.writes == []  # uvicorn wrote the head it could not finish; nothing here


# --- the relay: a stream's [DONE] goes out with the response's end ---

class HeldEnd(ScriptedResponse):
    """Sends its events at once, then holds the end of its body (the chunked terminator, in a
    real engine's answer) until `end` is set; then it ends, or breaks."""

    def __init__(self, events: list[bytes], breaks: bool) -> None:
        super().__init__(events, None)
        self.end = asyncio.Event()
        self.breaks = breaks

    async def read_chunk(self) -> bytes:
        if self._chunks:
            return b"".join(self._chunks.pop(0) for _ in range(len(self._chunks)))
        await self.end.wait()
        if self.breaks:
            raise EngineBroke("reset after [DONE]")
        return b""

    def close(self) -> None:
        if not self.released:  # as EngineResponse: a connection given back is not its own
            self.closed = True


class OneEngine(EngineClient):
    def __init__(self, response: HeldEnd) -> None:
        super().__init__(connect_timeout=1, read_timeout=1, dead_peer_timeout=1)
        self.response = response

    async def request(self, *args: Any, **kwargs: Any) -> HeldEnd:  # type: ignore[override]
        return self.response


@pytest.mark.parametrize("continuable", [True, False])
@pytest.mark.parametrize("breaks", [False, True])
def test_the_done_event_ends_the_response_before_the_engines_body_ends(
        continuable: bool, breaks: bool) -> None:
    events = [chat_event("", None, role=True, prompt=[1, 2]),
              chat_event(" a", [10], finish="stop"), b"data: [DONE]\n\n"]
    engine = HeldEnd(events, breaks)
    table = RoutingTable(First())
    table.update(Snapshot(generation=1, heartbeat_interval=2, expiry=6, models=["m"],
                          workers=[_worker("a")]))
    proxy = Proxy(OneEngine(engine), table, GatewayMetrics(table), max_attempts=1)
    resume = plan(CHAT, CHAT_BODY, None, True)
    assert isinstance(resume, ResumePlan)
    routed = RoutedRequest(request_id="r1", started=0.0, path=CHAT, stream=True,
                           body=json.dumps(CHAT_BODY).encode(),
                           route=RouteRequest(model="m", path=CHAT),
                           resume=resume if continuable else None)
    messages: list[dict[str, Any]] = []
    in_flight_at_end: list[dict[str, int]] = []

    async def receive() -> dict[str, Any]:
        await asyncio.Event().wait()
        return {}

    async def send(message: Any) -> None:
        messages.append(message)
        if message["type"] == "http.response.body" and not message["more_body"]:
            in_flight_at_end.append(dict(table.inflight))
            engine.end.set()  # the engine's terminator comes only after the client's end

    async def scenario() -> None:
        response = await proxy.forward(routed, ClientWatch(receive))
        assert isinstance(response, RelayResponse)
        await response({"type": "http"}, receive, send)

    asyncio.run(scenario())
    bodies = [m for m in messages if m["type"] == "http.response.body"]
    assert [m["more_body"] for m in bodies][-1] is False
    assert sum(not m["more_body"] for m in bodies) == 1  # nothing after the end
    assert bodies[-1]["body"].endswith(b"data: [DONE]\n\n")
    assert b"error" not in b"".join(m["body"] for m in bodies)
    assert in_flight_at_end == [{"a": 1}]  # the client had it all while the engine went on
    assert table.inflight == {}
    # The answer was whole: an engine that breaks after its [DONE] is not taken for failed,
    # and its connection goes back (to the pool, where an unfinished one is dropped).
    assert table.breakers.states().get("a", BreakerState.CLOSED) is BreakerState.CLOSED
    assert engine.released and not engine.closed


@given(st.dictionaries(st.sampled_from(["model", "stream", "n", "stream_options", "x"]),
                       st.one_of(st.none(), st.booleans(), st.integers(), st.text()),
                       min_size=1),
       st.dictionaries(st.sampled_from(["stream_options", "return_token_ids"]),
                       st.one_of(st.booleans(), st.just({"include_usage": True})), min_size=1),
       st.sampled_from(["", " ", "\n  "]))
def test_fields_are_added_to_a_body_as_it_came(data: dict[str, Any], added: dict[str, Any],
                                               space: str) -> None:
    body = (json.dumps(data, indent=1 if space else None) + space).encode()
    out = validation.with_fields(body, data, added)
    assert json.loads(out) == {**data, **added}
    if not set(added) & set(data):  # written in, the rest byte for byte
        assert out.startswith(body[:body.rindex(b"}")])
