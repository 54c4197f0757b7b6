"""Relaying one request to an engine: pick a worker, retry before the first byte, stream bytes.

The client's body goes upstream as it came, and the engine's bytes come back as they arrive:
no per-token parsing on the streaming path.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

import aiohttp
from fastapi import Request
from starlette.responses import Response, StreamingResponse

from controller.protocol import WorkerRecord
from fleet.errors import BadGatewayError, FleetError, ServiceUnavailableError
from gateway.routing_table import RoutingTable

logger = logging.getLogger(__name__)

T = TypeVar("T")
RETRY_STATUSES = frozenset({502, 503, 504})
# What a failure before the first byte looks like: the worker is gone, not the request bad.
_CONNECT_ERRORS = (
    aiohttp.ClientConnectorError,
    aiohttp.ServerDisconnectedError,
    aiohttp.ClientOSError,
    asyncio.TimeoutError,
)


class ClientGone(Exception):
    """The client disconnected while we waited on the engine."""


async def _disconnected(request: Request) -> None:
    # The body was read already, so the next message can only be the disconnect.
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def _unless_client_leaves(request: Request, awaitable: Awaitable[T]) -> T:
    work = asyncio.ensure_future(awaitable)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        await asyncio.wait({work, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if work.done():
        return work.result()
    work.cancel()
    with contextlib.suppress(BaseException):
        await work
    raise ClientGone


def sse_error_event(message: str, code: str = "upstream_error") -> bytes:
    """The last event of a stream that broke: an OpenAI-style error, then [DONE]."""
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()


class Proxy:
    def __init__(
        self,
        session: aiohttp.ClientSession,
        table: RoutingTable,
        *,
        max_attempts: int,
        connect_timeout: float,
        read_timeout: float,
    ) -> None:
        self._session = session
        self._table = table
        self._max_attempts = max_attempts
        self._timeout = aiohttp.ClientTimeout(
            total=None, connect=connect_timeout, sock_read=read_timeout
        )

    async def forward(
        self, request: Request, path: str, body: bytes, model: str, stream: bool,
        request_id: str,
    ) -> Response:
        tried: set[str] = set()
        last_error = ""
        for attempt in range(self._max_attempts):
            try:
                worker = self._table.pick(model, exclude=tried)
            except FleetError:
                if not tried:
                    raise
                break
            tried.add(worker.worker_id)
            self._table.inflight[worker.worker_id] += 1
            try:
                upstream = await _unless_client_leaves(
                    request, self._send(worker, path, body, request_id)
                )
            except ClientGone:
                self._release(worker)
                logger.info("client left before the first byte request_id=%s", request_id)
                return Response(status_code=499)
            except _CONNECT_ERRORS as exc:
                self._release(worker)
                self._table.mark_suspect(worker.worker_id)
                last_error = f"{worker.worker_id}: {type(exc).__name__}: {exc}"
                logger.warning("upstream failed request_id=%s worker=%s attempt=%d error=%s",
                               request_id, worker.worker_id, attempt + 1, last_error)
                continue
            if upstream.status in RETRY_STATUSES:
                last_error = f"{worker.worker_id}: HTTP {upstream.status}"
                upstream.release()
                self._release(worker)
                logger.warning("upstream refused request_id=%s worker=%s status=%d",
                               request_id, worker.worker_id, upstream.status)
                continue
            headers = {"X-Request-Id": request_id, "X-Fleet-Worker": worker.worker_id}
            content_type = upstream.headers.get("Content-Type", "application/json")
            if stream and upstream.status == 200:
                return StreamingResponse(
                    self._relay(upstream, worker, request_id),
                    status_code=200, headers=headers, media_type=content_type,
                )
            try:
                payload = await _unless_client_leaves(request, upstream.read())
            except ClientGone:
                return Response(status_code=499)
            except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
                raise BadGatewayError(
                    f"Worker {worker.worker_id} broke off its answer: {exc!r}"
                ) from None
            finally:
                upstream.release()
                self._release(worker)
            return Response(payload, status_code=upstream.status, headers=headers,
                            media_type=content_type)
        raise ServiceUnavailableError(
            f"No worker for model '{model}' could take the request after {len(tried)} "
            f"attempt(s); last error: {last_error}. Retry shortly.",
            code="upstream_unavailable", headers={"Retry-After": "2"},
        )

    async def _send(
        self, worker: WorkerRecord, path: str, body: bytes, request_id: str
    ) -> aiohttp.ClientResponse:
        headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
        if worker.engine_api_key:
            headers["Authorization"] = f"Bearer {worker.engine_api_key}"
        return await self._session.post(
            f"{str(worker.engine_url).rstrip('/')}{path}",
            data=body, headers=headers, timeout=self._timeout,
        )

    def _release(self, worker: WorkerRecord) -> None:
        self._table.inflight[worker.worker_id] -= 1
        if self._table.inflight[worker.worker_id] <= 0:
            del self._table.inflight[worker.worker_id]

    async def _relay(
        self, upstream: aiohttp.ClientResponse, worker: WorkerRecord, request_id: str
    ) -> AsyncIterator[bytes]:
        finished = False
        try:
            async for chunk in upstream.content.iter_any():
                yield chunk
            finished = True
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            logger.warning("stream broke request_id=%s worker=%s error=%r",
                           request_id, worker.worker_id, exc)
            yield sse_error_event(f"The worker serving this stream failed: {exc!r}")
        finally:
            # On a client disconnect this closes the engine's connection, and vLLM aborts the
            # request; a finished stream returns its connection to the pool.
            if finished:
                upstream.release()
            else:
                upstream.close()
            self._release(worker)
