"""The gateway's Prometheus metrics.

Counters and histograms are updated on the request path; gauges that mirror the routing table
(in-flight per worker, breaker states, queue depth) are read from it only when scraped. On the
request path each label set's child is looked up in a plain dict, kept here, rather than
through `labels()` (a lock, a tuple and a checked lookup each time).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Hashable, Iterator
from typing import Any, TypeVar

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from gateway.routing_table import RoutingTable

Child = TypeVar("Child")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class _TableCollector(Collector):
    def __init__(self, table: RoutingTable) -> None:
        self._table = table

    def collect(self) -> Iterator[GaugeMetricFamily]:
        table = self._table
        inflight = GaugeMetricFamily("fleet_gateway_inflight",
                                     "Requests in flight from this gateway, per worker",
                                     labels=["worker"])
        for worker_id, count in table.inflight.items():
            inflight.add_metric([worker_id], count)
        yield inflight
        peers = GaugeMetricFamily("fleet_gateway_peer_inflight",
                                  "Requests in flight from the other gateways sharing state "
                                  "(--shared-state), per worker", labels=["worker"])
        for worker_id, count in table.remote_inflight.items():
            peers.add_metric([worker_id], count)
        yield peers
        breaker = GaugeMetricFamily("fleet_gateway_breaker_state",
                                    "Circuit breaker per worker: 0 closed, 1 half-open, 2 open",
                                    labels=["worker"])
        for worker_id, state in table.breakers.states().items():
            breaker.add_metric([worker_id], int(state))
        yield breaker
        queue = GaugeMetricFamily("fleet_gateway_queue_depth",
                                  "Requests waiting for a worker under its in-flight cap",
                                  labels=["model"])
        for model, count in table.queued.items():
            queue.add_metric([model], count)
        yield queue
        stale = GaugeMetricFamily("fleet_gateway_table_stale",
                                  "1 while the controller cannot be reached")
        stale.add_metric([], 1 if table.stale else 0)
        yield stale


class GatewayMetrics:
    def __init__(self, table: RoutingTable) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "fleet_gateway_requests",
            "Requests answered, by model, status, routing policy and endpoint",
            ["model", "status", "policy", "endpoint"], registry=self.registry,
        )
        self.ttft = Histogram(
            "fleet_gateway_ttft_seconds", "Time to the first streamed byte, from arrival",
            ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.latency = Histogram(
            "fleet_gateway_request_duration_seconds", "Time from arrival to the last byte",
            ["model"], buckets=_LATENCY_BUCKETS, registry=self.registry,
        )
        self.tokens = Counter(
            "fleet_gateway_tokens", "Tokens reported in responses' usage, by kind",
            ["model", "kind"], registry=self.registry,
        )
        self.retries = Counter(
            "fleet_gateway_retries", "Requests sent again to another worker, by reason",
            ["model", "reason"], registry=self.registry,
        )
        self.continuations = Counter(
            "fleet_gateway_continuations",
            "Streams continued on another worker after theirs failed mid-answer, by reason "
            "(broke, error_event, stall; refused: the continuation before it was refused)",
            ["model", "reason"], registry=self.registry,
        )
        self.registry.register(_TableCollector(table))
        self._children: dict[Hashable, Any] = {}

    def _child(self, key: Hashable, make: Callable[[], Child]) -> Child:
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = make()
        return child

    def count_request(self, model: str, status: int | None, policy: str, endpoint: str) -> None:
        """One request answered (or refused) with `status`."""
        key = ("requests", model, status, policy, endpoint)
        self._child(key, lambda: self.requests.labels(model, str(status), policy,
                                                      endpoint)).inc()

    def observe_latency(self, model: str, seconds: float) -> None:
        """The routing table's latency hook: told when a worker's answer ends."""
        self._child(("latency", model), lambda: self.latency.labels(model)).observe(seconds)

    def count_usage(self, model: str, usage: dict[str, object] | None) -> None:
        if not usage:
            return
        for kind in ("prompt_tokens", "completion_tokens"):
            value = usage.get(kind)
            if isinstance(value, int) and value > 0:
                self._child(("tokens", model, kind), functools.partial(
                    self.tokens.labels, model, kind.removesuffix("_tokens"))).inc(value)
