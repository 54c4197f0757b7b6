"""Routing choices: least load, and what the table says when it cannot route."""

import asyncio
import random

import aiohttp
import pytest

from controller.protocol import Snapshot, WorkerLoad, WorkerRecord, WorkerState
from fleet.errors import NotFoundError, ServiceUnavailableError
from gateway.routing import LeastLoad
from gateway.routing_table import RoutingTable


def worker(wid: str, model: str = "m", state: WorkerState = WorkerState.READY,
           running: int = 0, waiting: int = 0, kv: float = 0.0) -> WorkerRecord:
    return WorkerRecord(
        worker_id=wid, engine_url=f"http://127.0.0.1:{9000 + len(wid)}", model_names=[model],
        state=state, load=WorkerLoad(running=running, waiting=waiting, kv_cache_usage=kv),
        registered_at=0.0, last_heartbeat=0.0,
    )


def table(*workers: WorkerRecord, models: list[str] | None = None) -> RoutingTable:
    t = RoutingTable(LeastLoad(random.Random(0)))
    names = models if models is not None else sorted({m for w in workers for m in w.model_names})
    t.update(Snapshot(generation=1, heartbeat_interval=2, expiry=6, workers=list(workers),
                      models=names))
    return t


def test_least_load_prefers_the_shorter_engine_queue() -> None:
    busy, idle = worker("busy", running=4, waiting=2), worker("idle", running=1)
    assert LeastLoad().choose([busy, idle], {}).worker_id == "idle"


def test_least_load_counts_our_own_inflight_requests() -> None:
    a, b = worker("a", running=1), worker("b", running=1)
    assert LeastLoad().choose([a, b], {"a": 3}).worker_id == "b"


def test_kv_cache_use_breaks_ties() -> None:
    full, empty = worker("full", kv=0.9), worker("empty", kv=0.1)
    assert LeastLoad().choose([full, empty], {}).worker_id == "empty"


def test_equal_workers_share_the_load() -> None:
    workers = [worker("a"), worker("b"), worker("c")]
    picks = {LeastLoad(random.Random(seed)).choose(workers, {}).worker_id for seed in range(30)}
    assert picks == {"a", "b", "c"}


def test_table_routes_only_to_ready_workers() -> None:
    t = table(worker("draining", state=WorkerState.DRAINING), worker("ok", running=9),
              worker("sick", state=WorkerState.UNHEALTHY))
    assert t.pick("m").worker_id == "ok"


def test_unknown_model_is_not_found_and_names_what_is_served() -> None:
    with pytest.raises(NotFoundError) as info:
        table(worker("a", model="llama")).pick("gpt-9")
    assert "gpt-9" in info.value.message and "llama" in info.value.message
    assert info.value.status_code == 404


def test_known_model_without_ready_worker_is_unavailable() -> None:
    t = table(worker("a", state=WorkerState.STARTING))
    with pytest.raises(ServiceUnavailableError) as info:
        t.pick("m")
    assert "1 starting" in info.value.message
    assert info.value.headers["Retry-After"]


def test_model_whose_workers_all_left_is_unavailable_not_unknown() -> None:
    with pytest.raises(ServiceUnavailableError):
        table(models=["m"]).pick("m")


def test_suspect_worker_is_skipped_and_excluded_ones_too() -> None:
    t = table(worker("a"), worker("b"), worker("c"))
    t.mark_suspect("a")
    picks = {t.pick("m", exclude={"b"}).worker_id for _ in range(10)}
    assert picks == {"c"}
    assert sorted(w.worker_id for w in t.models()["m"]) == ["b", "c"]


def test_table_goes_stale_but_keeps_routing_when_the_controller_is_gone() -> None:
    t = table(worker("a"))

    async def sync_against_nothing() -> None:
        async with aiohttp.ClientSession() as session:
            task = asyncio.create_task(t.sync_forever(session, "http://127.0.0.1:9", 0.05))
            deadline = asyncio.get_running_loop().time() + 5
            while not t.stale:
                assert asyncio.get_running_loop().time() < deadline
                await asyncio.sleep(0.01)
            task.cancel()

    asyncio.run(sync_against_nothing())
    assert t.pick("m").worker_id == "a"
