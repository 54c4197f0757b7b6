"""Routing choices of every policy, and what the table does when it cannot route."""

import asyncio
import collections
import random

import aiohttp
import pytest

from controller.protocol import Snapshot, WorkerLoad, WorkerRecord, WorkerState
from fleetcore.errors import NotFoundError, OverloadedError, ServiceUnavailableError
from gateway.controller_sync import ControllerSync
from gateway.routing import (
    CacheAware,
    LeastLoad,
    RoundRobin,
    RouteRequest,
    SessionAffinity,
)
from gateway.routing_table import Limits, Outcome, RoutingTable


def worker(wid: str, model: str = "m", state: WorkerState = WorkerState.READY,
           running: int = 0, waiting: int = 0, kv: float = 0.0) -> WorkerRecord:
    return WorkerRecord(
        worker_id=wid, engine_url=f"http://127.0.0.1:{9000 + len(wid)}", model_names=[model],
        state=state, load=WorkerLoad(running=running, waiting=waiting, kv_cache_usage=kv),
        registered_at=0.0, last_heartbeat=0.0,
    )


def table(*workers: WorkerRecord, models: list[str] | None = None, **kw) -> RoutingTable:
    t = RoutingTable(kw.pop("policy", LeastLoad(random.Random(0))), **kw)
    names = models if models is not None else sorted({m for w in workers for m in w.model_names})
    t.update(Snapshot(generation=1, heartbeat_interval=2, expiry=6, workers=list(workers),
                      models=names))
    return t


def req(model: str = "m", prompt: str = "", session: str | None = None) -> RouteRequest:
    return RouteRequest(model=model, session=session, render_prompt=lambda: prompt)


# -- least-load --------------------------------------------------------------------------------
def test_least_load_prefers_the_shorter_engine_queue() -> None:
    busy, idle = worker("busy", waiting=6), worker("idle", waiting=1)
    assert LeastLoad().choose(req(), [busy, idle], {}).worker.worker_id == "idle"


def test_least_load_counts_our_own_inflight_requests() -> None:
    a, b = worker("a"), worker("b")
    assert LeastLoad().choose(req(), [a, b], {"a": 3}).worker.worker_id == "b"


def test_kv_cache_pressure_counts() -> None:
    full, empty = worker("full", kv=0.9), worker("empty", kv=0.1)
    assert LeastLoad().choose(req(), [full, empty], {}).worker.worker_id == "empty"


def test_power_of_two_never_picks_the_worst_of_three() -> None:
    workers = [worker("a", waiting=0), worker("b", waiting=5), worker("c", waiting=9)]
    picks = {LeastLoad(random.Random(s)).choose(req(), workers, {}).worker.worker_id
             for s in range(50)}
    assert "c" not in picks and picks == {"a", "b"}


# -- round-robin -------------------------------------------------------------------------------
def test_round_robin_takes_turns_per_model() -> None:
    rr, workers = RoundRobin(), [worker("b"), worker("a")]
    picks = [rr.choose(req(), workers, {}).worker.worker_id for _ in range(4)]
    assert picks == ["a", "b", "a", "b"]


# -- cache-aware -------------------------------------------------------------------------------
SYSTEM = "You are a helpful assistant who answers in one sentence. " * 8


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_cache_aware_follows_the_prefix_and_spreads_new_ones() -> None:
    clock = Clock()
    policy, workers = CacheAware(clock=clock), [worker("a"), worker("b")]
    first = policy.choose(req(prompt=SYSTEM + "Q1"), workers, {}).worker.worker_id
    clock.now += 5  # its prefill is done
    again = policy.choose(req(prompt=SYSTEM + "Q1 and a follow-up"), workers, {})
    assert again.worker.worker_id == first and again.reason.startswith("holds 1.00 (estimate)")
    clock.now += 5
    other = policy.choose(req(prompt="Something else entirely. " * 20), workers, {})
    assert "holds 0.00" in other.reason


def new_prompts(n: int) -> list[str]:
    return [f"You are assistant number {g}. " + "Answer briefly and well. " * 40
            for g in range(n)]


def test_gateways_place_a_burst_of_new_prefixes_alike_without_talking() -> None:
    """Two gateways see nothing of each other's choices until the engines report them: each
    sends a new prompt where hashing its first block points (within one prompt's prefill of
    the least wait), so the halves of a burst they each get land together."""
    workers = [worker("a"), worker("b"), worker("c")]
    one, two = CacheAware(clock=Clock()), CacheAware(clock=Clock())
    prompts = new_prompts(24)
    firsts = [one.choose(req(prompt=p), workers, {}).worker.worker_id for p in prompts]
    # The other gateway gets them in another order, having served other traffic first.
    for p in new_prompts(30)[24:]:
        two.choose(req(prompt=p + "elsewhere"), workers, {})
    seconds = {p: two.choose(req(prompt=p), workers, {}).worker.worker_id
               for p in reversed(prompts)}
    agreed = sum(seconds[p] == w for p, w in zip(prompts, firsts, strict=True))
    assert agreed >= 16, (agreed, firsts)  # 5 of 24 when each placed by its own load
    assert max(collections.Counter(firsts).values()) <= 24 / 3 + 2  # and spread by the wait


def test_the_hash_gives_way_to_a_worker_that_is_behind() -> None:
    """A worker more than one prompt's prefill behind the least wait does not get a new
    prompt for its hash's sake."""
    clock = Clock()
    policy, workers = CacheAware(clock=clock), [worker("a"), worker("b")]
    prompts = new_prompts(40)
    picks = [policy.choose(req(prompt=p), workers, {}).worker.worker_id for p in prompts]
    counts = collections.Counter(picks)
    assert abs(counts["a"] - counts["b"]) <= 2, counts


def test_cache_aware_leaves_the_prefix_when_its_worker_queue_costs_more() -> None:
    """The engine's own queue (waiting requests times its work per request, as its worker
    learned them) outweighs the prefix once waiting costs more than computing it again."""
    clock = Clock()
    policy = CacheAware(clock=clock)
    policy.choose(req(prompt=SYSTEM), [worker("hot")], {})  # the prefix now lives on "hot"
    clock.now += 5
    hot, cold = worker("hot", waiting=0), worker("cold")
    assert policy.choose(req(prompt=SYSTEM + "more"), [hot, cold], {}).worker.worker_id == "hot"
    clock.now += 5
    hot = worker("hot", waiting=2)  # two prompts' work ahead: more than the prefix is worth
    assert policy.choose(req(prompt=SYSTEM + "again"), [hot, cold], {}).worker.worker_id == \
        "cold"


def test_cache_aware_keys_prefixes_by_adapter() -> None:
    """The same prompt under another adapter is another KV cache: no match carries over."""
    policy, workers = CacheAware(), [worker("a"), worker("b")]
    prompt = SYSTEM + "Q1"

    def under(adapter: str) -> RouteRequest:
        return RouteRequest(model=adapter, adapter=adapter, render_prompt=lambda: prompt)

    first = policy.choose(under("x"), workers, {}).worker.worker_id
    again = policy.choose(under("x"), workers, {})
    assert again.worker.worker_id == first and "holds 1.00" in again.reason
    with_y = policy.choose(under("y"), workers, {})
    assert "holds 0.00" in with_y.reason


def test_cache_aware_forgets_departed_workers() -> None:
    policy = CacheAware()
    policy.choose(req(prompt=SYSTEM), [worker("gone")], {})
    policy.forget({"stays"})
    assert "gone" not in policy._trees


# -- session affinity --------------------------------------------------------------------------
def test_session_sticks_to_one_worker() -> None:
    policy = SessionAffinity()
    workers = [worker(w) for w in "abcd"]
    picks = {policy.choose(req(session="alice"), workers, {}).worker.worker_id for _ in range(20)}
    assert len(picks) == 1


def test_worker_leaving_moves_only_its_own_sessions() -> None:
    policy = SessionAffinity()
    workers = [worker(w) for w in "abcd"]
    sessions = [f"user-{i}" for i in range(400)]
    before = {s: policy.choose(req(session=s), workers, {}).worker.worker_id for s in sessions}
    after = {s: policy.choose(req(session=s), workers[:3], {}).worker.worker_id
             for s in sessions}
    moved = [s for s in sessions if before[s] != after[s]]
    assert moved and all(before[s] == "d" for s in moved)
    assert set(before.values()) == set("abcd")  # the ring spreads sessions over all


def test_no_session_key_means_least_load() -> None:
    choice = SessionAffinity().choose(req(), [worker("a", waiting=5), worker("b")], {})
    assert choice.worker.worker_id == "b" and "no session key" in choice.reason


# -- the table ---------------------------------------------------------------------------------
def test_table_routes_only_to_ready_workers() -> None:
    t = table(worker("draining", state=WorkerState.DRAINING), worker("ok", running=9),
              worker("sick", state=WorkerState.UNHEALTHY))
    assert t.choose(req()).worker.worker_id == "ok"


def test_unknown_model_is_not_found_and_names_what_is_served() -> None:
    with pytest.raises(NotFoundError) as info:
        table(worker("a", model="llama")).choose(req("gpt-9"))
    assert "gpt-9" in info.value.message and "llama" in info.value.message
    assert info.value.status_code == 404


def test_known_model_without_ready_worker_is_unavailable() -> None:
    with pytest.raises(ServiceUnavailableError) as info:
        table(worker("a", state=WorkerState.STARTING)).choose(req())
    assert "1 starting" in info.value.message
    assert info.value.headers["Retry-After"]


def test_model_whose_workers_all_left_is_unavailable_not_unknown() -> None:
    with pytest.raises(ServiceUnavailableError):
        table(models=["m"]).choose(req())


def test_open_breaker_and_excluded_workers_are_skipped() -> None:
    t = table(worker("a"), worker("b"), worker("c"))
    t.breakers["a"].record_failure(fatal=True)
    picks = {t.choose(req(), exclude={"b"}).worker.worker_id for _ in range(10)}
    assert picks == {"c"}
    assert sorted(w.worker_id for w in t.models()["m"]) == ["b", "c"]


def test_per_model_policy_override() -> None:
    t = table(worker("a", model="m"), worker("b", model="n"), overrides={"n": RoundRobin()})
    assert t.policy_for("n").name == "round-robin" and t.policy_for("m").name == "least-load"


def test_full_workers_queue_then_429() -> None:
    async def scenario() -> None:
        t = table(worker("a"), limits=Limits(max_inflight_per_worker=1, queue_size=1,
                                             queue_timeout=5))
        first = await t.acquire(req())
        waiting = asyncio.create_task(t.acquire(req()))
        await asyncio.sleep(0)  # one loop turn: the task runs until it waits in the queue
        assert t.queued["m"] == 1
        with pytest.raises(OverloadedError) as info:
            await t.acquire(req())  # the queue (of one) is full
        assert info.value.status_code == 429 and info.value.headers["Retry-After"]
        first.settle(Outcome.DONE)
        second = await asyncio.wait_for(waiting, 1)
        assert second.worker.worker_id == "a" and t.inflight["a"] == 1

    asyncio.run(scenario())


def test_queue_timeout_is_429() -> None:
    async def scenario() -> None:
        t = table(worker("a"), limits=Limits(max_inflight_per_worker=1, queue_size=4,
                                             queue_timeout=0.05))
        await t.acquire(req())
        with pytest.raises(OverloadedError, match="Waited"):
            await t.acquire(req())
        assert not t.queued

    asyncio.run(scenario())


def test_table_goes_stale_but_keeps_routing_when_no_controller_answers() -> None:
    t = table(worker("a"))

    async def sync_against_nothing() -> None:
        async with aiohttp.ClientSession() as session:
            sync = ControllerSync(t, session, ["http://127.0.0.1:9", "http://127.0.0.1:7"],
                                  interval=0.05)
            task = asyncio.create_task(sync.run_forever())
            deadline = asyncio.get_running_loop().time() + 5
            while not t.stale:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.01)
            task.cancel()

    asyncio.run(sync_against_nothing())
    assert t.choose(req()).worker.worker_id == "a"


def test_restarted_controller_does_not_empty_the_table_while_warming_up() -> None:
    t = table(worker("a"), worker("b"))
    fresh = Snapshot(generation=1, heartbeat_interval=2, expiry=6, workers=[worker("b")],
                     models=["m"], warming_up=True)
    t.update(fresh)
    assert sorted(w.worker_id for w in t.models()["m"]) == ["a", "b"]
    t.update(fresh.model_copy(update={"warming_up": False, "generation": 2}))
    assert [w.worker_id for w in t.models()["m"]] == ["b"]


def test_the_table_tells_every_policy_which_workers_left() -> None:
    class Recording(LeastLoad):
        def __init__(self) -> None:
            super().__init__(random.Random(0))
            self.told: list[set[str]] = []

        def forget(self, live_worker_ids: set[str]) -> None:
            self.told.append(live_worker_ids)

    default, override = Recording(), Recording()
    t = table(worker("a"), worker("b", model="n"), policy=default, overrides={"n": override})
    t.update(t.snapshot.model_copy(update={"generation": 2, "workers": [worker("b", model="n")]}))
    assert default.told[-1] == override.told[-1] == {"b"}
