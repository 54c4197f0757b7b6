"""OpenTelemetry traces for every service: off unless the standard `OTEL_*` variables ask.

Tracing is on when an OTLP endpoint is given (`OTEL_EXPORTER_OTLP_ENDPOINT` or
`OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) or `OTEL_TRACES_EXPORTER` names an exporter (`otlp`,
`console`), and `OTEL_SDK_DISABLED` is not true. Off, `Tracing.from_env` returns None and the
services skip every hook: no tracer, no context objects, nothing on the request path.

On, each service owns one `Tracing` (its own `TracerProvider`, never the process-global one)
that exports in batches from a background thread. Everything else the SDK reads from its own
variables: headers, timeouts, certificates, `OTEL_BSP_*`, `OTEL_RESOURCE_ATTRIBUTES`.
`OTEL_SERVICE_NAME` overrides each service's default name. Context crosses processes as W3C
`traceparent` headers, which vLLM's engine reads too (`--otlp-traces-endpoint`, set by the
worker from the same variables: `engine_tracing_args`).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Mapping
from typing import Literal

from opentelemetry.context import Context
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
)
from opentelemetry.trace import Span, SpanKind, Tracer, set_span_in_context
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict

logger = logging.getLogger(__name__)

_PROPAGATOR = TraceContextTextMapPropagator()
# What vLLM's engine names itself in traces; its own default would be "unknown_service".
ENGINE_SERVICE_NAME = "vllm"


class OtelSettings(BaseSettings):
    """The standard OpenTelemetry variables that decide whether and where we export."""

    model_config = SettingsConfigDict(env_prefix="OTEL_", extra="ignore")

    sdk_disabled: bool = False
    traces_exporter: str = Field("", description="otlp, console or none.")
    exporter_otlp_endpoint: str = ""
    exporter_otlp_traces_endpoint: str = ""
    exporter_otlp_protocol: str = ""
    exporter_otlp_traces_protocol: str = ""
    service_name: str = ""

    @property
    def exporter(self) -> Literal["otlp", "console"] | None:
        if self.sdk_disabled:
            return None
        names = {n.strip() for n in self.traces_exporter.split(",") if n.strip()}
        if "none" in names:
            return None
        if "console" in names:
            return "console"
        if "otlp" in names or self.exporter_otlp_endpoint or self.exporter_otlp_traces_endpoint:
            return "otlp"
        return None

    @property
    def protocol(self) -> str:
        # The specification's default; the SDK's exporters follow the same variables.
        return (self.exporter_otlp_traces_protocol or self.exporter_otlp_protocol
                or "http/protobuf")


def _otlp_exporter(protocol: str) -> SpanExporter:
    # Imported only when used: the gRPC exporter pulls in grpcio.
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
            OTLPSpanExporter as GrpcExporter,
        )

        return GrpcExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter()
    raise ValueError(f"unsupported OTLP protocol {protocol!r}: grpc or http/protobuf")


class Tracing:
    """One service's tracer and exporter; `shutdown` flushes what is left."""

    def __init__(self, service_name: str, exporter: SpanExporter) -> None:
        self.provider = TracerProvider(resource=Resource.create({SERVICE_NAME: service_name}))
        self.provider.add_span_processor(BatchSpanProcessor(exporter))
        self.tracer: Tracer = self.provider.get_tracer("llm-fleet")

    @classmethod
    def from_env(cls, default_service_name: str,
                 settings: OtelSettings | None = None) -> Tracing | None:
        """This service's tracing as the `OTEL_*` variables configure it; None when off."""
        settings = settings or OtelSettings()
        kind = settings.exporter
        if kind is None:
            return None
        exporter = ConsoleSpanExporter() if kind == "console" else _otlp_exporter(
            settings.protocol)
        name = settings.service_name or default_service_name
        logger.info("tracing on service=%s exporter=%s protocol=%s", name, kind,
                    settings.protocol)
        return cls(name, exporter)

    def shutdown(self) -> None:
        self.provider.shutdown()


def inject(span: Span, headers: dict[str, str]) -> None:
    """Add the span's W3C `traceparent` to outgoing headers."""
    _PROPAGATOR.inject(headers, context=set_span_in_context(span))


def extract(headers: Mapping[str, str]) -> Context:
    """The caller's trace context from incoming headers (empty when it sent none)."""
    return _PROPAGATOR.extract(headers)


def engine_tracing_args(settings: OtelSettings | None = None
                        ) -> tuple[list[str], dict[str, str]]:
    """vLLM's flag and environment to export its spans where ours go; nothing when off.

    vLLM exports over OTLP only, to the one endpoint its flag names (gRPC: host:port; HTTP: the
    full /v1/traces URL), with the protocol from OTEL_EXPORTER_OTLP_TRACES_PROTOCOL.
    """
    settings = settings or OtelSettings()
    if settings.exporter != "otlp":
        return [], {}
    protocol = settings.protocol
    endpoint = settings.exporter_otlp_traces_endpoint
    if not endpoint:
        base = settings.exporter_otlp_endpoint or (
            "http://localhost:4317" if protocol == "grpc" else "http://localhost:4318")
        endpoint = base if protocol == "grpc" else f"{base.rstrip('/')}/v1/traces"
    return (["--otlp-traces-endpoint", endpoint],
            {"OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": protocol,
             "OTEL_SERVICE_NAME": ENGINE_SERVICE_NAME})


@contextlib.contextmanager
def client_span(tracer: Tracer | None, name: str, headers: dict[str, str],
                attributes: Mapping[str, str]) -> Iterator[Span | None]:
    """A span around one outgoing call, its `traceparent` added to `headers`; None when off.
    An exception records itself on the span and goes on."""
    if tracer is None:
        yield None
        return
    with tracer.start_as_current_span(name, kind=SpanKind.CLIENT, attributes=attributes,
                                      context=Context()) as span:
        inject(span, headers)
        yield span


@contextlib.contextmanager
def server_span(tracer: Tracer | None, name: str, headers: Mapping[str, str],
                attributes: Mapping[str, str]) -> Iterator[Span | None]:
    """A span around handling one incoming call, in the caller's trace; None when off."""
    if tracer is None:
        yield None
        return
    with tracer.start_as_current_span(name, kind=SpanKind.SERVER, attributes=attributes,
                                      context=extract(headers)) as span:
        yield span
