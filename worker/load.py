"""Reading the engine's load from its Prometheus /metrics."""

from __future__ import annotations

from prometheus_client.parser import text_string_to_metric_families

from controller.protocol import WorkerLoad

_RUNNING = "vllm:num_requests_running"
_WAITING = "vllm:num_requests_waiting"
# Renamed across vLLM releases; the first one present wins.
_KV_CACHE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


def parse_load(metrics_text: str) -> WorkerLoad:
    """Sum running and waiting requests over all label sets; take the highest KV-cache use."""
    running = waiting = 0.0
    kv: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == _RUNNING:
                running += sample.value
            elif sample.name == _WAITING:
                waiting += sample.value
            elif sample.name in _KV_CACHE:
                kv[sample.name] = max(kv.get(sample.name, 0.0), sample.value)
    usage = next((kv[name] for name in _KV_CACHE if name in kv), 0.0)
    return WorkerLoad(
        running=int(running), waiting=int(waiting), kv_cache_usage=min(max(usage, 0.0), 1.0)
    )
