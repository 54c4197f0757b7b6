"""The gateway's client for engines (gateway/engine_client.py), against a real aiohttp server.

The multi-host tests (tests/integration/test_multihost.py) partition a real engine host; these
check the client's own contract: pooling, framing, timeouts and the errors it raises when.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web

from gateway.engine_client import (
    Endpoint,
    EngineBroke,
    EngineClient,
    EngineConnectError,
    EngineResponse,
    EngineTimeout,
)
from gateway.settings import GatewaySettings

JSON = {"Content-Type": "application/json"}


async def _serve(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                 ) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_post("/{tail:.*}", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.1)  # handlers left asleep are cut off
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, runner.addresses[0][1]


def _client(read_timeout: float = 5.0, keepalive_timeout: float = 4.0) -> EngineClient:
    return EngineClient(connect_timeout=2, read_timeout=read_timeout, dead_peer_timeout=12,
                        keepalive_timeout=keepalive_timeout)


async def _post(client: EngineClient, port: int) -> EngineResponse:
    return await client.post(Endpoint.from_url(f"http://127.0.0.1:{port}/"), b"x", JSON)


def run(scenario: Callable[[], Awaitable[object]]) -> object:
    return asyncio.run(scenario())


async def _stream(request: web.Request) -> web.StreamResponse:
    """Echoes the body back in three chunks, each written on its own, and the client's port."""
    body = await request.read()
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                           "X-Peer": str(request.transport.get_extra_info(
                                               "peername")[1])})
    await response.prepare(request)
    for part in (b"data: 1\n\n", b"data: " + body + b"\n\n", b"data: [DONE]\n\n"):
        await response.write(part)
    await response.write_eof()
    return response


def test_a_stream_arrives_whole_and_the_connection_is_kept_for_the_next_request() -> None:
    async def scenario() -> tuple[list[bytes], int, str | None]:
        runner, port = await _serve(_stream)
        client = _client()
        try:
            endpoint = Endpoint.from_url(f"http://127.0.0.1:{port}/v1/chat/completions")
            bodies, conns = [], []
            for i in range(3):
                response = await client.post(endpoint, b"hi %d" % i, JSON)
                bodies.append(await response.read())
                conns.append(response._conn)
                response.release()
            return bodies, len({id(c) for c in conns}), response.content_type
        finally:
            client.close()
            await runner.cleanup()

    bodies, connections, content_type = run(scenario)  # type: ignore[misc]
    assert bodies == [b"data: 1\n\ndata: hi %d\n\ndata: [DONE]\n\n" % i for i in range(3)]
    assert connections == 1
    assert content_type == "text/event-stream"


def test_a_connection_idle_past_the_keepalive_timeout_is_closed_without_a_new_request() -> None:
    async def scenario() -> tuple[bool, bool]:
        runner, port = await _serve(_stream)
        client = _client(keepalive_timeout=0.2)
        try:
            endpoint = Endpoint.from_url(f"http://127.0.0.1:{port}/")
            first = await client.post(endpoint, b"a", JSON)
            await first.read()
            conn = first._conn
            assert conn is not None
            first.release()
            deadline = asyncio.get_running_loop().time() + 5
            while conn.alive:  # the pool's sweep closes it; the engine would keep it for 75 s
                assert asyncio.get_running_loop().time() < deadline, "idle connection kept"
                await asyncio.sleep(0.05)
            second = await client.post(endpoint, b"b", JSON)
            await second.read()
            reused = second._conn is conn
            second.release()
            return reused, conn.alive
        finally:
            client.close()
            await runner.cleanup()

    reused, old_alive = run(scenario)  # type: ignore[misc]
    assert not reused and not old_alive


def test_connections_probe_and_give_up_after_the_dead_peer_timeout() -> None:
    if sys.platform != "linux":
        pytest.skip("Linux TCP socket options")

    async def scenario() -> dict[str, int]:
        runner, port = await _serve(_stream)
        client = _client()
        try:
            response = await _post(client, port)
            assert response._conn is not None and response._conn.transport is not None
            sock = response._conn.transport.get_extra_info("socket")
            options = {
                "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                "idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                "interval": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                "user_timeout": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
            }
            await response.read()
            response.release()
            return options
        finally:
            client.close()
            await runner.cleanup()

    assert run(scenario) == {"keepalive": 1, "idle": 6, "interval": 2, "user_timeout": 12000}


def test_refused_connection_is_a_connect_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # bound, not listening: refused

        async def scenario() -> None:
            await _post(_client(), port)

        with pytest.raises(EngineConnectError) as caught:
            run(scenario)
    assert "cannot connect" in str(caught.value)


def test_a_kept_alive_connection_closed_as_the_request_goes_out_is_retried_on_a_new_one() -> None:
    """As an engine's keep-alive timer fires: it closes the connection without reading."""

    async def scenario() -> tuple[list[bytes], int]:
        connections = 0

        async def one_answer_per_connection(reader: asyncio.StreamReader,
                                            writer: asyncio.StreamWriter) -> None:
            nonlocal connections
            connections += 1
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            await reader.readexactly(length)
            writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
            await writer.drain()
            await reader.read(1)  # the next request: closed on, unanswered
            writer.close()

        server = await asyncio.start_server(one_answer_per_connection, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        client = _client()
        try:
            endpoint = Endpoint.from_url(f"http://127.0.0.1:{port}/")
            bodies = []
            for _ in range(2):
                response = await client.post(endpoint, b"x", JSON)
                bodies.append(await response.read())
                response.release()
            return bodies, connections
        finally:
            client.close()
            server.close()

    assert run(scenario) == ([b"ok", b"ok"], 2)


def _silent_after(parts: list[bytes]) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
    async def handler(request: web.Request) -> web.StreamResponse:
        await request.read()
        if parts:
            response = web.StreamResponse()
            await response.prepare(request)
            for part in parts:
                await response.write(part)
        await asyncio.sleep(30)
        raise AssertionError("unreachable in the test's time")
    return handler


def test_silence_before_the_answer_is_a_timeout() -> None:
    async def scenario() -> None:
        runner, port = await _serve(_silent_after([]))
        try:
            await _post(_client(read_timeout=0.3), port)
        finally:
            await runner.cleanup()

    with pytest.raises(EngineTimeout):
        run(scenario)


def test_silence_in_the_middle_of_a_stream_is_a_timeout_after_what_came() -> None:
    async def scenario() -> list[bytes]:
        runner, port = await _serve(_silent_after([b"data: 1\n\n"]))
        got: list[bytes] = []
        try:
            response = await _post(_client(read_timeout=0.3), port)
            with pytest.raises(EngineTimeout):
                while chunk := await response.read_chunk():
                    got.append(chunk)
            response.close()
            return got
        finally:
            await runner.cleanup()

    assert run(scenario) == [b"data: 1\n\n"]


def test_a_stream_that_has_begun_times_out_after_its_own_shorter_silence() -> None:
    """A stream's stall timeout (gateway/continuation): set once its first bytes came, it
    replaces the read timeout for the rest of the answer."""
    async def scenario() -> tuple[list[bytes], float]:
        runner, port = await _serve(_silent_after([b"data: 1\n\n"]))
        got: list[bytes] = []
        try:
            response = await _post(_client(read_timeout=30), port)
            got.append(await response.read_chunk())
            response.set_read_timeout(0.3)
            started = asyncio.get_running_loop().time()
            with pytest.raises(EngineTimeout):
                await response.read_chunk()
            response.close()
            return got, asyncio.get_running_loop().time() - started
        finally:
            await runner.cleanup()

    got, waited = run(scenario)  # type: ignore[misc]
    assert got == [b"data: 1\n\n"]
    assert waited < 10  # the 30 s read timeout would still be waiting


async def _dies_mid_answer(request: web.Request) -> web.StreamResponse:
    await request.read()
    response = web.StreamResponse()
    await response.prepare(request)
    await response.write(b"data: 1\n\n")
    assert request.transport is not None
    request.transport.abort()
    return response


def test_a_connection_cut_mid_answer_is_broken_not_a_clean_end() -> None:
    async def scenario() -> list[bytes]:
        runner, port = await _serve(_dies_mid_answer)
        got: list[bytes] = []
        try:
            response = await _post(_client(), port)
            with pytest.raises(EngineBroke):
                while chunk := await response.read_chunk():
                    got.append(chunk)
            return got
        finally:
            await runner.cleanup()

    assert run(scenario) == [b"data: 1\n\n"]


def test_a_slow_reader_pauses_the_engine_and_still_gets_every_byte() -> None:
    big = b"x" * (1024 * 1024)

    async def flood(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse()
        await response.prepare(request)
        for _ in range(8):
            await response.write(big)
        await response.write_eof()
        return response

    async def scenario() -> tuple[int, bool]:
        runner, port = await _serve(flood)
        client = _client()
        try:
            response = await _post(client, port)
            conn = response._conn
            assert conn is not None
            paused_seen = False
            total = 0
            while chunk := await response.read_chunk():
                total += len(chunk)
                await asyncio.sleep(0.01)  # a slow client: the engine's bytes pile up
                paused_seen = paused_seen or conn._paused
            response.release()
            return total, paused_seen
        finally:
            client.close()
            await runner.cleanup()

    total, paused = run(scenario)  # type: ignore[misc]
    assert total == 8 * len(big) and paused


@pytest.mark.parametrize("url, target, host_header", [
    ("http://10.0.0.2:8001/v1/completions", "/v1/completions", "10.0.0.2:8001"),
    ("https://engine.local/v1/x?a=1", "/v1/x?a=1", "engine.local"),
    ("http://[::1]:8001/v1/chat/completions", "/v1/chat/completions", "[::1]:8001"),
])
def test_endpoints_are_parsed_once_into_target_and_host(url: str, target: str,
                                                         host_header: str) -> None:
    endpoint = Endpoint.from_url(url)
    assert (endpoint.target, endpoint.host_header) == (target, host_header)


def test_a_header_with_a_line_break_is_refused_before_sending() -> None:
    async def scenario() -> None:
        await _client().post(Endpoint.from_url("http://127.0.0.1:9/"), b"x",
                             {"Authorization": "Bearer a\r\nX-Evil: 1"})

    with pytest.raises(ValueError):
        run(scenario)


def test_dead_peer_timeout_is_a_gateway_flag() -> None:
    assert GatewaySettings.from_cli([]).dead_peer_timeout == 10
    assert GatewaySettings.from_cli(["--dead-peer-timeout", "4"]).dead_peer_timeout == 4




def test_a_read_after_close_raises_broken_and_the_connection_is_not_pooled() -> None:
    async def scenario() -> tuple[bytes, bool]:
        runner, port = await _serve(_silent_after([b"data: 1\n\n"]))
        client = _client()
        try:
            response = await _post(client, port)
            first = await response.read_chunk()
            response.close()  # as when the client leaves between two chunks
            with pytest.raises(EngineBroke):
                await response.read_chunk()
            response.release()
            return first, bool(client._idle.get(("http", "127.0.0.1", port)))
        finally:
            client.close()
            await runner.cleanup()

    assert run(scenario) == (b"data: 1\n\n", False)
