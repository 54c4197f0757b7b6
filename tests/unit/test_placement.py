"""Placement by the wait for the first token: the learned limit, the engine's own cache view,
and bursts of one prefix on a simulated fleet."""

from __future__ import annotations

import collections
import random

import pytest

from controller.protocol import WorkerLoad, WorkerRecord, WorkerState
from fleetcore.kv_blocks import chain_keys
from gateway.kv_view import KvView, KvViews
from gateway.routing import CacheAware, RouteRequest
from worker.load import PrefillMeter, parse_load
from worker.protocol import KvCacheChanges


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def worker(wid: str, waiting: int = 0, rate: float | None = None,
           per_request: float | None = None) -> WorkerRecord:
    return WorkerRecord(
        worker_id=wid, engine_url="http://127.0.0.1:9000", model_names=["m"],
        state=WorkerState.READY, registered_at=0.0, last_heartbeat=0.0,
        load=WorkerLoad(waiting=waiting, prefill_tokens_per_s=rate,
                        prefill_tokens_per_request=per_request))


class Ids:
    """Stands in for a model's tokenizer: the request's ids are given."""


TOKENIZER = Ids()


def views_with(held: dict[str, list[int]], block_size: int = 16) -> KvViews:
    views = KvViews()
    views.tokenizers["m"] = TOKENIZER  # type: ignore[assignment]
    for wid, ids in held.items():
        view = views.views[wid] = KvView()
        view.apply(KvCacheChanges(epoch="e", seq=1, block_size=block_size, reset=True,
                                  added=chain_keys(ids, block_size)))
    return views


def req(ids: list[int]) -> RouteRequest:
    return RouteRequest(model="m", prompt_ids=lambda _: ids, render_prompt=lambda: "")


PREFIX = list(range(1, 2049))


def tokens(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3000, 40000) for _ in range(n)]


# -- the engine's own cache ----------------------------------------------------------------------
def test_a_prompt_goes_to_the_engine_that_reports_its_prefix() -> None:
    views = views_with({"a": [], "b": PREFIX})
    policy = CacheAware(views=views, clock=Clock())
    choice = policy.choose(req(PREFIX + tokens(40, 1)), [worker("a"), worker("b")], {})
    assert choice.worker.worker_id == "b" and choice.reason.startswith("holds 0.98 (engine)")


def test_a_cleared_engine_cache_no_longer_draws_the_prefix() -> None:
    views = views_with({"a": [], "b": PREFIX})
    views.views["b"].apply(KvCacheChanges(epoch="new", seq=0, block_size=16, reset=True))
    clock = Clock()
    policy = CacheAware(views=views, clock=clock)
    choice = policy.choose(req(PREFIX + tokens(40, 1)), [worker("a"), worker("b")], {})
    assert choice.reason.startswith("holds 0.00")


def test_engines_without_events_use_the_estimate_beside_those_with() -> None:
    views = views_with({"b": PREFIX})  # "a" publishes nothing
    policy = CacheAware(views=views, clock=Clock())
    request = RouteRequest(model="m", prompt_ids=lambda _: PREFIX + [5] * 16,
                           render_prompt=lambda: "some text " * 50)
    choice = policy.choose(request, [worker("a"), worker("b")], {})
    assert choice.worker.worker_id == "b"
    assert "a " in choice.reason  # "a" was weighed, on its estimate


# -- the learned limit -------------------------------------------------------------------------
def test_the_prefix_stays_until_the_queue_costs_more_than_computing_it_again() -> None:
    """Two engines' waiting requests, each costing what the engine learned per request: the
    prefix stays while the queue is worth less than the 2,048 tokens of the prefix."""
    views = views_with({"hot": PREFIX, "cold": []})
    prompt = PREFIX + tokens(64, 2)
    for waiting, expected in ((1, "hot"), (3, "hot"), (5, "cold")):
        policy = CacheAware(views=views, clock=Clock())
        hot = worker("hot", waiting=waiting, rate=10_000, per_request=500)
        cold = worker("cold", rate=10_000, per_request=500)
        assert policy.choose(req(prompt), [hot, cold], {}).worker.worker_id == expected


def test_a_slower_engine_must_hold_more_to_be_worth_its_queue() -> None:
    """The limit is in seconds: the same queue costs a slow engine more."""
    views = views_with({"hot": PREFIX, "cold": []})
    prompt = PREFIX + tokens(64, 2)
    fast = CacheAware(views=views, clock=Clock()).choose(
        req(prompt), [worker("hot", waiting=3, rate=10_000, per_request=500),
                      worker("cold", rate=10_000, per_request=500)], {})
    slow = CacheAware(views=views, clock=Clock()).choose(
        req(prompt), [worker("hot", waiting=3, rate=2_000, per_request=500),
                      worker("cold", rate=10_000, per_request=500)], {})
    assert (fast.worker.worker_id, slow.worker.worker_id) == ("hot", "cold")


def metrics(prompt: float, hits: float, prefill_s: float, requests: float) -> str:
    return (
        "# TYPE vllm:num_requests_waiting gauge\n"
        'vllm:num_requests_waiting{engine="0",model_name="m"} 2.0\n'
        "# TYPE vllm:prompt_tokens_total counter\n"
        f'vllm:prompt_tokens_total{{engine="0",model_name="m"}} {prompt}\n'
        "# TYPE vllm:prefix_cache_hits_total counter\n"
        f'vllm:prefix_cache_hits_total{{engine="0",model_name="m"}} {hits}\n'
        "# TYPE vllm:request_prefill_time_seconds histogram\n"
        f'vllm:request_prefill_time_seconds_sum{{engine="0",model_name="m"}} {prefill_s}\n'
        f'vllm:request_prefill_time_seconds_count{{engine="0",model_name="m"}} {requests}\n'
    )


def test_the_worker_learns_prefill_speed_and_work_per_request_from_engine_counters() -> None:
    clock = Clock()
    meter = PrefillMeter(weight=0.5, clock=clock)
    first = metrics(1000, 0, 1.0, 2)
    load = meter.update(parse_load(first), first)
    assert load.prefill_tokens_per_s is None and load.waiting == 2  # one reading: no rate
    clock.now += 10  # readings 10 s apart: the engine was idle most of it
    second = metrics(9000, 4000, 2.0, 12)  # 4,000 computed in 1 s over 10 requests
    load = meter.update(parse_load(second), second)
    assert load.prefill_tokens_per_s == pytest.approx(4000)
    assert load.prefill_tokens_per_request == pytest.approx(400)
    clock.now += 1
    third = metrics(9000, 4000, 2.0, 12)  # idle: nothing learned, nothing forgotten
    assert meter.update(parse_load(third), third).prefill_tokens_per_s == pytest.approx(4000)
    clock.now += 10
    fourth = metrics(17000, 4000, 3.0, 22)  # 8,000 in 1 s
    assert meter.update(parse_load(fourth), fourth).prefill_tokens_per_s == pytest.approx(6000)
    # Four prefills in one step each counted its second: 4,000 tokens in 0.5 s of wall time,
    # not in the 2 s the histogram sums to.
    clock.now += 0.5
    fifth = metrics(21000, 4000, 5.0, 26)
    assert meter.update(parse_load(fifth), fifth).prefill_tokens_per_s == pytest.approx(7000)


def test_by_source_counters_count_computed_tokens_where_the_engine_has_them() -> None:
    text = metrics(9000, 4000, 2.0, 12) + (
        "# TYPE vllm:prompt_tokens_by_source_total counter\n"
        'vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_compute"}'
        " 3000\n"
        'vllm:prompt_tokens_by_source_total{engine="0",model_name="m",source="local_cache_hit"}'
        " 6000\n")
    clock = Clock()
    meter = PrefillMeter(clock=clock)
    meter.update(parse_load(metrics(0, 0, 0, 0)), metrics(0, 0, 0, 0))
    clock.now += 10
    assert meter.update(parse_load(text), text).prefill_tokens_per_s == pytest.approx(1500)


def test_prefill_seconds_are_matched_with_the_tokens_of_the_requests_they_timed() -> None:
    """vLLM counts a request's prefill seconds when the request finishes. A burst whose
    prefills are done but whose requests are still decoding has its tokens counted and not its
    seconds: over the two finished requests' 0.2 s, the burst's 40,000 tokens would make
    200,000 tokens/s. Their own 2,000 computed tokens (the histogram vLLM observes with the
    seconds) make 10,000; the 40,000 over the 10 s between readings, 4,000."""

    def text(computed: float, finished: float, prefill_s: float, requests: float) -> str:
        return metrics(computed, 0, prefill_s, requests) + (
            "# TYPE vllm:request_prefill_kv_computed_tokens histogram\n"
            f'vllm:request_prefill_kv_computed_tokens_sum{{engine="0",model_name="m"}} '
            f"{finished}\n")

    clock = Clock()
    meter = PrefillMeter(clock=clock)
    meter.update(parse_load(text(0, 0, 0, 0)), text(0, 0, 0, 0))
    clock.now += 10
    later = text(40_000, 2_000, 0.2, 2)
    load = meter.update(parse_load(later), later)
    assert load.prefill_tokens_per_s == pytest.approx(10_000)
    assert load.prefill_tokens_per_request == pytest.approx(1_000)


# -- bursts of one prefix, on a simulated fleet -------------------------------------------------
def burst_shares(workers: int, size: int, prefix: int, suffix: int, seed: int,
                 hot: bool = False) -> list[int]:
    """`size` requests sharing `prefix` tokens arrive at once; every report the gateway has
    is stale (no engine shows a queue, none has the prefix unless `hot`)."""
    shared = tokens(prefix, seed)
    fleet = [worker(f"w{i}") for i in range(workers)]
    views = views_with({w.worker_id: shared if hot and i == 0 else []
                        for i, w in enumerate(fleet)})
    policy = CacheAware(views=views, clock=Clock(), rng=random.Random(seed))
    counts: collections.Counter[str] = collections.Counter()
    for n in range(size):
        choice = policy.choose(req(shared + tokens(suffix, seed * 1000 + n)), fleet, counts)
        counts[choice.worker.worker_id] += 1
    return [counts[w.worker_id] for w in fleet]


@pytest.mark.parametrize("seed", range(40))
def test_a_burst_of_one_new_prefix_spreads_over_the_fleet(seed: int) -> None:
    rng = random.Random(seed)
    workers = rng.randint(2, 8)
    size = rng.randint(4, 60) * workers
    shares = burst_shares(workers, size, prefix=rng.choice([256, 1024, 2048, 4096]),
                          suffix=rng.choice([16, 64, 256]), seed=seed)
    assert workers * max(shares) / size <= 1.2, shares


def test_a_burst_on_a_prefix_one_engine_holds_uses_it_then_spreads() -> None:
    """Sending more to the engine that holds the prefix is what the wait says (it computes only
    the suffixes); the rest of the burst then spreads by what each engine has to prefill."""
    shares = burst_shares(2, 400, prefix=1024, suffix=64, seed=3, hot=True)
    assert shares[0] > shares[1] > 0
    assert 2 * max(shares) / 400 <= 1.2, shares


def test_prompts_sent_before_an_engine_cleared_its_cache_are_not_counted_as_held() -> None:
    views = views_with({"a": [], "b": []})
    clock = Clock()
    policy = CacheAware(views=views, clock=clock)
    fleet = [worker("a"), worker("b")]
    first = policy.choose(req(PREFIX), fleet, {}).worker.worker_id
    clock.now += 2
    assert policy.choose(req(PREFIX), fleet, {}).worker.worker_id == first  # held, pending
    views.views[first].apply(KvCacheChanges(epoch="after-reset", seq=0, block_size=16,
                                            reset=True))
    clock.now += 2
    assert policy.choose(req(PREFIX), fleet, {}).reason.startswith("holds 0.00")
