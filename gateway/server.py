"""uvicorn's HTTP/1.1 protocol, writing a response's head together with its first body bytes.

uvicorn writes the head of a response the moment the app sends `http.response.start`, and each
body message in a write of its own. A relayed stream whose engine answered at once (its first
chunks, or all of them, already read) thus cost the gateway three socket writes: the head, the
body, the chunked terminator. On a loopback or a virtual machine each write that wakes the
reader costs the writer tens of microseconds (bench/wakeup_cost.py), about as much as the rest
of the relay's work for a short stream.

Here the head waits, for the rest of the current event-loop step only: a body message sent in
that step goes out in the same write (ASGI lets a server hold the head until the first body
message); otherwise the head is written on the loop's next turn, so nothing is delayed beyond
what the step was doing anyway. The relay sends a stream's last chunk with the end of the
response (gateway/asgi.py `FinalChunk`), which uvicorn writes with the terminator. A stream
answered at once is then one write.

Everything else is uvicorn's own: parsing, keep-alive, pipelining, flow control, TLS, limits.
The cycle is uvicorn's class with `send` wrapped; uvicorn is pinned (requirements/), and
tests/unit/test_server.py checks the writes against the version installed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle


class _Writes:
    """Stands in for the transport while uvicorn's `send` writes: keeps what it writes."""

    __slots__ = ("parts", "closed")

    def __init__(self) -> None:
        self.parts: list[bytes] = []
        self.closed = False

    def write(self, data: bytes) -> None:
        self.parts.append(data)

    def close(self) -> None:
        self.closed = True


class WatchedCycle(RequestResponseCycle):
    """uvicorn's request/response cycle; the head is held until the step's end (see above),
    and the callbacks in `on_gone` are called (soon) when the connection is lost before the
    response is complete, instead of a task waiting for `http.disconnect` (gateway/asgi.py
    `ClientWatch`)."""

    _head: bytes | None = None
    _flush: asyncio.Handle | None = None
    loop: asyncio.AbstractEventLoop  # the protocol's (asking asyncio for it costs a getpid)
    on_gone: list[Callable[[], None]] | None = None

    async def _capture(self, message: Any) -> _Writes:
        writes = _Writes()
        transport, self.transport = self.transport, writes  # type: ignore[assignment]
        try:
            await super().send(message)
        finally:
            self.transport = transport
        return writes

    async def send(self, message: Any) -> None:
        if not self.response_started:
            if self.disconnected or message.get("type") != "http.response.start":
                await super().send(message)  # uvicorn's own refusal, or nothing to do
                return
            writes = await self._capture(message)
            self._head = b"".join(writes.parts)
            self._flush = self.loop.call_soon(self._write_head)
            return
        if self._head is None:
            await super().send(message)
            return
        writes = await self._capture(message)
        head, self._head = self._head, None  # None if written while uvicorn waited to drain
        if self._flush is not None:
            self._flush.cancel()
        parts = writes.parts if head is None or self.disconnected else [head, *writes.parts]
        if parts:
            self.transport.write(b"".join(parts))
        if writes.closed:
            self.transport.close()

    def _write_head(self) -> None:
        head, self._head = self._head, None
        # Not after the app failed and uvicorn closed the connection in the same step.
        if head is not None and not self.disconnected and not self.transport.is_closing():
            self.transport.write(head)


class FleetHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with `WatchedCycle` for every request (pass as `http=`)."""

    def on_headers_complete(self) -> None:
        cycle = self.cycle
        super().on_headers_complete()
        new = self.cycle
        if new is not cycle and type(new) is RequestResponseCycle:
            # A new cycle, its task created but not yet run: it sends through `WatchedCycle.send`.
            new.__class__ = WatchedCycle
            assert isinstance(new, WatchedCycle)
            new.loop = self.loop

    def connection_lost(self, exc: Exception | None) -> None:
        cycle = self.cycle
        super().connection_lost(exc)
        if type(cycle) is WatchedCycle and cycle.disconnected:
            assert isinstance(cycle, WatchedCycle)
            for callback in cycle.on_gone or ():
                self.loop.call_soon(callback)
