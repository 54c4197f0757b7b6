"""One kept-alive HTTP/1.1 connection to an engine, for gateway/engine_client.py.

An asyncio protocol around httptools' parser (the one uvicorn uses): it carries one request at
a time, keeps the few response headers a client needs, queues the body's bytes as they come
(pausing reading while the client is behind), and times out on silence with one timer per
request that rearms itself. Its errors say when a request failed: `EngineConnectError` before
any byte of an answer, `EngineTimeout` on silence, `EngineBroke` in the middle of an answer.
"""

from __future__ import annotations

import asyncio
import collections
import socket
from collections.abc import AsyncIterable

import httptools

_HIGH_WATER = 256 * 1024  # bytes read ahead of the client before reading pauses
# The response headers passed back, lower-cased: what a client of the gateway may need.
RELAYED_HEADERS = frozenset({"content-type", "retry-after", "content-disposition",
                             "cache-control"})
_RELAYED = frozenset(h.encode() for h in RELAYED_HEADERS)


class EngineError(Exception):
    """A request to an engine failed."""


class EngineConnectError(EngineError):
    """No answer began: connecting failed, or the connection ended before the first byte."""


class EngineTimeout(EngineError):
    """The engine took the request and sent nothing for the read timeout."""


class EngineBroke(EngineError):
    """The connection ended, or sent garbage, in the middle of an answer."""


def set_dead_peer_options(sock: socket.socket, dead_peer_timeout: float) -> None:
    """TCP keep-alive probes once a connection has been idle for half of `dead_peer_timeout`,
    and TCP_USER_TIMEOUT ending it when what it sent (a request or a probe) has gone
    unacknowledged for `dead_peer_timeout`.

    A host cut off by the network (or powered off) refuses nothing: without these, a request
    written to it waits for the read timeout (minutes) and a stream from it just stops. An engine
    that is busy but reachable still acknowledges, however long it takes to answer.
    """
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
    options = [("TCP_KEEPIDLE", max(1, round(dead_peer_timeout / 2))),
               ("TCP_KEEPINTVL", max(1, round(dead_peer_timeout / 6))),
               ("TCP_KEEPCNT", 3),
               ("TCP_USER_TIMEOUT", round(dead_peer_timeout * 1000))]
    for name, value in options:
        if hasattr(socket, name):  # Linux has them all; elsewhere keep-alive's defaults
            sock.setsockopt(socket.IPPROTO_TCP, getattr(socket, name), value)


class EngineConnection(asyncio.Protocol):
    """One kept-alive connection, carrying one request/response at a time."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self.transport: asyncio.Transport | None = None
        self.alive = True
        self.idle_since = 0.0
        self._parser: httptools.HttpResponseParser | None = None
        self._head: asyncio.Future[None] | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._chunks: collections.deque[bytes] = collections.deque()
        self._buffered = 0
        self._paused = False
        self._got_bytes = False
        self._complete = False
        self._keep_alive = False
        self._body_sent = True
        self._error: EngineError | None = None
        self._timer: asyncio.TimerHandle | None = None
        self._read_timeout = 0.0
        self._last_data = 0.0
        self.status = 0
        self.content_type: str | None = None
        self.headers: list[tuple[str, str]] = []
        self._writable: asyncio.Future[None] | None = None  # set while writing is paused

    # --- asyncio.Protocol ---

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no subclass

    def data_received(self, data: bytes) -> None:
        if self._parser is None:  # nothing asked: an engine speaking out of turn
            self.abort()
            return
        self._last_data = self._loop.time()
        self._got_bytes = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._fail(EngineBroke(f"the engine's answer is not valid HTTP: {exc}"))
            self.abort()

    def pause_writing(self) -> None:
        if self._writable is None:
            self._writable = self._loop.create_future()

    def resume_writing(self) -> None:
        writable, self._writable = self._writable, None
        if writable is not None and not writable.done():
            writable.set_result(None)

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        self.resume_writing()
        if self._parser is not None and not self._complete:
            if self._error is None:
                reason = f": {exc}" if exc else ""
                if self._got_bytes:
                    self._fail(EngineBroke(f"the engine closed the connection mid-answer{reason}"))
                else:
                    self._fail(EngineConnectError(
                        f"the engine closed the connection before answering{reason}"))
        self._wake()

    # --- httptools callbacks ---

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name in _RELAYED:
            text = value.decode("latin-1")
            self.headers.append((name.decode("latin-1"), text))
            if name == b"content-type":
                self.content_type = text

    def on_headers_complete(self) -> None:
        assert self._parser is not None and self._head is not None
        self.status = self._parser.get_status_code()
        if not self._head.done():
            self._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        # Once per chunk of every stream: `_wake` inlined.
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport is not None:
            self._paused = True
            self.transport.pause_reading()
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def on_message_complete(self) -> None:
        assert self._parser is not None
        self._complete = True
        self._keep_alive = self._parser.should_keep_alive()
        self._stop_timer()
        self._wake()

    # --- the exchange ---

    def send(self, request: bytes, read_timeout: float, body_follows: bool = False) -> None:
        """Write the request (its head only, when `body_follows` from `write_body`)."""
        assert self.transport is not None
        self._parser = httptools.HttpResponseParser(self)
        self._head = self._loop.create_future()
        self._chunks.clear()
        self._buffered = 0
        self._got_bytes = self._complete = self._keep_alive = False
        self._body_sent = not body_follows
        self._error = None
        self.status, self.content_type, self.headers = 0, None, []
        self._read_timeout = read_timeout
        self._last_data = self._loop.time()
        self._timer = self._loop.call_later(read_timeout, self._check_silence)
        self.transport.write(request)

    async def write_body(self, body: AsyncIterable[bytes]) -> None:
        """Send `body` in chunked encoding after `send`'s head, waiting while the engine is
        behind; stops early if the connection ends or the answer is complete."""
        assert self.transport is not None
        transport = self.transport
        async for chunk in body:
            if not self.alive or self._complete or self._error is not None:
                return
            if chunk:
                transport.write(b"%x\r\n%b\r\n" % (len(chunk), chunk))
                # An engine still taking the body is not silent: the read timeout is for
                # an engine that has the whole request and says nothing.
                self._last_data = self._loop.time()
            if self._writable is not None:
                await self._writable
        if self.alive:
            transport.write(b"0\r\n\r\n")
            self._body_sent = True

    async def head(self) -> None:
        assert self._head is not None
        await self._head

    async def read_chunk(self) -> bytes:
        """The next bytes of the body as they came (several chunks joined); b"" at its end."""
        while not self._chunks:
            if self._error is not None:
                raise self._error
            if self._complete:
                return b""
            self._waiter = self._loop.create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None
        chunks = self._chunks
        if len(chunks) == 1:
            chunk = chunks.popleft()
        else:
            chunk = b"".join(chunks)
            chunks.clear()
        self._buffered = 0
        if self._paused and self.transport is not None:
            self._paused = False
            self._last_data = self._loop.time()  # the silence clock restarts with reading
            self.transport.resume_reading()
        return chunk

    def set_read_timeout(self, seconds: float) -> None:
        """From now on, fail after `seconds` of silence (a stream, once it has begun)."""
        self._read_timeout = seconds
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._loop.call_later(seconds, self._check_silence)

    @property
    def reusable(self) -> bool:
        return (self.alive and self._complete and self._keep_alive and self._body_sent
                and not self._chunks)

    def finish(self) -> None:
        """The exchange is over; the connection may carry another one."""
        self._stop_timer()
        self._parser = None
        self._head = None

    def abort(self) -> None:
        self._stop_timer()
        self.alive = False
        if self.transport is not None:
            self.transport.abort()

    # --- internals ---

    def _fail(self, error: EngineError) -> None:
        if self._error is None:
            self._error = error
        if self._head is not None and not self._head.done():
            self._head.set_exception(error)
            self._head.exception()  # retrieved here: nobody may be awaiting it any more
        self._stop_timer()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _check_silence(self) -> None:
        silent = self._loop.time() - self._last_data
        if self._paused:  # the client is behind, not the engine
            silent = 0.0
        if silent < self._read_timeout:
            self._timer = self._loop.call_later(self._read_timeout - silent, self._check_silence)
            return
        self._timer = None
        self._fail(EngineTimeout(f"the engine sent nothing for {self._read_timeout:g}s"))
        self._wake()
        self.abort()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
