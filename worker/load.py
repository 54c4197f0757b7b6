"""Reading the engine's load from its Prometheus /metrics."""

from __future__ import annotations

import time
from collections.abc import Callable

from prometheus_client.parser import text_string_to_metric_families

from controller.protocol import WorkerLoad

_RUNNING = "vllm:num_requests_running"
_WAITING = "vllm:num_requests_waiting"
# Renamed across vLLM releases; the first one present wins.
_KV_CACHE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")


# One series per set of adapters, its value the time the engine last saw that set (each step).
_LORA_INFO = "vllm:lora_requests_info"
# A newest set older than this is from before the engine went idle: nothing is busy.
LORA_INFO_FRESH_S = 5.0


def parse_load(metrics_text: str, now: float | None = None) -> WorkerLoad:
    """Sum running and waiting requests over all label sets; take the highest KV-cache use;
    the adapters of the engine's newest LoRA set, if it is fresh (`now`: the wall clock)."""
    running = waiting = 0.0
    kv: dict[str, float] = {}
    lora_at, lora_labels = 0.0, {}
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name == _RUNNING:
                running += sample.value
            elif sample.name == _WAITING:
                waiting += sample.value
            elif sample.name in _KV_CACHE:
                kv[sample.name] = max(kv.get(sample.name, 0.0), sample.value)
            elif sample.name == _LORA_INFO and sample.value > lora_at:
                lora_at, lora_labels = sample.value, sample.labels
    usage = next((kv[name] for name in _KV_CACHE if name in kv), 0.0)
    busy: set[str] = set()
    if lora_labels and (time.time() if now is None else now) - lora_at <= LORA_INFO_FRESH_S:
        for key in ("running_lora_adapters", "waiting_lora_adapters"):
            busy.update(name for name in lora_labels.get(key, "").split(",") if name)
    return WorkerLoad(
        running=int(running), waiting=int(waiting), kv_cache_usage=min(max(usage, 0.0), 1.0),
        busy_adapters=sorted(busy)[:1024],
    )


_PROMPT = "vllm:prompt_tokens_total"
_BY_SOURCE = "vllm:prompt_tokens_by_source_total"
_HITS = "vllm:prefix_cache_hits_total"
_PREFILL_SUM = "vllm:request_prefill_time_seconds_sum"
_PREFILL_COUNT = "vllm:request_prefill_time_seconds_count"
# Observed when a request finishes, as its prefill time is (vLLM's FinishedRequestStats).
FINISHED_COMPUTED = "vllm:request_prefill_kv_computed_tokens_sum"


def prefill_counters(metrics_text: str) -> tuple[float, float, float, float] | None:
    """Summed over the engine's label sets: the prompt tokens it computed (counted as it
    computes them), those of the requests that finished (counted with their prefill time),
    the seconds of prefill and the requests that finished; None when the engine does not
    export them."""
    sums: dict[str, float] = {}
    computed = 0.0
    has_source = False
    for family in text_string_to_metric_families(metrics_text):
        for sample in family.samples:
            if sample.name in (_PROMPT, _HITS, _PREFILL_SUM, _PREFILL_COUNT, FINISHED_COMPUTED):
                sums[sample.name] = sums.get(sample.name, 0.0) + sample.value
            elif sample.name == _BY_SOURCE and sample.labels.get("source") == "local_compute":
                computed += sample.value
                has_source = True
    if _PREFILL_SUM not in sums or _PREFILL_COUNT not in sums:
        return None
    if not has_source:  # older engines: all prompt tokens less the cache hits
        if _PROMPT not in sums:
            return None
        computed = sums[_PROMPT] - sums.get(_HITS, 0.0)
    finished = sums.get(FINISHED_COMPUTED, computed)  # older engines: the same count
    return computed, finished, sums[_PREFILL_SUM], sums[_PREFILL_COUNT]


class PrefillMeter:
    """The engine's prefill speed and work per request, as moving averages over the
    differences between successive readings of its counters (one engine's lifetime).

    Two lower bounds of the speed, the larger taken, each a count over the time it was counted
    in: the finished requests' computed tokens over the seconds they spent in prefill (low when
    several prefill in one step, each counting the step), and the tokens computed between
    readings over the time between them (low when the engine was idle part of it). vLLM counts
    a request's prefill time when the request finishes, not when its prefill does: tokens
    counted as computed over seconds counted at the finish would make a burst's prefills, done
    before its first request finished, look instant (learned speeds of 90,000-256,000 tokens/s
    for an 8B engine on an H200, which then drew every new prompt)."""

    def __init__(self, weight: float = 0.3, clock: Callable[[], float] = time.monotonic) -> None:
        self._weight = weight
        self._clock = clock
        self._last_at = clock()
        self._last: tuple[float, float, float, float] | None = None
        self.tokens_per_s: float | None = None
        self.tokens_per_request: float | None = None

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else old + self._weight * (new - old)

    def update(self, load: WorkerLoad, metrics_text: str) -> WorkerLoad:
        """`load` with what this reading teaches about prefill."""
        now = prefill_counters(metrics_text)
        at, elapsed = self._clock(), self._clock() - self._last_at
        if now is not None and self._last is not None:
            tokens, finished, seconds, requests = (
                a - b for a, b in zip(now, self._last, strict=True))
            if requests > 0 and seconds > 0 and finished >= 0 and tokens >= 0:
                if finished > 0 or tokens > 0:
                    speed = max(finished / seconds, tokens / elapsed if elapsed > 0 else 0.0)
                    self.tokens_per_s = self._average(self.tokens_per_s, speed)
                self.tokens_per_request = self._average(self.tokens_per_request,
                                                        finished / requests)
        if now is not None:
            self._last, self._last_at = now, at
        return load.model_copy(update={"prefill_tokens_per_s": self.tokens_per_s,
                                       "prefill_tokens_per_request": self.tokens_per_request})
