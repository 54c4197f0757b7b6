"""Where adapters go (gateway/lora_placement.py): the demand policy and the naive baseline.

Examples pin the rules; property tests drive random slot views and check what must hold
whatever the view: a load never goes over a worker's slots, never unloads a static adapter or
one with requests in flight, and a request that must wait is given a load unless no slot can
be had.
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


def test_naive_loads_on_the_least_loaded_worker_even_where_another_holds_it() -> None:
    workers = [_w("a", load=5, x=Use()), _w("b", load=0)]
    decision = NaivePlacement().decide("x", workers, NOW)
    assert decision.wait and decision.pin == "b" and decision.load == Load("b")
    workers = [_w("a", load=0, x=Use()), _w("b", load=5)]
    assert NaivePlacement().decide("x", workers, NOW).pin == "a"


_uses = st.builds(Use, inflight=st.integers(0, 3), last_used=st.floats(0, NOW),
                  static=st.booleans())
_names = st.sampled_from(["p", "q", "r", "s", "x"])


@st.composite
def _views(draw: st.DrawFn) -> list[Slots]:
    views = []
    for i in range(draw(st.integers(1, 4))):
        capacity = draw(st.integers(1, 3))
        resident = draw(st.dictionaries(_names, _uses, max_size=capacity))
        views.append(Slots(f"w{i}", capacity, draw(st.floats(0, 10)), resident))
    return views


@given(_views(), st.sampled_from([DemandPlacement(spread_at=1), NaivePlacement()]))
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
            assert use.inflight == 0 and not use.static
    if decision.pin is not None:
        assert decision.pin in by_id
    holders = [w for w in workers if "x" in w.resident]
    if isinstance(policy, DemandPlacement):
        assert decision.wait == (not holders)
        room = any(w.free > 0 or w.evictable(NOW, 0.0) for w in workers)
        if not holders:
            assert (decision.load is not None) == room


@given(_views())
def test_shrink_never_takes_the_last_copy_nor_a_busy_or_static_one(workers: list[Slots]
                                                                   ) -> None:
    doomed = DemandPlacement(shrink_after=10.0).shrink(workers, NOW)
    by_id = {w.worker_id: w for w in workers}
    for wid, name in doomed:
        use = by_id[wid].resident[name]
        assert use.inflight == 0 and not use.static and NOW - use.last_used >= 10.0
    for name in {n for w in workers for n in w.resident}:
        copies = sum(name in w.resident for w in workers)
        assert sum(n == name for _, n in doomed) < copies
