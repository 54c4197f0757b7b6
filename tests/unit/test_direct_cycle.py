"""The generation routes served without ASGI (gateway/server.py `DirectCycle`): the same bytes
as stock uvicorn serving the same app over ASGI, in the writes of tests/unit/test_server.py;
flow control and a client that leaves; and `python -m gateway` (what `fleet up` and `make run`
start) serving them this way."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from starlette.responses import Response
from uvicorn.config import Config

from fleetcore.errors import NotFoundError
from gateway import __main__ as gateway_main
from gateway import validation
from gateway.asgi import ClientGone, ClientWatch, FinalChunk, GenerateRoutes, RelayResponse
from gateway.server import FleetHttpProtocol
from tests.unit.test_server import REQUEST, Transport, _both, _serve


async def _fallback(scope: Any, receive: Any, send: Any) -> None:
    """What GenerateRoutes leaves to the app: here a plain 200 naming the path."""
    await receive()
    body = scope["path"].encode()
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


async def _events(events: list[bytes], final: bool = True) -> AsyncIterator[bytes]:
    for i, event in enumerate(events):
        yield FinalChunk(event) if final and i == len(events) - 1 else event


def _front(handler: Any) -> GenerateRoutes:
    return GenerateRoutes(_fallback, {"/v1/chat/completions": handler})


def _relaying(events: list[bytes], closed: list[str], final: bool = True) -> Any:
    async def handler(request: Any) -> RelayResponse:
        assert request.headers["host"] == "x"
        assert json.loads(await validation.read_body(request, 1 << 20)) == {}
        return RelayResponse(_events(events, final), 200, {"X-Request-Id": "r1"},
                             "text/event-stream", on_close=lambda: closed.append("closed"))
    return handler


@pytest.mark.parametrize("final", [True, False])
def test_a_relayed_stream_is_written_as_uvicorn_writes_it_without_asgi(final: bool) -> None:
    closed: list[str] = []
    events = [b"data: 1\n\n", b"data: 2\n\n", b"data: [DONE]\n\n"]
    stock, ours = _both(_front(_relaying(events, closed, final)))
    assert b"".join(ours.writes) == b"".join(stock.writes)
    assert b"x-request-id: r1\r\n" in ours.writes[0]
    assert ours.writes[0].startswith(b"HTTP/1.1 200 OK") and b"data: 1" in ours.writes[0]
    # The last event with the terminator, when the relay says it is the last.
    assert len(ours.writes) == (3 if final else 4)
    assert closed == ["closed", "closed"]  # once per server: the close callbacks ran


def test_a_plain_answer_or_an_error_is_uvicorns_bytes_in_one_write_without_asgi() -> None:
    async def plain(request: Any) -> Response:
        return Response(b'{"ok":1}', 200, media_type="application/json")

    async def refused(request: Any) -> Response:
        raise NotFoundError("No such model.", param="model")

    async def broken(request: Any) -> Response:
        raise RuntimeError("a bug")

    for handler, status in ((plain, b"200"), (refused, b"404"), (broken, b"500")):
        stock, ours = _both(_front(handler))
        assert ours.writes == [b"".join(stock.writes)]
        assert ours.writes[0].startswith(b"HTTP/1.1 " + status)
    body = ours.writes[0].partition(b"\r\n\r\n")[2]
    assert json.loads(body)["error"]["type"] == "server_error"  # the OpenAI body, not text


def test_direct_answers_keep_connection_close_pipelining_and_100_continue() -> None:
    async def plain(request: Any) -> Response:
        return Response(await validation.read_body(request, 1 << 20), 200,
                        media_type="application/json")

    close = REQUEST.replace(b"Host: x\r\n", b"Host: x\r\nConnection: close\r\n")
    stock, ours = _both(_front(plain), close)
    assert ours.writes == [b"".join(stock.writes)] and ours.closed and stock.closed
    # Pipelined, and mixed with a route left to the app: answered in order, the same bytes.
    other = b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n"
    stock, ours = _both(_front(plain), REQUEST + other + REQUEST)
    assert b"".join(ours.writes) == b"".join(stock.writes)
    assert b"".join(ours.writes).count(b"HTTP/1.1 200 OK") == 3 and b"/health" in ours.writes[1]
    expect = REQUEST.replace(b"Host: x\r\n", b"Host: x\r\nExpect: 100-continue\r\n")
    stock, ours = _both(_front(plain), expect)
    assert ours.writes[0] == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert b"".join(ours.writes) == b"".join(stock.writes)


def test_a_direct_stream_waits_for_a_slow_client_and_stops_for_a_gone_one() -> None:
    """Flow control as uvicorn's `send`: no chunk is written while the transport asks to
    pause; a client that leaves is seen by the request's watch, and nothing more is
    written, while the relay's body still runs to its end and the close callbacks run."""
    servers: list[FleetHttpProtocol] = []
    seen: list[str] = []
    second = asyncio.Event()

    class Server(FleetHttpProtocol):
        def connection_made(self, transport: Any) -> None:
            servers.append(self)
            super().connection_made(transport)

    async def body(watch: ClientWatch) -> AsyncIterator[bytes]:
        try:
            yield b"data: 1\n\n"
            servers[0].pause_writing()

            def resume() -> None:
                writes = b"".join(servers[0].transport.writes)  # type: ignore[attr-defined]
                seen.append("2 waited" if b"data: 2" not in writes else "2 written paused")
                servers[0].resume_writing()

            asyncio.get_running_loop().call_later(0.02, resume)
            yield b"data: 2\n\n"  # written only once the transport resumes
            second.set()
            await watch.guard(asyncio.sleep(5))  # the client leaves meanwhile
        except ClientGone:
            seen.append("gone")
        yield b"data: never written\n\n"
        seen.append("ran to its end")

    async def handler(request: Any) -> RelayResponse:
        await validation.read_body(request, 1 << 20)
        watch = ClientWatch(request.receive)
        return RelayResponse(body(watch), 200, {}, "text/event-stream",
                             on_close=lambda: seen.append("closed"))

    async def between(transport: Transport) -> None:
        async with asyncio.timeout(5):
            await second.wait()
        assert b"data: 2" in transport.writes[-1]
        servers[0].connection_lost(None)

    async def run() -> Transport:
        return await _serve(Server, _front(handler), REQUEST, between)

    ours = asyncio.run(run())
    assert seen == ["2 waited", "gone", "ran to its end", "closed"]
    assert b"never" not in b"".join(ours.writes) and len(ours.writes) == 2


def test_the_gateway_serves_with_this_protocol(monkeypatch: pytest.MonkeyPatch) -> None:
    """`python -m gateway` (what `fleet up` and `make run` start) uses it."""
    seen: dict[str, Any] = {}

    class Server:
        started = True

        def __init__(self, config: Config) -> None:
            seen["http"] = config.http
            seen["app"] = config.app

        def run(self) -> None:
            pass

    monkeypatch.setattr("uvicorn.Server", Server)
    assert gateway_main.main(["--port", "0", "--controller-address",
                              "http://127.0.0.1:9"]) == 0
    assert seen["http"] is FleetHttpProtocol
    # And the app it serves is the routes' front, unwrapped: the direct path is taken.
    assert isinstance(seen["app"], GenerateRoutes)
    assert "/v1/chat/completions" in seen["app"].routes
