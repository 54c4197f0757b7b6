"""Traces: off unless OTEL_* asks; on, a request's spans, attempts and retries, exported over
OTLP/HTTP to a real receiver (tests/otlp_receiver.py), with the traceparent the engine gets.

The engine here is a small HTTP server: the subject is the gateway's side. One request through
the real stack with vLLM's own spans is tests/integration/test_observability.py.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest
from fastapi.testclient import TestClient

from controller.protocol import Snapshot, WorkerRecord, WorkerState
from fleetcore.tracing import OtelSettings, Tracing, engine_tracing_args
from gateway.app import create_app
from gateway.settings import GatewaySettings
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
ANSWER = {"id": "x", "object": "chat.completion", "created": 0, "model": "m", "choices": [],
          "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
SERVER, CLIENT = 2, 3  # the protobuf SpanKind values


@pytest.mark.parametrize("env", [
    {},
    {"OTEL_SERVICE_NAME": "gw"},  # a name alone turns nothing on
    {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_TRACES_EXPORTER": "none"},
    {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://127.0.0.1:9", "OTEL_SDK_DISABLED": "true"},
])
def test_tracing_is_off_unless_an_exporter_is_configured(
        env: dict[str, str], monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert Tracing.from_env("x") is None
    assert engine_tracing_args() == ([], {})
    app = create_app(GatewaySettings(controller_address="http://127.0.0.1:9"))
    assert app.state.pipeline._tracing is None  # so requests carry no trace at all


@pytest.mark.parametrize("env, endpoint", [
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4318/"}, "http://c:4318/v1/traces"),
    ({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://c:4317", "OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"},
     "http://c:4317"),
    ({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://t:1/x"}, "http://t:1/x"),
    ({"OTEL_TRACES_EXPORTER": "otlp"}, "http://localhost:4318/v1/traces"),
])
def test_the_engine_exports_where_the_worker_does(env: dict[str, str], endpoint: str) -> None:
    settings = OtelSettings(**{k.removeprefix("OTEL_").lower(): v for k, v in env.items()})
    args, engine_env = engine_tracing_args(settings)
    assert args == ["--otlp-traces-endpoint", endpoint]
    assert engine_env["OTEL_EXPORTER_OTLP_TRACES_PROTOCOL"] == settings.protocol
    assert engine_env["OTEL_SERVICE_NAME"] == "vllm"


class _Engine:
    """Answers every chat with ANSWER and keeps the headers it was sent."""

    def __init__(self) -> None:
        self.headers: list[dict[str, str]] = []
        engine = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self) -> None:  # noqa: N802
                self.rfile.read(int(self.headers["content-length"]))
                engine.headers.append({k.lower(): v for k, v in self.headers.items()})
                body = json.dumps(ANSWER).encode()
                self.send_response(200)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"


@pytest.fixture
def receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    yield receiver
    receiver.close()


@pytest.fixture
def traced(receiver: OtlpReceiver, monkeypatch: pytest.MonkeyPatch
           ) -> Iterator[tuple[TestClient, _Engine]]:
    """A traced gateway whose table has a dead worker and a live one."""
    monkeypatch.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
    monkeypatch.setenv("OTEL_BSP_SCHEDULE_DELAY", "50")
    engine = _Engine()
    app = create_app(GatewaySettings(api_keys=[KEY], controller_address="http://127.0.0.1:9",
                                     sync_interval=60, routing="round-robin",
                                     retry_backoff=0))
    with TestClient(app) as client:
        app.state.table.update(Snapshot(
            generation=1, heartbeat_interval=2, expiry=6, models=["m"],
            workers=[WorkerRecord(worker_id=wid, engine_url=url, model_names=["m"],
                                  state=WorkerState.READY, registered_at=0, last_heartbeat=0)
                     for wid, url in (("dead", "http://127.0.0.1:9"), ("live", engine.url))]))
        yield client, engine
    engine.server.shutdown()


def _trace_of(spans: list[ReceivedSpan], request_id: str) -> list[ReceivedSpan]:
    root = [s for s in spans if s.attributes.get("fleet.request_id") == request_id]
    return [s for s in spans if root and s.trace_id == root[0].trace_id]


def test_a_request_is_one_trace_with_its_attempts_and_the_engine_joins_it(
        traced: tuple[TestClient, _Engine], receiver: OtlpReceiver) -> None:
    client, engine = traced
    # Round robin from the dead worker first, for one request, then the other way round: one
    # of the two requests is refused by the dead worker and retried on the live one.
    ids = ["fleet-trace-a", "fleet-trace-b"]
    for request_id in ids:
        response = client.post("/v1/chat/completions", json=CHAT,
                               headers={**AUTH, "X-Request-Id": request_id})
        assert response.status_code == 200, response.text
    spans = receiver.wait_for(
        lambda s: all(len([x for x in _trace_of(s, r) if x.name == "attempt"]) >= 1
                      for r in ids), timeout=20)
    traces = [_trace_of(spans, r) for r in ids]
    assert traces[0][0].trace_id != traces[1][0].trace_id
    retried = next(t for t in traces if len([s for s in t if s.name == "attempt"]) == 2)
    root = next(s for s in retried if s.kind == SERVER)
    assert root.name == "POST /v1/chat/completions" and root.parent_id == ""
    assert root.service == "llm-fleet-gateway"
    assert root.attributes["http.response.status_code"] == 200
    assert root.attributes["fleet.attempts"] == 2 and root.attributes["fleet.model"] == "m"
    assert root.attributes["fleet.outcome"] == "done"
    assert "retry" in root.events
    attempts = sorted((s for s in retried if s.name == "attempt"),
                      key=lambda s: str(s.attributes["fleet.attempt"]))
    assert [a.attributes["fleet.worker_id"] for a in attempts] == ["dead", "live"]
    assert all(a.kind == CLIENT and a.parent_id == root.span_id for a in attempts)
    assert attempts[0].status_code == 2 and attempts[0].attributes["fleet.outcome"] == (
        "connect_error")
    assert attempts[1].attributes["fleet.outcome"] == "done"
    assert root.attributes["fleet.policy"] == "round-robin"
    assert attempts[1].attributes["fleet.route.reason"] == "next in turn"  # the policy's word
    # The engine was told the live attempt's span as its parent.
    sent = next(h for h in engine.headers if h["x-request-id"] == root.attributes[
        "fleet.request_id"])
    assert sent["traceparent"].startswith(f"00-{root.trace_id}-{attempts[1].span_id}-")


def test_a_client_traceparent_makes_the_gateway_span_its_child(
        traced: tuple[TestClient, _Engine], receiver: OtlpReceiver) -> None:
    client, _ = traced
    trace_id, parent = "4bf92f3577b34da6a3ce929d0e0e4736", "00f067aa0ba902b7"
    response = client.post("/v1/chat/completions", json={**CHAT, "model": "nope"}, headers={
        **AUTH, "X-Request-Id": "fleet-trace-c", "traceparent": f"00-{trace_id}-{parent}-01"})
    assert response.status_code == 404
    spans = receiver.wait_for(lambda s: bool(_trace_of(s, "fleet-trace-c")), timeout=20)
    (root,) = _trace_of(spans, "fleet-trace-c")
    assert (root.trace_id, root.parent_id) == (trace_id, parent)
    assert root.attributes["http.response.status_code"] == 404
    assert root.attributes["error.type"] == "model_not_found"
