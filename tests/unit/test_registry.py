"""The registry: registration, heartbeats, expiry and the models it knows."""

import pytest

from controller.protocol import Heartbeat, Registration, WorkerLoad, WorkerState
from controller.registry import Registry, UnknownWorker


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def registration(worker_id: str = "w1", model: str = "m", **kw) -> Registration:
    return Registration(worker_id=worker_id, engine_url="http://127.0.0.1:9000",
                        model_names=[model], **kw)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def registry(clock: FakeClock) -> Registry:
    return Registry(heartbeat_interval=2.0, expiry=6.0, clock=clock)


def test_register_then_heartbeat_updates_state_and_load(registry: Registry) -> None:
    registry.register(registration())
    record = registry.heartbeat(
        "w1", Heartbeat(state=WorkerState.READY, load=WorkerLoad(running=3, waiting=1),
                        max_model_len=2048)
    )
    assert record.state is WorkerState.READY
    assert record.load.running == 3 and record.load.waiting == 1
    assert registry.workers("m")[0].max_model_len == 2048


def test_heartbeat_from_unknown_worker_raises(registry: Registry) -> None:
    with pytest.raises(UnknownWorker):
        registry.heartbeat("ghost", Heartbeat(state=WorkerState.READY))


def test_silent_worker_expires_and_heartbeating_one_stays(
    registry: Registry, clock: FakeClock
) -> None:
    registry.register(registration("quiet"))
    registry.register(registration("chatty"))
    for _ in range(4):
        clock.now += 2.0
        registry.heartbeat("chatty", Heartbeat(state=WorkerState.READY))
        registry.expire()
    assert [w.worker_id for w in registry.workers()] == ["chatty"]


def test_worker_not_expired_before_expiry(registry: Registry, clock: FakeClock) -> None:
    registry.register(registration())
    clock.now += 5.9
    assert registry.expire() == []
    clock.now += 0.2
    assert registry.expire() == ["w1"]


def test_reregistration_keeps_one_record(registry: Registry) -> None:
    first = registry.register(registration())
    again = registry.register(registration(state=WorkerState.READY))
    assert len(registry.workers()) == 1
    assert again.registered_at == first.registered_at
    assert again.state is WorkerState.READY


def test_model_stays_known_after_its_workers_leave(registry: Registry) -> None:
    registry.register(registration(model="llama"))
    registry.deregister("w1")
    assert registry.models() == []
    assert registry.known_models() == ["llama"]
    assert registry.snapshot().models == ["llama"]


def test_generation_changes_on_membership_and_state(registry: Registry) -> None:
    g0 = registry.generation
    registry.register(registration())
    g1 = registry.generation
    registry.heartbeat("w1", Heartbeat(state=WorkerState.STARTING))
    assert registry.generation == g1  # no change, no bump
    registry.heartbeat("w1", Heartbeat(state=WorkerState.READY))
    assert g0 < g1 < registry.generation


def test_workers_filtered_by_model(registry: Registry) -> None:
    registry.register(registration("a", model="m1"))
    registry.register(registration("b", model="m2"))
    assert [w.worker_id for w in registry.workers("m2")] == ["b"]
    assert registry.models() == ["m1", "m2"]


def test_deregister_unknown_raises(registry: Registry) -> None:
    with pytest.raises(UnknownWorker):
        registry.deregister("nobody")


def test_snapshot_says_warming_up_for_one_expiry_after_start(
    registry: Registry, clock: FakeClock
) -> None:
    assert registry.snapshot().warming_up
    clock.now += 6.0
    assert not registry.snapshot().warming_up


# -- the table's changes, by revision ------------------------------------------------------------
def _beat(running: int = 0, state: WorkerState = WorkerState.READY,
          kv: float = 0.0) -> Heartbeat:
    return Heartbeat(state=state, load=WorkerLoad(running=running, kv_cache_usage=kv))


def test_changes_since_a_revision_carry_only_what_changed(registry: Registry) -> None:
    for wid in ("w1", "w2", "w3"):
        registry.register(registration(wid, state=WorkerState.READY))
    first = registry.changes_since(None, None)
    assert first.full and [w.worker_id for w in first.workers] == ["w1", "w2", "w3"]
    registry.heartbeat("w1", _beat(running=4))                    # load alone
    registry.heartbeat("w2", _beat(state=WorkerState.DRAINING))   # the record
    registry.deregister("w3")
    registry.register(registration("w4"))
    changes = registry.changes_since(first.revision, first.epoch)
    assert not changes.full
    assert sorted(w.worker_id for w in changes.workers) == ["w2", "w4"]
    assert changes.removed == ["w3"]
    assert changes.loads == {"w1": (4, 0, 0.0)}
    assert changes.revision > first.revision and changes.generation > first.generation
    quiet = registry.changes_since(changes.revision, changes.epoch)
    assert not quiet.full and not quiet.workers and not quiet.removed and not quiet.loads


def test_an_unchanged_or_barely_changed_heartbeat_is_no_change(registry: Registry) -> None:
    registry.register(registration(state=WorkerState.READY))
    revision = registry.revision
    registry.heartbeat("w1", _beat())
    registry.heartbeat("w1", _beat(kv=0.01))  # under LOAD_KV_STEP
    assert registry.revision == revision
    registry.heartbeat("w1", _beat(kv=0.03))
    assert registry.changes_since(revision, registry.epoch).loads == {"w1": (0, 0, 0.03)}


def test_the_whole_table_for_another_run_or_a_gateway_too_far_behind(clock: FakeClock) -> None:
    registry = Registry(heartbeat_interval=2.0, expiry=6.0, clock=clock, max_removed=2)
    registry.register(registration("keep"))
    start = registry.changes_since(None, None)
    assert registry.changes_since(start.revision, "another-epoch").full
    assert registry.changes_since(start.revision + 5, start.epoch).full  # from the future
    for n in range(3):  # three removals, two remembered: the first is forgotten
        registry.register(registration(f"gone{n}"))
        registry.deregister(f"gone{n}")
    behind = registry.changes_since(start.revision, start.epoch)
    assert behind.full and [w.worker_id for w in behind.workers] == ["keep"]
    recent = registry.changes_since(registry.revision - 2, start.epoch)
    assert not recent.full and recent.removed == ["gone2"]


def test_expiry_is_a_removal_in_the_changes(registry: Registry, clock: FakeClock) -> None:
    registry.register(registration("w1"))
    start = registry.changes_since(None, None)
    clock.now += 7
    registry.expire()
    assert registry.changes_since(start.revision, start.epoch).removed == ["w1"]
