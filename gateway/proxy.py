"""Relaying one request to an engine: pick a worker, retry before the first byte, stream bytes.

The client's body goes upstream as it came, and the engine's bytes come back as they arrive:
no per-token JSON on the streaming path. Only the last few KiB of a stream are kept, to read
the usage event if the client asked for one. A stream that another worker can continue
(gateway/continuation.py) asks its engine for token ids and passes each chunk through a
`StreamTrack` (a few substring searches); if its worker fails mid-answer, gateway/resume.py
finishes it elsewhere.

Each attempt holds its worker through a routing-table `Lease`, settled once with the attempt's
`Outcome` wherever it ends; a stream's lease goes with its relay, and is settled when the relay
ends, or by the response if the relay never began.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING, Any

import pydantic_core
from starlette.responses import Response

from controller.protocol import WorkerRecord
from fleetcore.errors import (
    BadGatewayError,
    FleetError,
    GatewayTimeoutError,
    ServiceUnavailableError,
)
from gateway.asgi import ClientGone, ClientWatch, FinalChunk, RelayResponse
from gateway.continuation import StreamTrack
from gateway.engine_client import (
    Endpoint,
    EngineBroke,
    EngineClient,
    EngineConnectError,
    EngineError,
    EngineResponse,
    EngineTimeout,
    RequestBody,
)
from gateway.metrics import GatewayMetrics
from gateway.reshape import Answer
from gateway.resume import EngineErrorEvent, Resumer, failure_reason
from gateway.routed_request import RoutedRequest
from gateway.routing_table import Lease, Outcome, RoutingTable

if TYPE_CHECKING:
    from gateway.tracing import RequestTrace

logger = logging.getLogger(__name__)

RETRY_STATUSES = frozenset({502, 503, 504})
_TAIL_BYTES = 4096
_SSE_DONE = b"data: [DONE]\n\n"  # the last event of an OpenAI stream


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
        max_continuations: int = 2,
        stall_timeout: float = 30.0,
    ) -> None:
        self._engines = engines
        self._table = table
        self._metrics = metrics
        self._max_attempts = max_attempts
        self._retry_backoff = retry_backoff
        self._rng = rng or random.Random()
        self._endpoints: dict[tuple[object, str], Endpoint] = {}
        # A stall is no longer than the read timeout: that still bounds any silence.
        self._stall_timeout = min(stall_timeout, engines.read_timeout)
        self.resumer = Resumer(table, metrics, self._send_to, max_continuations=max_continuations,
                               stall_timeout=self._stall_timeout, error_event=sse_error_event)

    async def _backoff(self, attempt: int) -> None:
        # Exponential with jitter, so retries of a burst do not arrive in lockstep.
        delay = self._retry_backoff * (2 ** (attempt - 1)) * self._rng.uniform(0.5, 1.5)
        await asyncio.sleep(min(delay, 2.0))

    async def forward(self, request: RoutedRequest, watch: ClientWatch
                      ) -> Response | RelayResponse:
        """Choose a worker and send the request, retrying elsewhere while no answer began."""
        try:
            response = await self._forward(request, watch)
        except BaseException:
            watch.close()
            raise
        if not isinstance(response, RelayResponse):
            watch.close()  # a stream's relay closes it when the stream ends
        return response

    async def _forward(self, request: RoutedRequest, watch: ClientWatch
                       ) -> Response | RelayResponse:
        assert request.route is not None, "the pipeline routes only parsed requests"
        table, model, tried = self._table, request.route.model, request.tried
        last_error = ""
        # A body streamed through from the client is gone once sent: it goes to one worker.
        attempts = 1 if request.upload is not None else self._max_attempts
        for attempt in range(attempts):
            if attempt:
                await self._backoff(attempt)
            try:
                if attempt and request.route.adapter is not None and table.adapters is not None:
                    # Placed again: the last worker may have lost the adapter. (The first
                    # attempt's placement is the pipeline's.)
                    await table.adapters.ensure(request.route)
                lease = await table.acquire(request.route, exclude=tried,
                                            started=request.started)
            except FleetError:
                if not tried:
                    raise
                break
            tried.add(lease.worker_id)
            if request.trace is not None:
                request.trace.attempt(lease, attempt + 1)
            logger.debug("route request_id=%s model=%s policy=%s worker=%s attempt=%d reason=%s",
                         request.request_id, model, request.policy, lease.worker_id, attempt + 1,
                         lease.reason)
            try:
                response = await self._attempt(request, lease, watch)
            except BaseException:
                # Whatever was not foreseen below (a cancelled task, a bug) still gives the
                # worker back; a settled lease ignores it.
                lease.settle(Outcome.CANCELLED)
                raise
            if isinstance(response, str):
                last_error = response
                if request.trace is not None:
                    request.trace.retry(response)
                continue
            return response
        raise ServiceUnavailableError(
            f"No worker for model '{model}' could take the request after {len(tried)} "
            f"attempt(s); last error: {last_error}. Retry shortly.",
            code="upstream_unavailable", headers={"Retry-After": "2"},
        )

    async def _attempt(self, request: RoutedRequest, lease: Lease, watch: ClientWatch
                       ) -> Response | RelayResponse | str:
        """One attempt on the leased worker: the response, or why to try another worker."""
        wid, model, request_id = lease.worker_id, lease.model, request.request_id
        try:
            upstream = await watch.guard(self._send(lease.worker, request))
        except ClientGone:
            lease.settle(Outcome.CLIENT_GONE)
            logger.info("client left before the first byte request_id=%s", request_id)
            return Response(status_code=499)
        except EngineTimeout:
            # The engine took the request and went quiet: sending it elsewhere could run it
            # twice, so the client hears about it.
            lease.settle(Outcome.TIMEOUT)
            raise GatewayTimeoutError(
                f"Worker {wid} sent nothing for {self._engines.read_timeout:g}s."
            ) from None
        except EngineConnectError as exc:
            # Refused or reset: the worker is gone, whatever the controller still says.
            lease.settle(Outcome.CONNECT_ERROR)
            error = f"{wid}: {type(exc).__name__}: {exc}"
            self._metrics.retries.labels(model, "connect").inc()
            logger.warning("upstream failed request_id=%s worker=%s attempt=%d error=%s",
                           request_id, wid, request.attempts, error)
            return error
        except EngineError as exc:
            # It began an answer and broke it off, or answered garbage: the request may have
            # run, so it is not sent again.
            lease.settle(Outcome.ENGINE_ERROR)
            raise BadGatewayError(f"Worker {wid} broke off its answer: {exc}") from None
        adapter = request.route.adapter if request.route is not None else None
        if upstream.status == 404 and adapter is not None and self._table.adapters is not None:
            # The engine does not hold the adapter after all (another gateway unloaded it, or
            # the engine restarted): not the worker's fault, and nothing ran; place it again.
            upstream.release()
            lease.settle(Outcome.CANCELLED)
            request.tried.discard(wid)  # it may take the request once it has loaded it again
            self._table.adapters.lost(wid, adapter)
            self._metrics.retries.labels(model, "adapter_missing").inc()
            logger.warning("adapter missing request_id=%s worker=%s adapter=%s", request_id, wid,
                           adapter)
            return f"{wid}: adapter {adapter} not loaded"
        if upstream.status in RETRY_STATUSES:
            upstream.release()
            lease.settle(Outcome.RETRY_STATUS)
            self._metrics.retries.labels(model, str(upstream.status)).inc()
            logger.warning("upstream refused request_id=%s worker=%s status=%d",
                           request_id, wid, upstream.status)
            return f"{wid}: HTTP {upstream.status}"
        lease.answered()
        headers = {"X-Request-Id": request_id, "X-Fleet-Worker": wid}
        content_type = upstream.content_type or "application/json"
        if request.stream and upstream.status == 200:
            def abandon() -> None:  # the response ended before its relay began
                upstream.close()
                watch.close()
                lease.settle(Outcome.CLIENT_GONE)

            return RelayResponse(
                self._relay(upstream, lease, request, watch),
                status_code=200, headers=headers, media_type=content_type, on_close=abandon,
            )
        try:
            payload = await watch.guard(upstream.read())
        except ClientGone:
            lease.settle(Outcome.CLIENT_GONE)
            return Response(status_code=499)
        except EngineError as exc:
            lease.settle(Outcome.ENGINE_ERROR)
            raise BadGatewayError(f"Worker {wid} broke off its answer: {exc!r}") from None
        finally:
            upstream.release()
        lease.settle(Outcome.DONE)
        if upstream.status == 200:
            if request.on_answer is not None:
                request.on_answer(payload, wid)
            usage = None
            with contextlib.suppress(ValueError, AttributeError):
                usage = pydantic_core.from_json(payload).get("usage")
                self._metrics.count_usage(model, usage)
            if request.on_usage is not None:
                request.on_usage(usage)
        return Response(payload, status_code=upstream.status, headers=headers,
                        media_type=content_type)

    async def _send(self, worker: WorkerRecord, request: RoutedRequest) -> EngineResponse:
        return await self._send_to(worker, request.path, request.upstream_body,
                                   request.request_id, request.method, request.content_type,
                                   request.trace)

    async def _send_to(self, worker: WorkerRecord, path: str, body: RequestBody,
                       request_id: str, method: str = "POST",
                       content_type: str = "application/json",
                       trace: RequestTrace | None = None) -> EngineResponse:
        headers = {"Content-Type": content_type, "X-Request-Id": request_id}
        if worker.engine_api_key:
            headers["Authorization"] = f"Bearer {worker.engine_api_key}"
        if trace is not None:
            trace.inject(headers)
        endpoint = self._endpoints.get((worker.engine_url, path))
        if endpoint is None:  # parsed once per engine and path, not per request
            if len(self._endpoints) > 4096:  # engines come and go on new ports
                self._endpoints.clear()
            endpoint = self._endpoints[(worker.engine_url, path)] = Endpoint.from_url(
                f"{str(worker.engine_url).rstrip('/')}{path}")
        return await self._engines.request(method, endpoint, headers, body)

    async def _relay(
        self, upstream: EngineResponse, lease: Lease, request: RoutedRequest,
        watch: ClientWatch,
    ) -> AsyncIterator[bytes]:
        model, request_id, started = lease.model, request.request_id, request.started
        # A client that leaves closes the engine's connection at once, even mid-prefill.
        watch.on_gone(upstream.close)
        outcome = Outcome.CLIENT_GONE  # until the stream ends otherwise
        first = True
        # The last two chunks: enough for the usage event, without copying every chunk.
        previous = last = b""
        track = StreamTrack(request.resume) if request.resume is not None else None
        answer: Answer | None = None
        try:
            read_chunk = upstream.read_chunk
            while chunk := await read_chunk():
                if first:
                    self._metrics.ttft.labels(model).observe(time.monotonic() - started)
                    first = False
                    if request.on_answer is not None:
                        request.on_answer(chunk, lease.worker_id)
                    if track is not None:  # running now: silence is a stall
                        upstream.set_read_timeout(self._stall_timeout)
                if track is not None:
                    chunk = track.feed(chunk)
                    if track.error is not None:
                        if chunk:
                            yield chunk
                        raise EngineErrorEvent(track.error[6:300].decode(errors="replace"))
                    if not chunk:
                        continue
                previous, last = last, chunk
                if track.done if track is not None else chunk.endswith(_SSE_DONE):
                    break
                yield chunk
            else:
                if track is not None and not track.done:
                    raise EngineBroke("the engine closed the stream before [DONE]")
                outcome = Outcome.DONE
                return
            # [DONE]: the client's answer is whole once this goes out, together with the
            # response's end. From here a client that leaves is no news, and what is left of
            # the engine's answer (the end of its body) only frees the connection.
            watch.close()
            yield FinalChunk(chunk)
            outcome = Outcome.DONE
            with contextlib.suppress(EngineError):  # an unfinished one is not kept for reuse
                while await read_chunk():
                    pass
        except EngineError as exc:
            if watch.gone:
                # We closed the engine's connection because the client left: not the worker's
                # fault, and nobody is listening for an error event.
                logger.info("client left mid-stream request_id=%s", request_id)
                return
            outcome = Outcome.STREAM_BROKE
            lease.settle(outcome)  # the breaker opens before the client hears of it
            upstream.close()
            logger.warning("stream broke request_id=%s worker=%s error=%r",
                           request_id, lease.worker_id, exc)
            answer = Answer.from_track(track) if track is not None else None
            if answer is None:
                if track is not None and track.error is not None:
                    yield track.error + b"data: [DONE]\n\n"  # the engine's own, as today
                else:
                    yield sse_error_event(f"The worker serving this stream failed: {exc!r}")
                return
            async with contextlib.aclosing(self.resumer.resume(
                    answer, request, watch, failure_reason(exc), repr(exc))) as rest:
                async for piece in rest:
                    previous, last = last, piece
                    yield piece
        except asyncio.CancelledError:
            outcome = Outcome.CANCELLED
            raise
        finally:
            # On a client disconnect this closes the engine's connection, and vLLM aborts the
            # request; a finished stream returns its connection to the pool.
            watch.close()
            finished = outcome is Outcome.DONE
            if finished:
                upstream.release()
            else:
                upstream.close()
            lease.settle(outcome)
            usage: dict[str, Any] | None = None
            if answer is not None and answer.finished:
                usage = answer.usage()
            elif finished:
                usage = usage_from_sse_tail((previous + last)[-_TAIL_BYTES:])
            self._metrics.count_usage(model, usage)
            if request.on_usage is not None:
                request.on_usage(usage)
