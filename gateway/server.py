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

A POST to one of the generation routes skips ASGI altogether (`DirectCycle`): its handler is
called with the request, and the answer it returns is written straight to the transport, in
the same bytes and writes. The layers this skips (the route lookup, Starlette's request, the
message dicts, uvicorn's `send` and the wrapper above) had about 5 % of the gateway's profile
samples per stream; on a quiet host the CPU per stream moved by less than the runs' own spread
(bench/RESULTS.md, 2026-12-02).

Everything else is uvicorn's own: parsing, keep-alive, pipelining, flow control, TLS, limits.
The cycle is uvicorn's class with `send` wrapped; uvicorn is pinned (requirements/), and
tests/unit/test_server.py checks the writes against the version installed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, cast

from starlette.responses import Response
from uvicorn.protocols.http.httptools_impl import (
    HEADER_VALUE_RE,
    STATUS_LINE,
    HttpToolsProtocol,
    RequestResponseCycle,
)

from gateway.asgi import FleetRequest, GenerateRoutes, Handler, RelayResponse, answer


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


class DirectCycle(WatchedCycle):
    """A request to one of the generation routes (`GenerateRoutes.routes`): its handler is
    called, and what it answers written, without ASGI in between: no message dicts, no
    `send` per chunk through the app's and uvicorn's layers.

    What goes on the wire is what uvicorn writes for the same response, in the writes of
    `WatchedCycle` (tests/unit/test_server.py compares them). The request side (body, 100
    Continue, keep-alive, pipelining, flow control) stays uvicorn's: this is its cycle, with
    `serve` in place of `run_asgi`."""

    async def serve(self, handler: Handler) -> None:
        try:
            # (uvicorn and Starlette type the same ASGI values differently.)
            request = FleetRequest(cast(Any, self.scope), cast(Any, self.receive))
            response = await answer(handler, request)
            if isinstance(response, RelayResponse):
                await response.relay(self)
            else:
                await self._answer(response)
        except BaseException as exc:  # as uvicorn's `run_asgi`
            self.logger.error("Exception in ASGI application\n", exc_info=exc)
            if not self.response_started:
                await self.send_500_response()
            else:
                self.transport.close()
        finally:
            self.on_response = lambda: None

    def _status_and_headers(self, status: int, headers: list[tuple[bytes, bytes]],
                            chunked: bool) -> bytes:
        """The status line and headers, as uvicorn's `send` writes them."""
        self.response_started = True
        self.waiting_for_100_continue = False
        content = [STATUS_LINE[status]]
        close = False
        for name, value in self.default_headers + headers:
            if HEADER_VALUE_RE.search(value):
                raise RuntimeError("Invalid HTTP header value.")
            if name == b"connection" and b"close" in value.lower():
                self.keep_alive = False
                close = True
            content.extend((name, b": ", value, b"\r\n"))
        if not self.keep_alive and not close:
            content.append(b"connection: close\r\n")
        if chunked:
            content.append(b"transfer-encoding: chunked\r\n")
        content.append(b"\r\n")
        return b"".join(content)

    def _complete(self) -> None:
        self.response_complete = True
        self.message_event.set()
        if not self.keep_alive:
            self.transport.close()
        self.on_response()

    async def _answer(self, response: Response) -> None:
        """A whole answer (a JSON body, an error): one write."""
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected:
            return
        # Starlette's headers are lower-case and have the body's content-length.
        head = self._status_and_headers(response.status_code, response.raw_headers, chunked=False)
        self.transport.write(head + response.body)
        self._complete()
        if response.background is not None:
            await response.background()

    # --- gateway/asgi.py's RelayOut: a relayed stream, in chunked encoding ---

    async def relay_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        if self.disconnected:
            return
        # Held for the rest of this step: the first chunk, if it comes in it, goes with it.
        self._head = self._status_and_headers(status, headers, chunked=True)
        self._flush = self.loop.call_soon(self._write_head)

    async def relay_chunk(self, chunk: bytes, more: bool) -> None:
        if self.flow.write_paused and not self.disconnected:
            await self.flow.drain()
        if self.disconnected or self.response_complete:
            return
        head, self._head = self._head, None
        if head is not None and self._flush is not None:
            self._flush.cancel()
        parts = [head] if head is not None else []
        if chunk:
            parts.append(b"%x\r\n%b\r\n" % (len(chunk), chunk))
        if not more:
            parts.append(b"0\r\n\r\n")
        if parts:
            self.transport.write(b"".join(parts))
        if not more:
            self._complete()


class FleetHttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, with `WatchedCycle` for every request and `DirectCycle`
    for a POST to one of the generation routes (pass as `http=`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        app = self.app
        # Only when the app is the gateway's own front, unwrapped (no trace-level logging).
        self._direct = app.routes if isinstance(app, GenerateRoutes) else {}

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        # A new cycle, its task not yet created: it is served as one of ours.
        if type(cycle) is RequestResponseCycle:
            handler = None
            # (Not when uvicorn refuses it over `limit_concurrency`: `app` is then its 503.)
            if app is self.app and cycle.scope["method"] == "POST" \
                    and not self.config.reset_contextvars:
                handler = self._direct.get(cycle.scope["path"])
            cycle.__class__ = WatchedCycle if handler is None else DirectCycle
            assert isinstance(cycle, WatchedCycle)
            cycle.loop = self.loop
            if isinstance(cycle, DirectCycle) and handler is not None:
                task = self.loop.create_task(cycle.serve(handler))
                task.add_done_callback(self.tasks.discard)
                self.tasks.add(task)
                return
        super()._start_asgi_task(cycle, app)

    def connection_lost(self, exc: Exception | None) -> None:
        cycle = self.cycle
        super().connection_lost(exc)
        if isinstance(cycle, WatchedCycle) and cycle.disconnected:
            for callback in cycle.on_gone or ():
                self.loop.call_soon(callback)
