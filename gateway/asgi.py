"""The generation endpoints as plain ASGI, below FastAPI's routing, and the streamed relay.

The streaming path is the gateway's cost per request, so these two routes skip FastAPI's router,
dependency solving, Starlette's middleware (whose error middleware wraps every chunk sent) and
StreamingResponse (an anyio task group per response): the measured CPU per streamed request fell
by about a third (bench/RESULTS.md). FastAPI still declares the routes, for the OpenAPI spec.
Errors get the same OpenAI body as on the other routes: a `FleetError` its own status, anything
else a logged 500.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, Protocol, TypeVar

from starlette.applications import Starlette
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from fleetcore.errors import FleetError, ServerError, error_response

logger = logging.getLogger(__name__)
T = TypeVar("T")
Handler = Callable[[Request], Awaitable[Any]]


class ClientGone(Exception):
    """The client disconnected while we waited on the engine."""


class ClientWatch:
    """Watches for the client to disconnect once its body is read.

    While the gateway waits for an engine's headers, a disconnect cancels the wait (`guard`);
    while it relays a stream, a disconnect runs the callbacks given to `on_gone`, which close
    the engine's connection, so vLLM aborts the request even in the middle of a long prefill.

    Under the gateway's own server (gateway/server.py) the connection's loss is a callback
    of its request cycle (one with an `on_gone` list); under any other ASGI server a task
    waits for `http.disconnect`.
    """

    __slots__ = ("_callbacks", "_cycle", "_gone", "_loop", "_task")

    def __init__(self, receive: Receive) -> None:
        self._callbacks: list[Callable[[], object]] = []
        self._gone = False
        self._task: asyncio.Task[None] | None = None
        cycle: Any = getattr(receive, "__self__", None)
        if hasattr(type(cycle), "on_gone"):  # gateway/server.py's WatchedCycle
            self._cycle: Any = cycle
            self._loop = cycle.loop
            if cycle.disconnected:
                self._loop.call_soon(self._fire)
            elif cycle.on_gone is None:
                cycle.on_gone = [self._fire]
            else:
                cycle.on_gone.append(self._fire)
        else:
            self._cycle = None
            self._loop = asyncio.get_running_loop()
            self._task = self._loop.create_task(self._wait(receive))
            self._task.add_done_callback(self._done)

    @staticmethod
    async def _wait(receive: Receive) -> None:
        while (await receive())["type"] != "http.disconnect":
            pass

    def _done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled():
            self._fire()

    def _fire(self) -> None:
        if self._gone:
            return
        self._gone = True
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback()

    @property
    def gone(self) -> bool:
        return self._gone

    async def guard(self, awaitable: Awaitable[T]) -> T:
        """Await `awaitable`, unless the client leaves first: then raise ClientGone."""
        if self._gone:
            if inspect.iscoroutine(awaitable):
                awaitable.close()
            raise ClientGone
        task = asyncio.current_task()
        assert task is not None
        cancel = task.cancel
        self._callbacks.append(cancel)
        try:
            return await awaitable
        except asyncio.CancelledError:
            if self.gone and task.uncancel() == 0:  # (set meanwhile, by `_fire`)
                raise ClientGone from None
            raise
        finally:
            with contextlib.suppress(ValueError):
                self._callbacks.remove(cancel)

    def on_gone(self, callback: Callable[[], object]) -> None:
        if self._gone:
            self._loop.call_soon(callback)
        else:
            self._callbacks.append(callback)

    def close(self) -> None:
        """Stop watching: no callback runs after this."""
        self._callbacks = []
        if self._task is not None:
            self._task.cancel()
        elif self._cycle is not None:
            with contextlib.suppress(ValueError):
                (self._cycle.on_gone or []).remove(self._fire)
            self._cycle = None


class FinalChunk(bytes):
    """The last bytes of a relayed stream: they go out with the end of the response, in one
    write (a server writes the chunked terminator with a body message that has no more)."""


class RelayResponse:
    """A streamed answer: the engine's bytes go to the client as they arrive, one ASGI message
    each, with no task group around them. A `FinalChunk` from the body ends the response.

    `on_close` runs once the response is over, however it ended: it lets go of what the body
    would have let go of, had it begun (a body generator that never ran has no `finally`).
    `add_close` adds more such callbacks, run after it in order."""

    def __init__(self, body: AsyncIterator[bytes], status_code: int,
                 headers: dict[str, str], media_type: str,
                 on_close: Callable[[], object] | None = None) -> None:
        self.body = body
        self.status_code = status_code
        self.headers = headers
        self.media_type = media_type
        self._closers = [on_close] if on_close is not None else []

    def add_close(self, callback: Callable[[], object]) -> None:
        self._closers.append(callback)

    def _close(self) -> None:
        for close in self._closers:
            try:
                close()
            except Exception:  # noqa: BLE001 - one failing callback must not skip the others
                logger.exception("closing a relayed response failed callback=%r", close)

    def raw_headers(self) -> list[tuple[bytes, bytes]]:
        raw = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in self.headers.items()]
        raw.append((b"content-type", self.media_type.encode("latin-1")))
        return raw

    async def relay(self, out: RelayOut) -> None:
        """Relay the body to `out`, then run the close callbacks: what an ASGI server gets
        from `__call__`, and gateway/server.py's `DirectCycle` directly."""
        ended = False
        try:
            await out.relay_head(self.status_code, self.raw_headers())
            try:
                async for chunk in self.body:
                    if ended:  # nothing goes after the final chunk (the body drains the engine)
                        continue
                    ended = type(chunk) is FinalChunk
                    await out.relay_chunk(chunk, not ended)
            finally:
                with contextlib.suppress(Exception):
                    await self.body.aclose()  # type: ignore[attr-defined]
        finally:
            self._close()
        if not ended:
            await out.relay_chunk(b"", False)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self.relay(_AsgiOut(send))


class RelayOut(Protocol):
    """Where a relayed response goes: its head, then its body, piece by piece."""

    async def relay_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None: ...

    async def relay_chunk(self, chunk: bytes, more: bool) -> None: ...


class _AsgiOut:
    """A relayed response as ASGI messages."""

    __slots__ = ("_send",)

    def __init__(self, send: Send) -> None:
        self._send = send

    async def relay_head(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        await self._send({"type": "http.response.start", "status": status, "headers": headers})

    async def relay_chunk(self, chunk: bytes, more: bool) -> None:
        await self._send({"type": "http.response.body", "body": chunk, "more_body": more})


class _Headers(Headers):
    """Headers as Starlette's, looked up in a dict made on first use rather than by a scan
    of the list each time: a routed request reads half a dozen of them."""

    _first: dict[str, str] | None = None

    def _lookup(self) -> dict[str, str]:
        first = self._first
        if first is None:
            first = {}
            for name, value in self.raw:  # names are lower-case in ASGI; the first one wins
                first.setdefault(name.decode("latin-1"), value.decode("latin-1"))
            self._first = first
        return first

    def __getitem__(self, key: str) -> str:
        return self._lookup()[key.lower()]

    def __contains__(self, key: Any) -> bool:
        return isinstance(key, str) and key.lower() in self._lookup()

    def get(self, key: str, default: Any = None) -> Any:
        return self._lookup().get(key.lower(), default)


class FleetRequest(Request):
    """Starlette's request, with headers looked up in a dict (`_Headers`)."""

    @property
    def headers(self) -> Headers:
        if not hasattr(self, "_headers"):
            self._headers = _Headers(scope=self.scope)
        return self._headers


class GenerateRoutes:
    """ASGI app: POST to one of `routes`, or any method to a path under one of `under`, goes to
    its handler; the rest to `app`."""

    def __init__(self, app: ASGIApp, routes: dict[str, Handler],
                 under: dict[str, Handler] | None = None) -> None:
        self.app = app
        self.routes = routes
        self.under = under or {}

    @classmethod
    def install(cls, app: Starlette, routes: dict[str, Handler],
                under: dict[str, Handler] | None = None) -> None:
        """Serve `routes` ahead of `app`'s middleware stack (built on its first request)."""
        build = app.build_middleware_stack
        app.build_middleware_stack = (  # type: ignore[method-assign]
            lambda: cls(build(), routes, under))
        app.state.generate_routes = (routes, under)

    @classmethod
    def ahead_of(cls, app: Starlette, wrapped: ASGIApp) -> GenerateRoutes:
        """The routes `install`ed on `app`, served ahead of `wrapped` (the app as the server
        wraps it), so they skip the app's own `__call__` and the server's middleware too.
        They read neither the client's address nor the scheme, which that middleware sets."""
        routes, under = app.state.generate_routes
        return cls(wrapped, routes, under)

    def _handler(self, scope: Scope) -> Handler | None:
        if scope["type"] != "http":
            return None
        path = scope["path"]
        if scope["method"] == "POST" and (handler := self.routes.get(path)) is not None:
            return handler
        return next((h for prefix, h in self.under.items() if path.startswith(prefix)), None)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        handler = self._handler(scope)
        if handler is None:
            await self.app(scope, receive, send)
            return
        response = await answer(handler, FleetRequest(scope, receive))
        await response(scope, receive, send)


async def answer(handler: Handler, request: Request) -> Any:
    """The handler's response; a `FleetError` as its OpenAI body, anything else a logged 500."""
    try:
        return await handler(request)
    except FleetError as exc:
        return error_response(exc)
    except Exception:
        logger.exception("unhandled error path=%s", request.scope["path"])
        return error_response(ServerError("Internal error; the server logged the details."))
