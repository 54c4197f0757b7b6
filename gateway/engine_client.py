"""The gateway's HTTP/1.1 client for engines: the streaming path's other half, kept lean.

Relaying a stream costs the gateway a server side (uvicorn) and a client side. On the overhead
benchmark's fixture a bare relay (uvicorn, raw ASGI, no features) costs 340-410 ms of CPU per
1,000 streamed requests with aiohttp's client, and 200-225 with this one: an asyncio protocol
around httptools' parser, the one uvicorn uses (bench/RESULTS.md). It does only what the
gateway asks of it:

- one request at a time per connection (POST, GET, DELETE, ...), connections kept alive in a pool
  per engine and dropped after `keepalive_timeout` idle seconds (below uvicorn's 5 s, so vLLM
  never closes one under us);
- a body given whole (Content-Length) or as an async iterator of bytes, sent as it comes with
  chunked transfer encoding, pausing while the engine is behind;
- the response's status and the few headers a client needs (`RELAYED_HEADERS`), read once per
  response: the body's chunks are passed on as they come, unparsed;
- a connect timeout, and a read timeout on silence, checked by one timer per request that
  rearms itself rather than one per chunk;
- TCP keep-alive probes and TCP_USER_TIMEOUT, so that an engine host cut off by the network
  ends its connections after `dead_peer_timeout` (tests/integration/test_multihost.py);
- TLS, verified against the given context;
- back-pressure: reading from the engine pauses while the client is behind.

Errors say when they happened: `EngineConnectError` before any byte of an answer (the request
may go to another engine), `EngineTimeout` on silence, `EngineBroke` in the middle of an answer.
One connection, the asyncio protocol, is gateway/engine_connection.py; this module holds the
pool, the requests and the responses.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import time
from collections.abc import AsyncIterable, Awaitable, Mapping
from dataclasses import dataclass

import yarl

from gateway.engine_connection import (
    RELAYED_HEADERS,
    EngineBroke,
    EngineConnectError,
    EngineConnection,
    EngineError,
    EngineTimeout,
    set_dead_peer_options,
)

__all__ = ["RELAYED_HEADERS", "EngineBroke", "EngineClient", "EngineConnectError", "EngineError",
           "EngineResponse", "EngineTimeout", "Endpoint", "RequestBody", "set_dead_peer_options"]

_MAX_IDLE_PER_ENGINE = 1024
# A request body: whole, or streamed through as it arrives.
RequestBody = bytes | AsyncIterable[bytes] | None


@dataclass(frozen=True)
class Endpoint:
    """Where a request goes: the pool key (scheme, host, port) and the request's target."""

    scheme: str
    host: str
    port: int
    target: str
    host_header: str

    @classmethod
    def from_url(cls, url: str) -> Endpoint:
        parsed = yarl.URL(url)
        if parsed.scheme not in ("http", "https") or not parsed.host or parsed.port is None:
            raise ValueError(f"not an http(s) URL with a host: {url!r}")
        target = parsed.raw_path_qs or "/"
        host = parsed.raw_host or parsed.host
        host_header = host if parsed.is_default_port() else f"{host}:{parsed.port}"
        if ":" in host and not host.startswith("["):  # an IPv6 literal
            host_header = f"[{host}]" if parsed.is_default_port() else f"[{host}]:{parsed.port}"
        return cls(parsed.scheme, parsed.host, parsed.port, target, host_header)


class EngineResponse:
    """An engine's answer: status and content type at once, the body as it comes."""

    def __init__(self, client: EngineClient, key: tuple[str, str, int],
                 conn: EngineConnection) -> None:
        self._client = client
        self._key = key
        self._conn: EngineConnection | None = conn
        self.status = conn.status
        self.content_type = conn.content_type
        self.headers = conn.headers  # the ones in RELAYED_HEADERS, lower-cased, as they came

    async def read(self) -> bytes:
        parts = []
        while chunk := await self.read_chunk():
            parts.append(chunk)
        return b"".join(parts)

    def read_chunk(self) -> Awaitable[bytes]:
        """The next bytes of the body as they came (several chunks joined); b"" at its end.
        (The connection's own coroutine: no frame in between, as this runs once per chunk.)"""
        assert self._conn is not None, "the response was released"
        return self._conn.read_chunk()

    def set_read_timeout(self, seconds: float) -> None:
        """The longest silence from here on: for a stream that has begun, its stall timeout."""
        if self._conn is not None:
            self._conn.set_read_timeout(seconds)

    def release(self) -> None:
        """Give the connection back: to the pool if the answer was read to its end."""
        conn, self._conn = self._conn, None
        if conn is not None:
            self._client._give_back(self._key, conn)

    def close(self) -> None:
        """Drop the connection, ending the request on the engine's side too. A read waiting
        on it, or coming after, raises EngineBroke."""
        if self._conn is not None:
            self._conn.abort()


class EngineClient:
    def __init__(self, *, connect_timeout: float, read_timeout: float,
                 dead_peer_timeout: float, ssl_context: ssl.SSLContext | None = None,
                 keepalive_timeout: float = 4.0) -> None:
        self._connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self._dead_peer_timeout = dead_peer_timeout
        self._ssl = ssl_context or ssl.create_default_context()
        self._keepalive_timeout = keepalive_timeout
        self._idle: dict[tuple[str, str, int], list[EngineConnection]] = {}
        self._sweeper: asyncio.TimerHandle | None = None

    async def post(self, endpoint: Endpoint, body: bytes,
                   headers: Mapping[str, str]) -> EngineResponse:
        """Send `body` and wait for the answer's status line and headers."""
        return await self.request("POST", endpoint, headers, body)

    async def request(self, method: str, endpoint: Endpoint, headers: Mapping[str, str],
                      body: RequestBody = None) -> EngineResponse:
        """Send a request and wait for the answer's status line and headers.

        `body` is bytes (sent with Content-Length), an async iterator of bytes (sent with
        chunked transfer encoding as it comes), or None (no body: GET, DELETE)."""
        if not method.isalpha() or not method.isupper():
            raise ValueError(f"not an HTTP method: {method!r}")
        lines = [f"{method} {endpoint.target} HTTP/1.1\r\nHost: {endpoint.host_header}\r\n"]
        if isinstance(body, bytes):
            lines.append(f"Content-Length: {len(body)}\r\n")
        elif body is not None:
            lines.append("Transfer-Encoding: chunked\r\n")
        for name, value in headers.items():
            if "\r" in value or "\n" in value:
                raise ValueError(f"header {name} has a line break")
            lines.append(f"{name}: {value}\r\n")
        lines.append("\r\n")
        head = "".join(lines).encode("latin-1")
        key = (endpoint.scheme, endpoint.host, endpoint.port)
        if body is not None and not isinstance(body, bytes):
            # A streamed body cannot be sent twice, so it never goes on a kept-alive connection
            # that the engine may be closing: a new connection's failure means the engine's.
            return await self._exchange(key, await self._connect(endpoint), head, body)
        request = head + body if body is not None else head
        conn = self._take(key)
        if conn is not None:
            try:
                return await self._exchange(key, conn, request)
            except EngineConnectError:
                # A kept-alive connection the engine closed as the request went out: it read
                # nothing of it. Once more on a new connection, which tells a gone engine apart.
                pass
        return await self._exchange(key, await self._connect(endpoint), request)

    async def _exchange(self, key: tuple[str, str, int], conn: EngineConnection, request: bytes,
                        body: AsyncIterable[bytes] | None = None) -> EngineResponse:
        conn.send(request, self.read_timeout, body_follows=body is not None)
        try:
            if body is None:
                await conn.head()
            else:
                await self._send_body(conn, body)
        except BaseException:
            conn.abort()
            raise
        return EngineResponse(self, key, conn)

    @staticmethod
    async def _send_body(conn: EngineConnection, body: AsyncIterable[bytes]) -> None:
        """Stream the body while waiting for the head: an engine may answer (say, 413) before
        the body ends, and then the rest is not sent."""
        writer = asyncio.ensure_future(conn.write_body(body))
        head = asyncio.ensure_future(conn.head())
        try:
            await asyncio.wait((writer, head), return_when=asyncio.FIRST_COMPLETED)
            if writer.done():
                writer.result()  # the body's own error (its client left) ends the exchange
                await head
            else:
                await head
                writer.cancel()  # and the connection is not reused: the body did not end
        finally:
            for task in (writer, head):
                if not task.done():
                    task.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await writer

    def close(self) -> None:
        for conns in self._idle.values():
            for conn in conns:
                conn.abort()
        self._idle.clear()
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None

    def _take(self, key: tuple[str, str, int]) -> EngineConnection | None:
        conns = self._idle.get(key)
        now = time.monotonic()
        while conns:
            conn = conns.pop()
            if conn.alive and now - conn.idle_since < self._keepalive_timeout:
                return conn
            conn.abort()
        return None

    def _give_back(self, key: tuple[str, str, int], conn: EngineConnection) -> None:
        reusable = conn.reusable
        conn.finish()
        conns = self._idle.setdefault(key, [])
        if not reusable or len(conns) >= _MAX_IDLE_PER_ENGINE:
            conn.abort()
            return
        conn.idle_since = time.monotonic()
        conns.append(conn)
        if self._sweeper is None:
            self._sweeper = asyncio.get_running_loop().call_later(
                self._keepalive_timeout / 2, self._sweep)

    def _sweep(self) -> None:
        """Close the connections idle for longer than the keep-alive timeout, so that a quiet
        gateway holds no sockets (engines may keep theirs open for longer than we do)."""
        self._sweeper = None
        now = time.monotonic()
        for key, conns in list(self._idle.items()):
            keep = []
            for conn in conns:
                if conn.alive and now - conn.idle_since < self._keepalive_timeout:
                    keep.append(conn)
                else:
                    conn.abort()
            if keep:
                self._idle[key] = keep
            else:
                del self._idle[key]
        if self._idle:
            self._sweeper = asyncio.get_running_loop().call_later(
                self._keepalive_timeout / 2, self._sweep)

    async def _connect(self, endpoint: Endpoint) -> EngineConnection:
        loop = asyncio.get_running_loop()
        tls = self._ssl if endpoint.scheme == "https" else None
        try:
            async with asyncio.timeout(self._connect_timeout):
                transport, conn = await loop.create_connection(
                    lambda: EngineConnection(loop), endpoint.host, endpoint.port, ssl=tls,
                    server_hostname=endpoint.host if tls else None)
        except TimeoutError:
            raise EngineConnectError(
                f"connecting to {endpoint.host}:{endpoint.port} took over "
                f"{self._connect_timeout:g}s") from None
        except OSError as exc:  # refused, unreachable, TLS refused
            raise EngineConnectError(
                f"cannot connect to {endpoint.host}:{endpoint.port}: {exc}") from None
        sock = transport.get_extra_info("socket")
        if sock is not None:
            set_dead_peer_options(sock, self._dead_peer_timeout)
        return conn
