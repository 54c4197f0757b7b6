"""What the Grafana dashboard (deploy/grafana/llm-fleet.json) asks Prometheus for, and what the
services export, as metric names (the samples' names: `_total`, `_bucket` and so on included).

Used by tests/unit/test_dashboard.py (the services' registries, in-process) and by
tests/integration/test_observability.py (a real scrape of every service and of vLLM).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import promql_parser
from prometheus_client.parser import text_string_to_metric_families

DASHBOARD = Path(__file__).parents[1] / "deploy/grafana/llm-fleet.json"
# Grafana's variables, as a query sent to Prometheus would have them.
_VARIABLES = {"$__rate_interval": "5m", "$__interval": "1m", "$__range": "1h", "$model": ".*"}
_LABEL_VALUES = re.compile(r"^label_values\((?:(.+),\s*)?(\w+)\)$")
_SUFFIXES = {"counter": ("_total", "_created"), "histogram": ("_bucket", "_sum", "_count",
                                                              "_created"),
             "gauge": ("",), "summary": ("", "_sum", "_count", "_created"), "info": ("_info",),
             "unknown": ("",)}


def expressions(dashboard: Path = DASHBOARD) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every query variable."""
    spec = json.loads(dashboard.read_text())
    for panel in spec["panels"]:
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r} {target['refId']}", target["expr"]
    for variable in spec["templating"]["list"]:
        if variable["type"] == "query":
            query = variable["query"]
            query = query["query"] if isinstance(query, dict) else query
            match = _LABEL_VALUES.match(query)
            assert match, f"variable {variable['name']}: only label_values(...) is understood"
            if match.group(1):
                yield f"variable {variable['name']}", match.group(1)


def parse(expr: str) -> object:
    for name, value in _VARIABLES.items():
        expr = expr.replace(name, value)
    assert "$" not in expr, f"a Grafana variable this test does not know: {expr}"
    return promql_parser.parse(expr)


def metric_names(node: object) -> Iterator[str]:
    """The metric names that an expression's selectors name."""
    if type(node).__name__ == "VectorSelector":
        name = node.name  # type: ignore[attr-defined]
        assert name, f"a selector without a metric name: {node}"
        yield name
        return
    for child in ("lhs", "rhs", "expr", "vector_selector", "param"):
        if (value := getattr(node, child, None)) is not None:
            yield from metric_names(value)
    for arg in getattr(node, "args", None) or []:
        yield from metric_names(arg)


def exposed_names(exposition: str) -> set[str]:
    """Every sample name an exposition's families can have, from their TYPE lines: a family
    with no samples yet (a labelled metric before its first request) still counts."""
    names = set()
    for family in text_string_to_metric_families(exposition):
        names.update(family.name + s for s in _SUFFIXES[family.type])
        names.update(sample.name for sample in family.samples)
    return names
