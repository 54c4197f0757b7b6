"""The gateway's connections to engines notice a host that went silent (see
tests/integration/test_multihost.py for a real partition)."""

from __future__ import annotations

import asyncio
import socket
import sys

import aiohttp
import pytest
from aiohttp import web

from gateway.proxy import engine_connector
from gateway.settings import GatewaySettings

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Linux TCP socket options")


def test_engine_connections_probe_and_give_up_after_the_dead_peer_timeout() -> None:
    async def scenario() -> dict[str, int]:
        finish = asyncio.Event()

        async def stream(request: web.Request) -> web.StreamResponse:
            # Unfinished until the client has looked at its socket, which is then still its own.
            response = web.StreamResponse()
            await response.prepare(request)
            await response.write(b"ok")
            await finish.wait()
            await response.write_eof()
            return response

        app = web.Application()
        app.router.add_get("/", stream)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        try:
            async with aiohttp.ClientSession(connector=engine_connector(12)) as session, \
                    session.get(f"http://127.0.0.1:{port}/") as response:
                assert response.connection is not None
                sock = response.connection.transport.get_extra_info("socket")
                options = {
                    "keepalive": sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE),
                    "idle": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE),
                    "interval": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPINTVL),
                    "user_timeout": sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_USER_TIMEOUT),
                }
                finish.set()
                assert await response.text() == "ok"
                return options
        finally:
            await runner.cleanup()

    options = asyncio.run(scenario())
    assert options == {"keepalive": 1, "idle": 6, "interval": 2, "user_timeout": 12000}


def test_dead_peer_timeout_is_a_gateway_flag() -> None:
    assert GatewaySettings.from_cli([]).dead_peer_timeout == 10
    assert GatewaySettings.from_cli(["--dead-peer-timeout", "4"]).dead_peer_timeout == 4
