"""Relaying one request to an engine: pick a worker, retry before the first byte, stream bytes.

The client's body goes upstream as it came, and the engine's bytes come back as they arrive:
no per-token parsing on the streaming path. Only the last few KiB of a stream are kept, to read
the usage event if the client asked for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import pydantic_core
from fastapi import Request
from starlette.responses import Response

from controller.protocol import WorkerRecord
from fleet.errors import (
    BadGatewayError,
    FleetError,
    GatewayTimeoutError,
    ServiceUnavailableError,
)
from gateway.asgi import ClientGone, ClientWatch, RelayResponse
from gateway.engine_client import (
    Endpoint,
    EngineClient,
    EngineConnectError,
    EngineError,
    EngineResponse,
    EngineTimeout,
)
from gateway.metrics import GatewayMetrics
from gateway.routing import RouteRequest
from gateway.routing_table import RoutingTable

logger = logging.getLogger(__name__)

# Told the usage of a response when it ends: None when it had none (a stream cut off).
UsageHook = Callable[[dict[str, Any] | None], None]
RETRY_STATUSES = frozenset({502, 503, 504})
_TAIL_BYTES = 4096


def sse_error_event(message: str, code: str = "upstream_error") -> bytes:
    """The last event of a stream that broke: an OpenAI-style error, then [DONE]."""
    body = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return f"data: {json.dumps(body)}\n\ndata: [DONE]\n\n".encode()


def usage_from_sse_tail(tail: bytes) -> dict[str, Any] | None:
    """The usage object of the last event that carries one, if the stream's tail has it."""
    end = len(tail)
    # Only the events that mention usage are parsed: this runs once per stream.
    while (at := tail.rfind(b'"usage"', 0, end)) >= 0:
        start = tail.rfind(b"data: {", 0, at)
        if start < 0:
            return None
        stop = tail.find(b"\n\n", at)
        with contextlib.suppress(ValueError):
            usage = pydantic_core.from_json(tail[start + 6:stop if stop >= 0 else len(tail)])
            if isinstance(usage, dict) and (usage := usage.get("usage")):
                return usage
        end = start
    return None


class Proxy:
    def __init__(
        self,
        engines: EngineClient,
        table: RoutingTable,
        metrics: GatewayMetrics,
        *,
        max_attempts: int,
        retry_backoff: float = 0.05,
        rng: random.Random | None = None,
    ) -> None:
        self._engines = engines
        self._table = table
        self._metrics = metrics
        self._max_attempts = max_attempts
        self._retry_backoff = retry_backoff
        self._rng = rng or random.Random()
        self._endpoints: dict[tuple[object, str], Endpoint] = {}

    async def _backoff(self, attempt: int) -> None:
        # Exponential with jitter, so retries of a burst do not arrive in lockstep.
        delay = self._retry_backoff * (2 ** (attempt - 1)) * self._rng.uniform(0.5, 1.5)
        await asyncio.sleep(min(delay, 2.0))

    async def forward(
        self, request: Request, path: str, body: bytes, route: RouteRequest, stream: bool,
        request_id: str, started: float, on_usage: UsageHook | None = None,
    ) -> Response | RelayResponse:
        watch = ClientWatch(request.receive)
        try:
            response = await self._forward(watch, path, body, route, stream, request_id,
                                           started, on_usage)
        except BaseException:
            watch.close()
            raise
        if not isinstance(response, RelayResponse):
            watch.close()  # a stream's relay closes it when the stream ends
        return response

    async def _forward(
        self, watch: ClientWatch, path: str, body: bytes, route: RouteRequest, stream: bool,
        request_id: str, started: float, on_usage: UsageHook | None,
    ) -> Response | RelayResponse:
        table, model = self._table, route.model
        tried: set[str] = set()
        last_error = ""
        for attempt in range(self._max_attempts):
            if attempt:
                await self._backoff(attempt)
            try:
                choice = await table.acquire(route, exclude=tried)
            except FleetError:
                if not tried:
                    raise
                break
            worker = choice.worker
            wid = worker.worker_id
            tried.add(wid)
            logger.debug("route request_id=%s model=%s policy=%s worker=%s attempt=%d reason=%s",
                         request_id, model, table.policy_for(model).name, wid, attempt + 1,
                         choice.reason)
            try:
                upstream = await watch.guard(self._send(worker, path, body, request_id))
            except ClientGone:
                table.release(wid)
                logger.info("client left before the first byte request_id=%s", request_id)
                return Response(status_code=499)
            except EngineTimeout:
                # The engine took the request and went quiet: sending it elsewhere could run it
                # twice, so the client hears about it.
                table.release(wid)
                table.breakers[wid].record_failure()
                raise GatewayTimeoutError(
                    f"Worker {wid} sent nothing for {self._engines.read_timeout:g}s."
                ) from None
            except EngineConnectError as exc:
                table.release(wid)
                # Refused or reset: the worker is gone, whatever the controller still says.
                table.breakers[wid].record_failure(fatal=True)
                last_error = f"{wid}: {type(exc).__name__}: {exc}"
                self._metrics.retries.labels(model, "connect").inc()
                logger.warning("upstream failed request_id=%s worker=%s attempt=%d error=%s",
                               request_id, wid, attempt + 1, last_error)
                continue
            except EngineError as exc:
                # It began an answer and broke it off, or answered garbage: the request may have
                # run, so it is not sent again.
                table.release(wid)
                table.breakers[wid].record_failure()
                raise BadGatewayError(f"Worker {wid} broke off its answer: {exc}") from None
            if upstream.status in RETRY_STATUSES:
                upstream.release()
                table.release(wid)
                table.breakers[wid].record_failure()
                last_error = f"{wid}: HTTP {upstream.status}"
                self._metrics.retries.labels(model, str(upstream.status)).inc()
                logger.warning("upstream refused request_id=%s worker=%s status=%d",
                               request_id, wid, upstream.status)
                continue
            table.breakers[wid].record_success()
            headers = {"X-Request-Id": request_id, "X-Fleet-Worker": wid}
            content_type = upstream.content_type or "application/json"
            if stream and upstream.status == 200:
                return RelayResponse(
                    self._relay(upstream, worker, model, request_id, started, watch, on_usage),
                    status_code=200, headers=headers, media_type=content_type,
                )
            try:
                payload = await watch.guard(upstream.read())
            except ClientGone:
                return Response(status_code=499)
            except EngineError as exc:
                table.breakers[wid].record_failure()
                raise BadGatewayError(f"Worker {wid} broke off its answer: {exc!r}") from None
            finally:
                upstream.release()
                table.release(wid)
            if upstream.status == 200:
                usage = None
                with contextlib.suppress(ValueError, AttributeError):
                    usage = pydantic_core.from_json(payload).get("usage")
                    self._metrics.count_usage(model, usage)
                if on_usage is not None:
                    on_usage(usage)
            self._metrics.latency.labels(model).observe(time.monotonic() - started)
            return Response(payload, status_code=upstream.status, headers=headers,
                            media_type=content_type)
        raise ServiceUnavailableError(
            f"No worker for model '{model}' could take the request after {len(tried)} "
            f"attempt(s); last error: {last_error}. Retry shortly.",
            code="upstream_unavailable", headers={"Retry-After": "2"},
        )

    async def _send(
        self, worker: WorkerRecord, path: str, body: bytes, request_id: str
    ) -> EngineResponse:
        headers = {"Content-Type": "application/json", "X-Request-Id": request_id}
        if worker.engine_api_key:
            headers["Authorization"] = f"Bearer {worker.engine_api_key}"
        endpoint = self._endpoints.get((worker.engine_url, path))
        if endpoint is None:  # parsed once per engine and path, not per request
            if len(self._endpoints) > 4096:  # engines come and go on new ports
                self._endpoints.clear()
            endpoint = self._endpoints[(worker.engine_url, path)] = Endpoint.from_url(
                f"{str(worker.engine_url).rstrip('/')}{path}")
        return await self._engines.post(endpoint, body, headers)

    async def _relay(
        self, upstream: EngineResponse, worker: WorkerRecord, model: str,
        request_id: str, started: float, watch: ClientWatch,
        on_usage: UsageHook | None = None,
    ) -> AsyncIterator[bytes]:
        # A client that leaves closes the engine's connection at once, even mid-prefill.
        watch.on_gone(upstream.close)
        finished = False
        first = True
        # The last two chunks: enough for the usage event, without copying every chunk.
        previous = last = b""
        try:
            read_chunk = upstream.read_chunk
            while chunk := await read_chunk():
                if first:
                    self._metrics.ttft.labels(model).observe(time.monotonic() - started)
                    first = False
                previous, last = last, chunk
                yield chunk
            finished = True
        except EngineError as exc:
            if watch.gone:
                # We closed the engine's connection because the client left: not the worker's
                # fault, and nobody is listening for an error event.
                logger.info("client left mid-stream request_id=%s", request_id)
                return
            self._table.breakers[worker.worker_id].record_failure(fatal=True)
            logger.warning("stream broke request_id=%s worker=%s error=%r",
                           request_id, worker.worker_id, exc)
            yield sse_error_event(f"The worker serving this stream failed: {exc!r}")
        finally:
            # On a client disconnect this closes the engine's connection, and vLLM aborts the
            # request; a finished stream returns its connection to the pool.
            watch.close()
            if finished:
                upstream.release()
            else:
                upstream.close()
            self._table.release(worker.worker_id)
            self._metrics.latency.labels(model).observe(time.monotonic() - started)
            usage = usage_from_sse_tail((previous + last)[-_TAIL_BYTES:]) if finished else None
            self._metrics.count_usage(model, usage)
            if on_usage is not None:
                on_usage(usage)
