"""Where adapters go (gateway/lora_placement.py): the demand policy and the naive baseline.

Examples pin the rules; property tests drive random slot views and check what must hold
whatever the view: a load never goes over a worker's slots, never unloads a static adapter or
one with requests in flight, a request that must wait is given a load unless no slot can be
had, and the copy pushed out is never hotter than another that could have gone.
"""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from gateway.lora_placement import DemandPlacement, Load, NaivePlacement, Slots, Use

NOW = 100.0


def _w(wid: str, capacity: int = 2, load: float = 0.0, **resident: Use) -> Slots:
    return Slots(wid, capacity, load, resident)


def test_a_held_adapter_is_routed_where_it_is_without_a_load() -> None:
    decision = DemandPlacement().decide("x", [_w("a", x=Use()), _w("b")], NOW)
    assert decision.load is None and not decision.wait and decision.pin is None


def test_an_adapter_nobody_holds_goes_to_the_least_loaded_free_slot() -> None:
    workers = [_w("a", load=3, y=Use()), _w("b", load=1, z=Use()), _w("c", capacity=1, load=0,
                                                                        q=Use())]
    decision = DemandPlacement().decide("x", workers, NOW)
    assert decision.wait and decision.load == Load("b", reason="first_use")


def test_with_all_slots_full_the_least_recently_used_idle_adapter_makes_room() -> None:
    workers = [_w("a", capacity=1, y=Use(inflight=0, last_used=50)),
               _w("b", capacity=1, z=Use(inflight=0, last_used=20)),
               _w("c", capacity=1, q=Use(inflight=3, last_used=1))]
    decision = DemandPlacement().decide("x", workers, NOW)
    assert decision.wait and decision.load == Load("b", evict="z", reason="first_use")


def test_the_coldest_idle_adapter_makes_room_not_the_hottest_between_two_requests() -> None:
    # hot was idle longer than cold, but draws far more requests: cold goes.
    workers = [_w("a", capacity=1, hot=Use(last_used=20, heat=9.0)),
               _w("b", capacity=1, cold=Use(last_used=50, heat=0.5))]
    decision = DemandPlacement().decide("x", workers, NOW)
    assert decision.load == Load("b", evict="cold", reason="first_use")


def test_a_new_adapter_goes_where_the_held_adapters_draw_the_least_demand() -> None:
    # b is busier this instant, but a holds the hot adapter: the new one goes to b, so that
    # each worker's set stays balanced.
    workers = [_w("a", capacity=4, load=0, hot=Use(heat=8.0)),
               _w("b", capacity=4, load=2, warm=Use(inflight=2, heat=2.0))]
    assert DemandPlacement().decide("x", workers, NOW).load == Load("b", reason="first_use")


def test_a_copy_into_a_free_slot_is_made_earlier_than_one_that_pushes_another_out() -> None:
    policy = DemandPlacement(spread_at=4, spread_free_at=2)
    free = [_w("a", x=Use(inflight=2)), _w("b", y=Use(last_used=0))]
    assert policy.decide("x", free, NOW).load == Load("b", reason="spread")
    full = [_w("a", x=Use(inflight=2)), _w("b", capacity=1, y=Use(last_used=0))]
    assert policy.decide("x", full, NOW).load is None
    fuller = [_w("a", x=Use(inflight=4)), _w("b", capacity=1, y=Use(last_used=0))]
    assert policy.decide("x", fuller, NOW).load == Load("b", evict="y", reason="spread")
    assert policy.decide("x", [_w("a", x=Use(inflight=1)), _w("b")], NOW).load is None


def test_an_engine_blocks_an_adapter_only_when_its_batch_slots_run_others() -> None:
    busy = Slots("a", 8, 0.0, {"y": Use(inflight=1), "z": Use(inflight=2), "x": Use()},
                 batch_slots=2)
    assert busy.blocks("x") and not busy.blocks("y")
    assert not Slots("a", 8, 0.0, {"y": Use(inflight=1), "x": Use()}, batch_slots=2
                     ).blocks("x")
    assert not Slots("a", 8, 0.0, dict(busy.resident)).blocks("x")  # not reported: no limit


def test_a_held_adapter_goes_first_where_a_batch_slot_is_free_for_it() -> None:
    blocked = Slots("a", 8, 0.0, {"x": Use(), "y": Use(inflight=1), "z": Use(inflight=1)},
                    batch_slots=2)
    running = Slots("b", 8, 5.0, {"x": Use(inflight=1), "y": Use(inflight=4)}, batch_slots=2)
    aware = DemandPlacement(batch_aware=True)
    decision = aware.decide("x", [blocked, running], NOW)
    assert decision.prefer == {"b"} and decision.load is None and not decision.wait
    # No preference where every holder (or none) can run it now, nor when told not to look.
    assert aware.decide("y", [blocked, running], NOW).prefer == frozenset()
    assert DemandPlacement().decide("x", [blocked, running], NOW).prefer == frozenset()


def test_nothing_is_unloaded_while_in_flight_or_static() -> None:
    workers = [_w("a", capacity=1, y=Use(inflight=1)), _w("b", capacity=1, z=Use(static=True))]
    decision = DemandPlacement().decide("x", workers, NOW)
    assert decision.wait and decision.load is None


def test_a_slot_being_loaded_is_taken() -> None:
    workers = [Slots("a", 1, 0.0, {}, frozenset({"y"})), _w("b", capacity=1, load=5)]
    assert DemandPlacement().decide("x", workers, NOW).load == Load("b", reason="first_use")


def test_a_hot_adapter_spreads_and_its_requests_do_not_wait() -> None:
    policy = DemandPlacement(spread_at=2)
    cool = [_w("a", x=Use(inflight=1)), _w("b")]
    assert policy.decide("x", cool, NOW).load is None
    hot = [_w("a", x=Use(inflight=2)), _w("b")]
    decision = policy.decide("x", hot, NOW)
    assert not decision.wait and decision.load == Load("b", reason="spread")


def test_spreading_pushes_out_only_an_adapter_idle_for_a_while() -> None:
    policy = DemandPlacement(spread_at=1, spread_min_idle=5.0)
    recent = [_w("a", capacity=1, x=Use(inflight=3)),
              _w("b", capacity=1, y=Use(last_used=NOW - 1))]
    assert policy.decide("x", recent, NOW).load is None
    idle = [_w("a", capacity=1, x=Use(inflight=3)),
            _w("b", capacity=1, y=Use(last_used=NOW - 10))]
    assert policy.decide("x", idle, NOW).load == Load("b", evict="y", reason="spread")


def test_a_cold_extra_copy_shrinks_and_the_last_copy_stays() -> None:
    policy = DemandPlacement(shrink_after=30.0)
    workers = [_w("a", x=Use(last_used=NOW - 40)), _w("b", x=Use(last_used=NOW - 35)),
               _w("c", y=Use(last_used=NOW - 1000))]
    # b's copy was used last: it stays; y has one copy only, however cold.
    assert policy.shrink(workers, NOW) == [("a", "x")]
    busy = [_w("a", x=Use(last_used=NOW - 40)), _w("b", x=Use(inflight=1, last_used=0))]
    assert policy.shrink(busy, NOW) == [("a", "x")]


def test_an_adapter_another_gateway_uses_is_neither_evicted_nor_shrunk() -> None:
    """This gateway sent it nothing lately, but its engine reports requests for it."""
    policy = DemandPlacement(shrink_after=30.0)
    full = [_w("a", capacity=1, y=Use(last_used=NOW - 100, busy=True))]
    decision = policy.decide("x", full, NOW)
    assert decision.load is None and decision.wait
    assert NaivePlacement().decide("x", full, NOW).load is None
    copies = [_w("a", x=Use(last_used=NOW - 40, busy=True)), _w("b", x=Use(last_used=NOW - 35))]
    assert policy.shrink(copies, NOW) == []


def test_naive_loads_on_the_least_loaded_worker_even_where_another_holds_it() -> None:
    workers = [_w("a", load=5, x=Use()), _w("b", load=0)]
    decision = NaivePlacement().decide("x", workers, NOW)
    assert decision.wait and decision.pin == "b" and decision.load == Load("b")
    workers = [_w("a", load=0, x=Use()), _w("b", load=5)]
    assert NaivePlacement().decide("x", workers, NOW).pin == "a"


_uses = st.builds(Use, inflight=st.integers(0, 3), last_used=st.floats(0, NOW),
                  heat=st.floats(0, 20), static=st.booleans(), busy=st.booleans())
_names = st.sampled_from(["p", "q", "r", "s", "x"])


@st.composite
def _views(draw: st.DrawFn) -> list[Slots]:
    views = []
    for i in range(draw(st.integers(1, 4))):
        capacity = draw(st.integers(1, 3))
        resident = draw(st.dictionaries(_names, _uses, max_size=capacity))
        views.append(Slots(f"w{i}", capacity, draw(st.floats(0, 10)), resident,
                           batch_slots=draw(st.integers(0, 2))))
    return views


@given(_views(), st.sampled_from([DemandPlacement(spread_at=1, batch_aware=True),
                                  NaivePlacement()]))
def test_any_load_fits_the_slots_and_unloads_only_what_may_go(
        workers: list[Slots], policy: DemandPlacement | NaivePlacement) -> None:
    decision = policy.decide("x", workers, NOW)
    by_id = {w.worker_id: w for w in workers}
    if decision.load is not None:
        target = by_id[decision.load.worker_id]
        assert "x" not in target.resident
        if decision.load.evict is None:
            assert target.free > 0
        else:
            use = target.resident[decision.load.evict]
            assert use.inflight == 0 and not use.static and not use.busy
    if decision.pin is not None:
        assert decision.pin in by_id
    holders = [w for w in workers if "x" in w.resident]
    # Preferred: some holders, each able to run it in the next step, never all of them.
    assert decision.prefer <= {w.worker_id for w in holders if not w.blocks("x")}
    assert len(decision.prefer) < max(1, len(holders))
    if isinstance(policy, DemandPlacement) and any(w.blocks("x") for w in holders):
        assert decision.prefer == {w.worker_id for w in holders if not w.blocks("x")} or \
            all(w.blocks("x") for w in holders)
        assert decision.wait == (not holders)
        room = any(w.free > 0 or w.evictable(NOW, 0.0) for w in workers)
        if not holders:
            assert (decision.load is not None) == room
        if decision.load is not None and decision.load.evict is not None:
            # Pushed out: no copy that could have gone instead is colder.
            victim = by_id[decision.load.worker_id].resident[decision.load.evict]
            could = [u for w in workers if "x" not in w.resident
                     for _, u in w.evictable(NOW, 0.0 if not holders else 5.0)]
            assert all(victim.heat <= u.heat for u in could)


@given(_views())
def test_shrink_never_takes_the_last_copy_nor_a_busy_or_static_one(workers: list[Slots]
                                                                   ) -> None:
    doomed = DemandPlacement(shrink_after=10.0).shrink(workers, NOW)
    by_id = {w.worker_id: w for w in workers}
    for wid, name in doomed:
        use = by_id[wid].resident[name]
        assert use.inflight == 0 and not use.static and not use.busy
        assert NOW - use.last_used >= 10.0
    for name in {n for w in workers for n in w.resident}:
        copies = sum(name in w.resident for w in workers)
        assert sum(n == name for _, n in doomed) < copies
