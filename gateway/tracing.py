"""The gateway's spans: one per request, one per attempt on a worker.

A request's span (`POST /v1/chat/completions`, kind server) joins the client's trace if it sent
a `traceparent`, and ends when the request is settled: answered, refused, or, for a stream, when
its relay is over. Each attempt is a child span (`attempt`, kind client) that carries the worker,
the routing policy's reason for choosing it and how the attempt ended; its `traceparent` goes to
the engine, so vLLM's `llm_request` span is the attempt's child. A retry marks the attempt it
leaves as failed and adds a `retry` event to the request's span. `continued` is the hook for a
stream resumed on another worker: an event, and the next attempt is marked as a continuation.

Off (no `OTEL_*` configuration), the pipeline holds no `RequestTracing` and requests carry no
`RequestTrace`: the proxy's hooks are a None check each.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

from opentelemetry.trace import Span, SpanKind, Status, StatusCode, Tracer, set_span_in_context

from fleetcore import tracing
from fleetcore.errors import FleetError

if TYPE_CHECKING:
    from gateway.routed_request import RoutedRequest
    from gateway.routing_table import Lease


class RequestTracing:
    """Starts a `RequestTrace` for each request arriving at the gateway."""

    def __init__(self, tracer: Tracer) -> None:
        self._tracer = tracer

    def begin(self, routed: RoutedRequest, headers: Mapping[str, str]) -> RequestTrace:
        span = self._tracer.start_span(
            f"{routed.method} {routed.path.partition('?')[0]}", kind=SpanKind.SERVER,
            context=tracing.extract(headers),
            attributes={"http.request.method": routed.method, "url.path": routed.path,
                        "fleet.endpoint": routed.endpoint})
        trace = RequestTrace(self._tracer, span)
        routed.trace = trace
        return trace


class RequestTrace:
    """One request's span and its attempts' spans."""

    __slots__ = ("_tracer", "span", "_attempt", "_lease", "_continuation", "_ended")

    def __init__(self, tracer: Tracer, span: Span) -> None:
        self._tracer = tracer
        self.span = span
        self._attempt: Span | None = None
        self._lease: Lease | None = None
        self._continuation = False
        self._ended = False

    def attempt(self, lease: Lease, number: int) -> None:
        """An attempt on `lease`'s worker begins (the previous one, if any, is over)."""
        self._end_attempt()
        span = self._tracer.start_span(
            "attempt", kind=SpanKind.CLIENT, context=set_span_in_context(self.span),
            attributes={"fleet.worker_id": lease.worker_id, "fleet.attempt": number,
                        "fleet.route.reason": lease.reason,
                        "server.address": str(lease.worker.engine_url),
                        "fleet.continuation": self._continuation})
        self._continuation = False
        self._attempt, self._lease = span, lease

    def inject(self, headers: dict[str, str]) -> None:
        """The current attempt's `traceparent`, for the engine."""
        tracing.inject(self._attempt or self.span, headers)

    def retry(self, error: str) -> None:
        """The current attempt failed before an answer began; another worker is tried."""
        if self._attempt is not None:
            self._attempt.set_status(Status(StatusCode.ERROR, error))
        self.span.add_event("retry", {"fleet.error": error})
        self._end_attempt()

    def continued(self, worker_id: str, reason: str) -> None:
        """A stream that broke on `worker_id` goes on elsewhere: the hook for continuation."""
        self.span.add_event("continuation", {"fleet.worker_id": worker_id,
                                             "fleet.reason": reason})
        self._end_attempt()
        self._continuation = True

    def end(self, routed: RoutedRequest, status: int | None,
            error: BaseException | None = None) -> None:
        """The request is settled; `status` is what the client got, None if it got nothing."""
        if self._ended:
            return
        self._ended = True
        outcome = self._end_attempt()
        span = self.span
        span.set_attribute("fleet.request_id", routed.request_id)
        span.set_attribute("fleet.model", routed.route.model if routed.route else routed.model)
        span.set_attribute("fleet.policy", routed.policy)
        span.set_attribute("fleet.stream", routed.stream)
        span.set_attribute("fleet.attempts", routed.attempts)
        if outcome is not None:
            span.set_attribute("fleet.outcome", outcome)
        if isinstance(error, FleetError):
            status = error.status_code
            span.set_attribute("error.type", error.code or type(error).__name__)
        elif error is not None:
            span.set_attribute("error.type", type(error).__name__)
            span.set_status(Status(StatusCode.ERROR, repr(error)))
        if status is not None:
            span.set_attribute("http.response.status_code", status)
            if status >= 500:
                span.set_status(Status(StatusCode.ERROR))
        if outcome == "stream_broke":
            span.set_status(Status(StatusCode.ERROR, "the stream broke"))
        span.end()

    def _end_attempt(self) -> str | None:
        span, lease = self._attempt, self._lease
        self._attempt = self._lease = None
        if span is None or lease is None:
            return None
        outcome = lease.outcome.value if lease.outcome is not None else None
        if outcome is not None:
            span.set_attribute("fleet.outcome", outcome)
        span.end()
        return outcome
