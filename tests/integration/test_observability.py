"""Traces and metrics of the real stack: controller, worker with vLLM and the demo model,
gateway, all exporting traces over OTLP/HTTP to a receiver this module starts
(tests/otlp_receiver.py), as the standard OTEL_* variables tell them to.

One chat request is one trace: the gateway's request span, its attempt, and vLLM's own
`llm_request` span under the attempt (the engine read the gateway's `traceparent`). Every
metric the Grafana dashboard names is in a real scrape of the services and of the engine, and a
real Prometheus (Debian's, where installed) scraping them answers every dashboard query.
"""

from __future__ import annotations

import contextlib
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.dashboard import exposed_names, expressions, metric_names, parse
from tests.integration.harness import API_KEY, MODEL_NAME, Stack, free_port
from tests.otlp_receiver import OtlpReceiver, ReceivedSpan

pytestmark = pytest.mark.integration
SERVER, CLIENT = 2, 3  # the protobuf SpanKind values


@pytest.fixture(scope="module")
def receiver() -> Iterator[OtlpReceiver]:
    receiver = OtlpReceiver()
    yield receiver
    receiver.close()


@pytest.fixture(scope="module")
def traced_stack(tmp_path_factory: pytest.TempPathFactory, model_path: Path,
                 receiver: OtlpReceiver) -> Iterator[Stack]:
    with pytest.MonkeyPatch.context() as env:
        # Every service the stack spawns inherits these; 200 ms batches keep the test short.
        env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.endpoint)
        env.setenv("OTEL_EXPORTER_OTLP_PROTOCOL", "http/protobuf")
        env.setenv("OTEL_BSP_SCHEDULE_DELAY", "200")
        stack = Stack(workdir=tmp_path_factory.mktemp("traced"), model_path=model_path)
        try:
            stack.start_serving()
            yield stack
        finally:
            stack.close()


def _trace(spans: list[ReceivedSpan], request_id: str) -> list[ReceivedSpan]:
    roots = [s for s in spans if s.attributes.get("fleet.request_id") == request_id]
    return [s for s in spans if roots and s.trace_id == roots[0].trace_id]


@pytest.mark.parametrize("stream", [False, True])
def test_one_chat_request_is_one_trace_with_gateway_and_engine_spans(
        traced_stack: Stack, receiver: OtlpReceiver, stream: bool) -> None:
    request_id = f"fleet-traced-{'stream' if stream else 'plain'}"
    response = httpx.post(
        f"{traced_stack.gateway_url}/v1/chat/completions", timeout=120,
        headers={"Authorization": f"Bearer {API_KEY}", "X-Request-Id": request_id},
        json={"model": MODEL_NAME, "max_tokens": 4, "stream": stream,
              "messages": [{"role": "user", "content": "Name the capital of France."}]})
    assert response.status_code == 200, response.text
    spans = receiver.wait_for(
        lambda s: any(x.name == "llm_request" for x in _trace(s, request_id)), timeout=60)
    trace = _trace(spans, request_id)
    (root,) = [s for s in trace if s.parent_id == ""]
    assert (root.service, root.name, root.kind) == (
        "llm-fleet-gateway", "POST /v1/chat/completions", SERVER)
    assert root.attributes["fleet.model"] == MODEL_NAME
    assert root.attributes["fleet.stream"] is stream
    assert root.attributes["fleet.outcome"] == "done"
    (attempt,) = [s for s in trace if s.name == "attempt"]
    assert attempt.parent_id == root.span_id and attempt.kind == CLIENT
    assert attempt.attributes["fleet.worker_id"] == "worker"
    (engine,) = [s for s in trace if s.name == "llm_request"]
    assert engine.service == "vllm" and engine.parent_id == attempt.span_id
    # vLLM's span is this request's: the gateway's request id, the request's max_tokens.
    assert request_id in str(engine.attributes["gen_ai.request.id"])
    assert engine.attributes["gen_ai.request.max_tokens"] == 4


def test_worker_heartbeats_are_traces_the_controller_joins(
        traced_stack: Stack, receiver: OtlpReceiver) -> None:
    def joined(spans: list[ReceivedSpan]) -> bool:
        beats = {s.trace_id for s in spans if s.name == "heartbeat"
                 and s.service == "llm-fleet-worker"}
        return any(s.trace_id in beats for s in spans
                   if s.name == "heartbeat" and s.service == "llm-fleet-controller")

    spans = receiver.wait_for(joined, timeout=30)
    assert any(s.name == "register" and s.service == "llm-fleet-worker"
               and s.attributes["fleet.worker_id"] == "worker" for s in spans)
    server = next(s for s in spans if s.name == "heartbeat" and s.service ==
                  "llm-fleet-controller")
    client = next(s for s in spans if s.span_id == server.parent_id)
    assert client.service == "llm-fleet-worker" and client.kind == CLIENT
    assert client.attributes["http.response.status_code"] == 200


def test_every_dashboard_metric_is_in_a_real_scrape(traced_stack: Stack) -> None:
    # After the chat requests above (or this one, run alone), so histograms have samples.
    response = httpx.post(
        f"{traced_stack.gateway_url}/v1/chat/completions", timeout=120,
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": MODEL_NAME, "max_tokens": 2,
              "messages": [{"role": "user", "content": "Name the capital of France."}]})
    assert response.status_code == 200, response.text
    (record,) = traced_stack.workers()
    urls = [traced_stack.gateway_url, traced_stack.controller_url,
            f"http://127.0.0.1:{traced_stack.worker_ports['worker']}",
            record["engine_url"].rstrip("/")]
    scraped = [httpx.get(f"{url}/metrics", timeout=10) for url in urls]
    assert [r.status_code for r in scraped] == [200] * 4, urls
    exported = set().union(*(exposed_names(r.text) for r in scraped))
    used = {name for _, expr in expressions() for name in metric_names(parse(expr))}
    assert any(name.startswith("vllm:") for name in used)
    assert used - exported == set()


def _chat(stack: Stack) -> None:
    response = httpx.post(
        f"{stack.gateway_url}/v1/chat/completions", timeout=120,
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": MODEL_NAME, "max_tokens": 2, "stream": True,
              "stream_options": {"include_usage": True},
              "messages": [{"role": "user", "content": "Name the capital of France."}]})
    assert response.status_code == 200, response.text


def test_prometheus_answers_every_dashboard_query(traced_stack: Stack, tmp_path: Path) -> None:
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.skip("Prometheus is not installed (Debian: apt-get install prometheus)")
    (record,) = traced_stack.workers()
    engine = record["engine_url"].rstrip("/").removeprefix("http://")
    targets = {"fleet-gateway": traced_stack.gateway_url, "fleet-controller":
               traced_stack.controller_url,
               "fleet-worker": f"http://127.0.0.1:{traced_stack.worker_ports['worker']}"}
    jobs = [f"  - job_name: {job}\n    static_configs: [{{targets: ['{url[7:]}']}}]"
            for job, url in targets.items()]
    jobs.append(f"  - job_name: vllm\n    static_configs: [{{targets: ['{engine}']}}]")
    config = tmp_path / "prometheus.yml"
    config.write_text("global: {scrape_interval: 1s}\nscrape_configs:\n" + "\n".join(jobs)
                      + "\n")
    port = free_port()
    log = (tmp_path / "prometheus.log").open("wb")
    proc = subprocess.Popen([binary, f"--config.file={config}", f"--web.listen-address="
                             f"127.0.0.1:{port}", f"--storage.tsdb.path={tmp_path / 'data'}"],
                            stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api/v1"
    try:
        def query(expr: str) -> list[dict]:
            answer = httpx.get(f"{api}/query", params={"query": expr}, timeout=10).json()
            assert answer["status"] == "success", (expr, answer)
            return answer["data"]["result"]  # type: ignore[no-any-return]

        deadline = time.monotonic() + 60
        while True:  # until every job was scraped, twice apart (rate() needs two samples)
            _chat(traced_stack)
            with contextlib.suppress(httpx.HTTPError):
                scraped = {r["metric"]["job"] for r in query("count_over_time(up[1m]) >= 3")}
                if scraped == {*targets, "vllm"} and not query("up == 0"):
                    break
            assert proc.poll() is None, (tmp_path / "prometheus.log").read_text()[-2000:]
            assert time.monotonic() < deadline, "Prometheus never scraped every job"
            time.sleep(0.5)
        answered = {where for where, expr in expressions()
                    if query(expr.replace("$__rate_interval", "1m").replace("$model", ".*"))}
        # Those that must show something after a few requests (errors, retries, restarts,
        # queues and preemptions rightly show nothing).
        for title in ("Requests by model and status", "Time to first token (gateway)",
                      "Tokens per second", "Workers by state", "Engines up",
                      "Time to first token (engine)", "Inter-token latency", "Engine queue",
                      "KV cache use", "Prefix cache hit rate"):
            assert any(f"panel {title!r}" in where for where in answered), title
    finally:
        proc.terminate()
        proc.wait(timeout=30)
        log.close()
