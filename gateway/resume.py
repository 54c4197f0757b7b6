"""Continuing a broken stream on another worker of its model, into the same client stream.

When a continuable stream's worker fails after the first byte (its connection reset or closed
before `[DONE]`, an error event, or `--stall-timeout` of silence), the proxy hands what its
`StreamTrack` kept to `Resumer.resume`: a completion from the prompt's and the answer's token
ids goes to another worker, and its events are relayed re-shaped (gateway/reshape.py). A
continuation that fails too is continued again, up to `--max-continuations` in all.

Each continuation holds its worker through its own routing-table `Lease`, settled once where
it ends, as the proxy's attempts do.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncGenerator, Awaitable, Callable

import pydantic_core

from controller.protocol import WorkerRecord
from fleetcore.errors import FleetError
from gateway.asgi import ClientGone, ClientWatch
from gateway.engine_client import (
    EngineBroke,
    EngineConnectError,
    EngineError,
    EngineResponse,
    EngineTimeout,
)
from gateway.metrics import GatewayMetrics
from gateway.reshape import Answer, Reshaper, continuation_body, finish_only, held_text
from gateway.routed_request import RoutedRequest
from gateway.routing_table import Lease, Outcome, RoutingTable

logger = logging.getLogger(__name__)

# (worker, path, body, request id) -> the engine's answer, its head read.
Send = Callable[[WorkerRecord, str, bytes, str], Awaitable[EngineResponse]]
ErrorEvent = Callable[[str], bytes]
_DONE = b"data: [DONE]"
_ERROR = b'data: {"error"'
_DETOKENIZE_TIMEOUT = 10.0


class EngineErrorEvent(EngineBroke):
    """The engine ended its stream with an error event."""


class ContinuationRefused(EngineError):
    """The worker answered the continuation with an error status."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(f"HTTP {status}: {detail}")
        self.status = status


def failure_reason(exc: EngineError) -> str:
    """The `reason` label of a continuation after `exc`."""
    if isinstance(exc, EngineTimeout):
        return "stall"
    if isinstance(exc, EngineErrorEvent):
        return "error_event"
    return "broke"


class Resumer:
    def __init__(self, table: RoutingTable, metrics: GatewayMetrics, send: Send, *,
                 max_continuations: int, stall_timeout: float, error_event: ErrorEvent) -> None:
        self._table = table
        self._metrics = metrics
        self._send = send
        self.max_continuations = max_continuations
        self.stall_timeout = stall_timeout
        self._error_event = error_event

    async def resume(self, answer: Answer, request: RoutedRequest, watch: ClientWatch,
                     reason: str, failed: str) -> AsyncGenerator[bytes, None]:
        """The rest of the client's stream, from the continuations: whatever happens, it
        ends the stream (with [DONE], or today's error event when it cannot go on)."""
        assert request.route is not None
        route = request.route
        while True:
            if answer.finished:  # the finish came; only its end was lost
                yield finish_only(answer, "stop")
                return
            kept = answer.cut()
            remaining = answer.remaining(kept)
            if remaining is not None and remaining <= 0:
                yield finish_only(answer, "length")
                return
            if answer.continuations >= self.max_continuations:
                yield self._error_event(f"The worker serving this stream failed ({failed}), "
                                        f"and so did {answer.continuations} continuation(s).")
                return
            answer.continuations += 1
            try:
                lease = await watch.guard(self._table.acquire(
                    route, exclude=request.tried, started=request.started))
            except ClientGone:
                return
            except FleetError as exc:
                yield self._error_event(f"The worker serving this stream failed ({failed}); "
                                        f"no other worker could continue it: {exc.message}")
                return
            request.tried.add(lease.worker_id)
            self._metrics.continuations.labels(lease.model, reason).inc()
            logger.warning("continuing stream request_id=%s worker=%s reason=%s kept_tokens=%d "
                           "continuation=%d", request.request_id, lease.worker_id, reason, kept,
                           answer.continuations)
            outcome = Outcome.CLIENT_GONE  # until the continuation ends otherwise
            try:
                # Closed at once if the client leaves, so the new worker's engine aborts it.
                async with contextlib.aclosing(
                        self._continue(answer, kept, lease, request, watch)) as pieces:
                    async for piece in pieces:
                        yield piece
                outcome = Outcome.DONE
                return
            except ClientGone:
                return
            except EngineConnectError as exc:
                outcome, reason, failed = Outcome.CONNECT_ERROR, "broke", repr(exc)
            except ContinuationRefused as exc:
                # The worker is alive and said no: a failure, not a dead worker.
                outcome = (Outcome.RETRY_STATUS if exc.status in (502, 503, 504)
                           else Outcome.ENGINE_ERROR)
                reason, failed = "refused", repr(exc)
                logger.warning("continuation refused request_id=%s worker=%s error=%s",
                               request.request_id, lease.worker_id, failed)
            except EngineError as exc:
                if watch.gone:
                    return
                outcome, reason, failed = Outcome.STREAM_BROKE, failure_reason(exc), repr(exc)
                logger.warning("continuation broke request_id=%s worker=%s error=%s",
                               request.request_id, lease.worker_id, failed)
            except asyncio.CancelledError:
                outcome = Outcome.CANCELLED
                raise
            finally:
                lease.settle(outcome)

    async def _continue(self, answer: Answer, kept: int, lease: Lease, request: RoutedRequest,
                        watch: ClientWatch) -> AsyncGenerator[bytes, None]:
        """One continuation on the leased worker, relayed; raises EngineError if it fails."""
        model, worker = lease.model, lease.worker
        held = ""
        if answer.needs_text:
            kept, held = await self._held_text(answer, kept, worker, model, request, watch)
        body = continuation_body(answer, model, kept)
        upstream = await watch.guard(self._send(worker, "/v1/completions", body,
                                                request.request_id))
        finished = stopped = False
        try:
            watch.on_gone(upstream.close)
            if upstream.status != 200:
                detail = (await upstream.read())[:300].decode(errors="replace")
                raise ContinuationRefused(upstream.status, detail)
            lease.answered()
            shaper = Reshaper(answer, kept, held)
            carry = b""
            first = True
            while chunk := await upstream.read_chunk():
                if first:
                    upstream.set_read_timeout(self.stall_timeout)
                    first = False
                events = (carry + chunk).split(b"\n\n")
                carry = events.pop()
                for event in events:
                    if event == _DONE:
                        finished = True
                        break
                    if event.startswith(_ERROR):
                        raise EngineErrorEvent(event[6:300].decode(errors="replace"))
                    if not event.startswith(b"data: "):
                        continue
                    piece = shaper.feed(pydantic_core.from_json(event[6:]))
                    if piece:
                        yield piece
                    if shaper.stopped is not None:
                        finished = stopped = True
                        break
                if finished:
                    break
            if not finished:
                raise EngineBroke("the engine closed the stream before [DONE]")
            yield shaper.end()
        finally:
            if finished and not stopped:
                upstream.release()
            else:
                upstream.close()  # a stop found here, the client gone: vLLM aborts it

    async def _held_text(self, answer: Answer, kept: int, worker: WorkerRecord, model: str,
                         request: RoutedRequest, watch: ClientWatch) -> tuple[int, str]:
        """Where the seam goes, and the text there the client has not seen, from the new
        worker's detokenizer."""
        text = ""
        try:
            for _ in range(4):  # a UTF-8 character has at most four bytes
                text = await self._detokenize(answer.generated[:kept], worker, model, request,
                                              watch)
                if not text.endswith("\ufffd") or kept == 0:
                    break
                kept -= 1
        except (EngineError, TimeoutError, ValueError, KeyError) as exc:
            logger.warning("detokenize failed request_id=%s worker=%s error=%r",
                           request.request_id, worker.worker_id, exc)
            return kept, ""
        hold = answer.plan.hold
        return kept, held_text(text, answer.relayed_text(), hold) if hold else ""

    async def _detokenize(self, tokens: list[int], worker: WorkerRecord, model: str,
                          request: RoutedRequest, watch: ClientWatch) -> str:
        if not tokens:
            return ""
        body = pydantic_core.to_json({"model": model, "tokens": tokens})
        async with asyncio.timeout(_DETOKENIZE_TIMEOUT):
            upstream = await watch.guard(self._send(worker, "/detokenize", body,
                                                    request.request_id))
            try:
                payload = await upstream.read()
            finally:
                upstream.release()
        if upstream.status != 200:
            raise EngineBroke(f"detokenize: HTTP {upstream.status}")
        return str(pydantic_core.from_json(payload)["prompt"])
