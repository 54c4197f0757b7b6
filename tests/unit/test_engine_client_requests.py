"""The engine client's other requests: GET and DELETE, and bodies streamed as they come
(gateway/engine_client.py), against a real aiohttp server."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable

import pytest
from aiohttp import web

from gateway.engine_client import Endpoint
from tests.unit.test_engine_client import _client, run


async def _echo_request(request: web.Request) -> web.StreamResponse:
    """Says what it got: method, framing and body; sets the headers a client may need."""
    body = await request.read()
    return web.json_response(
        {"method": request.method, "chunked": request.headers.get("Transfer-Encoding"),
         "length": request.headers.get("Content-Length"), "body": body.decode()},
        headers={"Retry-After": "7", "X-Engine-Internal": "not passed back"})


async def _serve_any(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                     ) -> tuple[web.AppRunner, int]:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", handler)
    runner = web.AppRunner(app, shutdown_timeout=0.1)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    return runner, runner.addresses[0][1]


def test_get_and_delete_send_no_body_and_the_connection_is_reused() -> None:
    async def scenario() -> tuple[list[bytes], int]:
        runner, port = await _serve_any(_echo_request)
        client = _client()
        try:
            endpoint = Endpoint.from_url(f"http://127.0.0.1:{port}/v1/files/f-1")
            bodies, conns = [], set()
            for method in ("GET", "DELETE"):
                response = await client.request(method, endpoint, {})
                bodies.append(await response.read())
                conns.add(id(response._conn))
                response.release()
            return bodies, len(conns)
        finally:
            client.close()
            await runner.cleanup()

    bodies, connections = run(scenario)  # type: ignore[misc]
    got = [json.loads(b) for b in bodies]
    assert [g["method"] for g in got] == ["GET", "DELETE"]
    assert all(g["body"] == "" and g["chunked"] is None for g in got)
    assert connections == 1


def test_a_body_given_as_an_async_iterator_goes_chunked_and_whole() -> None:
    parts = [b"--boundary\r\n", b"", b"x" * 300_000, b"\r\n--boundary--\r\n"]

    async def body():  # type: ignore[no-untyped-def]
        for part in parts:
            yield part

    async def scenario() -> tuple[dict, list[tuple[str, str]], bool]:
        runner, port = await _serve_any(_echo_request)
        client = _client()
        try:
            endpoint = Endpoint.from_url(f"http://127.0.0.1:{port}/v1/audio/transcriptions")
            response = await client.request("POST", endpoint,
                                            {"Content-Type": "multipart/form-data"}, body())
            got = json.loads(await response.read())
            headers = response.headers
            response.release()
            return got, headers, bool(client._idle.get(("http", "127.0.0.1", port)))
        finally:
            client.close()
            await runner.cleanup()

    got, headers, pooled = run(scenario)  # type: ignore[misc]
    assert got["chunked"] == "chunked" and got["length"] is None
    assert got["body"].encode() == b"".join(parts)
    # Only the headers a client needs come back, lower-cased.
    assert dict(headers) == {"content-type": "application/json; charset=utf-8",
                             "retry-after": "7"}
    assert pooled  # a streamed body sent to its end leaves a reusable connection


def test_an_answer_before_the_streamed_body_ends_stops_the_body_and_drops_the_connection(
        ) -> None:
    sent = []
    more = asyncio.Event()

    async def early(request: web.Request) -> web.StreamResponse:
        return web.json_response({"error": "too large"}, status=413)

    async def body():  # type: ignore[no-untyped-def]
        sent.append(b"first")
        yield b"first"
        await more.wait()  # the client's next bytes never come
        sent.append(b"second")
        yield b"second"

    async def scenario() -> tuple[int, bool]:
        runner, port = await _serve_any(early)
        client = _client()
        try:
            endpoint = Endpoint.from_url(f"http://127.0.0.1:{port}/upload")
            response = await asyncio.wait_for(
                client.request("POST", endpoint, {}, body()), 5)
            await response.read()
            response.release()
            return response.status, bool(client._idle.get(("http", "127.0.0.1", port)))
        finally:
            client.close()
            await runner.cleanup()

    assert run(scenario) == (413, False)
    assert sent == [b"first"]


def test_a_method_that_is_not_one_is_refused_before_sending() -> None:
    async def scenario() -> None:
        await _client().request("GET /x HTTP/1.1\r\n", Endpoint.from_url("http://127.0.0.1:9/"),
                                {})

    with pytest.raises(ValueError):
        run(scenario)
