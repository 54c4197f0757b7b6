"""The multi-host recipe of deploy/README.md, and faults across hosts, on network namespaces.

Three hosts joined by a bridge (tests/integration/netns.py): `a` runs the controller and the
gateway, `b` and `c` one CPU worker each with the demo model, configured as the recipe says
(tests/integration/multihost.py). The tests talk to the gateway from a fourth machine, the
namespace pytest runs in. They cut a worker host off the network and heal it, kill the
controller outright and restart it, soak the gateway with 1,000 streams, and knock on every
door of the engines without their key.

Each test adds what it measured to `multihost-figures.json` in pytest's base temporary folder,
which the module also prints at its end (`-s` shows it); bench/RESULTS.md quotes it.

Where the kernel refuses network namespaces (`ip netns add` fails, for instance without root),
the module is skipped and says why.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.engine_doors import knock_all
from tests.integration.harness import MODEL_NAME
from tests.integration.multihost import (
    AUTH,
    CONTROLLER_PORT,
    ENGINE_PORT,
    EXPIRY,
    GATEWAY_PORT,
    HEARTBEAT_INTERVAL,
    HOSTS,
    WORKER_PORT,
    ClientLoop,
    MultiHostStack,
    Outcome,
)
from tests.integration.netns import Network, netns_refusal
from tests.integration.soak import Soak, raise_fd_limit

pytestmark = pytest.mark.integration

# The gateway syncs its table every second (its default), and the controller looks for silent
# workers every min(heartbeat interval, expiry / 4).
SYNC_INTERVAL = 1.0
EXPIRE_PERIOD = min(HEARTBEAT_INTERVAL, EXPIRY / 4)
# Slack for a loaded 2-core machine running two engines.
MARGIN = 2.0


@pytest.fixture(scope="module")
def figures(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    found: dict = {}
    yield found
    path = Path(tmp_path_factory.getbasetemp()) / "multihost-figures.json"
    path.write_text(json.dumps(found, indent=2))
    print(f"\nmulti-host figures ({path}):\n{json.dumps(found, indent=2)}")


@pytest.fixture(scope="module")
def net() -> Iterator[Network]:
    refusal = netns_refusal()
    if refusal is not None:
        pytest.skip(f"multi-host tests need network namespaces: {refusal}")
    with Network(HOSTS) as network:
        yield network


@pytest.fixture(scope="module")
def fleet(net: Network, tmp_path_factory: pytest.TempPathFactory,
          model_path: Path) -> Iterator[MultiHostStack]:
    stack = MultiHostStack(workdir=tmp_path_factory.mktemp("multihost"), model_path=model_path,
                           controller_port=CONTROLLER_PORT, gateway_port=GATEWAY_PORT, net=net)
    try:
        stack.start_recipe()
        yield stack
    finally:
        stack.close()


@pytest.fixture
def both_serving(fleet: MultiHostStack) -> MultiHostStack:
    """Each test starts from both workers registered, ready and in the gateway's table."""
    for name in ("b", "c"):
        fleet.wait_worker_state(fleet.worker_id(name), "ready", timeout=60)
    fleet.wait_gateway_workers(2)
    return fleet


def _failed(outcomes: list[Outcome]) -> list[str]:
    return [f"{o.detail} (worker {o.worker})" for o in outcomes if not o.ok]


def test_recipe_serves_through_the_gateway_from_workers_on_other_hosts(
    both_serving: MultiHostStack, net: Network,
) -> None:
    fleet = both_serving
    b, c = net.hosts["b"], net.hosts["c"]
    urls = {w["worker_id"]: w["engine_url"].rstrip("/") for w in fleet.workers()}
    # b advertises where it binds; c binds 0.0.0.0 and advertises its address.
    assert urls == {fleet.worker_id("b"): f"http://{b.address}:{ENGINE_PORT}",
                    fleet.worker_id("c"): f"http://{c.address}:{ENGINE_PORT}"}
    assert (b.address, ENGINE_PORT) in net.listening("b")
    assert ("0.0.0.0", ENGINE_PORT) in net.listening("c")
    # Each service listens where the recipe says, on the ports of its firewall table.
    a_ports = net.listening("a")
    assert (net.hosts["a"].address, CONTROLLER_PORT) in a_ports
    assert ("0.0.0.0", GATEWAY_PORT) in a_ports
    for host in (b, c):
        assert (host.address, WORKER_PORT) in net.listening(host.name)
        health = httpx.get(f"http://{host.address}:{WORKER_PORT}/health", timeout=5)
        assert health.status_code == 200

    served: dict[str, int] = {}

    def both_used() -> bool:
        reply = httpx.post(
            f"{fleet.gateway_url}/v1/chat/completions", headers=AUTH, timeout=60,
            json={"model": MODEL_NAME, "max_tokens": 8,
                  "messages": [{"role": "user", "content": "Say hello."}]},
        )
        assert reply.status_code == 200, reply.text
        assert reply.json()["choices"][0]["message"]["content"]
        worker = reply.headers["x-fleet-worker"]
        served[worker] = served.get(worker, 0) + 1
        return len(served) == 2

    fleet.wait_for(both_used, "requests through the gateway to reach both workers", 120)
    assert set(served) == {fleet.worker_id("b"), fleet.worker_id("c")}


def test_worker_hosts_answer_nothing_but_health_and_metrics_without_the_engine_key(
    both_serving: MultiHostStack, net: Network,
) -> None:
    """Issue 20: from another host (the client machine), every door of each engine, as its own
    spec lists them plus the undocumented ones (tests/integration/engine_doors.py), with no key,
    a wrong key and the key the controller hands gateways. Only that key opens anything but
    health and metrics; and a worker host listens on no other port of its address."""
    for record in both_serving.workers():
        host = net.hosts[record["worker_id"].split("-")[0]]
        # The worker read the engine's spec with the key: the gateway routes by it.
        assert "/v1/chat/completions" in (record["engine_paths"] or [])
        found, wrong = knock_all(record["engine_url"].rstrip("/"), record["engine_api_key"])
        assert wrong == [], f"{record['worker_id']}: {len(wrong)} of {len(found)} doors: {wrong}"
        assert ("POST", "/invocations") in {(d.method, d.path) for d in found}
        reachable = {(address, port) for address, port in net.listening(host.name)
                     if not address.startswith("127.")}
        engine_bind = host.address if host.name == "b" else "0.0.0.0"
        assert reachable == {(host.address, WORKER_PORT), (engine_bind, ENGINE_PORT)}


def test_partitioned_worker_host_leaves_routing_and_comes_back(
    both_serving: MultiHostStack, net: Network, figures: dict,
) -> None:
    fleet = both_serving
    b, c = fleet.worker_id("b"), fleet.worker_id("c")
    with ClientLoop(fleet.gateway_url) as load:
        begun = time.monotonic()
        fleet.wait_for(lambda: load.served_after(begun, b) > 0 and load.served_after(begun, c) > 0,
                       "the clients to reach both workers", 120)
        retries_before = fleet.gateway_retries()
        net.partition("b")
        # Taken once the link is down (`ip` takes a few ms): a request started later cannot
        # have reached b; one started while the command ran counts as in flight at the cut.
        cut = time.monotonic()
        fleet.wait_for(lambda: fleet.worker_record(b) is None, "the controller to drop b",
                       EXPIRY + EXPIRE_PERIOD + MARGIN + 10)
        dropped = time.monotonic()
        fleet.wait_gateway_workers(1, timeout=SYNC_INTERVAL + MARGIN + 10)
        unrouted = time.monotonic()
        # Stay cut off until every request sent before b left the table has ended: one
        # waiting on b must be given up and sent to c, not saved by the network coming back.
        fleet.wait_for(lambda: load.all_ended(started_before=unrouted)
                       and load.served_after(unrouted) >= 6,
                       "the clients to be served while b is cut off", 120)
        retried = fleet.gateway_retries() - retries_before
        healed = time.monotonic()
        net.heal("b")
        fleet.wait_worker_state(b, "ready", timeout=60)
        back = time.monotonic()
        fleet.wait_for(lambda: load.served_after(healed, b) > 0, "b to get traffic again", 60)
        traffic = time.monotonic()
    outcomes = load.snapshot()
    not_started = [o for o in outcomes if o.started >= cut]
    in_flight = [o for o in outcomes if o.started < cut < o.ended]
    while_out = [o for o in outcomes if unrouted <= o.started and o.ended <= healed]
    figures["partition"] = {
        "heartbeat_interval_s": HEARTBEAT_INTERVAL, "expiry_s": EXPIRY,
        "requests": len(outcomes), "failed": _failed(outcomes),
        "controller_dropped_after_s": round(dropped - cut, 2),
        "gateway_stopped_routing_after_s": round(unrouted - cut, 2),
        "requests_started_after_the_cut": len(not_started),
        "of_which_failed": len(_failed(not_started)),
        "slowest_after_the_cut_s": round(max(o.ended - o.started for o in not_started), 2),
        "sent_to_b_then_retried_on_c": retried,
        "in_flight_at_the_cut": len(in_flight),
        "of_which_failed_in_flight": len(_failed(in_flight)),
        "healed_back_ready_after_s": round(back - healed, 2),
        "healed_first_request_after_s": round(traffic - healed, 2),
    }
    assert not _failed(not_started), _failed(not_started)
    # Requests did go to b after the cut, and were given up and sent to c.
    assert retried >= 1
    assert unrouted - cut <= EXPIRY + EXPIRE_PERIOD + SYNC_INTERVAL + MARGIN
    # Once out of the table, b got no request until it came back.
    assert all(o.worker == c for o in while_out if o.ok), {o.worker for o in while_out}
    # It registers again at its next heartbeat after the network returns.
    assert back - healed <= HEARTBEAT_INTERVAL + MARGIN + 5


def test_controller_killed_and_restarted_refills_while_the_gateway_serves(
    both_serving: MultiHostStack, figures: dict,
) -> None:
    fleet = both_serving
    workers = {fleet.worker_id("b"), fleet.worker_id("c")}

    def registered() -> set[str]:
        return {w["worker_id"] for w in fleet.workers() if w["state"] == "ready"}

    with ClientLoop(fleet.gateway_url) as load:
        begun = time.monotonic()
        fleet.wait_for(lambda: all(load.served_after(begun, w) for w in workers),
                       "the clients to reach both workers", 120)
        killed = time.monotonic()
        fleet.stop("controller", sig=signal.SIGKILL)
        fleet.wait_for(lambda: fleet.gateway_health()["controller"] == "stale",
                       "the gateway to notice", 10)
        fleet.wait_for(lambda: load.served_after(killed) >= 4,
                       "the clients to be served without a controller", 60)
        fleet.start_controller()
        up = time.monotonic()
        fleet.wait_for(lambda: registered() == workers, "the registry to refill",
                       HEARTBEAT_INTERVAL + MARGIN + 10)
        refilled = time.monotonic()
        fleet.wait_for(lambda: fleet.gateway_health()["controller"] == "ok",
                       "the gateway to sync again", 10)
        synced = time.monotonic()
        fleet.wait_for(lambda: load.served_after(synced) >= 4,
                       "the clients to be served after the restart", 60)
    outcomes = load.snapshot()
    figures["controller_restart"] = {
        "heartbeat_interval_s": HEARTBEAT_INTERVAL,
        "requests": len(outcomes), "failed": _failed(outcomes),
        "down_for_s": round(up - killed, 2),
        "registry_refilled_after_s": round(refilled - up, 2),
        "gateway_synced_after_s": round(synced - up, 2),
    }
    assert not _failed(outcomes), _failed(outcomes)
    assert refilled - up <= HEARTBEAT_INTERVAL + MARGIN


def test_soak_1000_concurrent_streams_lose_nothing_and_leak_nothing(
    net: Network, tmp_path_factory: pytest.TempPathFactory, figures: dict,
) -> None:
    """The subject is the gateway: 1,000 concurrent streams from the client machine through a
    gateway on host `a` to fake engines (tests/integration/fake_engine.py, 8 words 20 ms apart)
    on hosts `b` and `c`, twice. Every stream must arrive whole; the gateway's open files must
    come back to their idle count; its RSS must stay within a margin of where it was after a
    warm-up (what the allocator keeps from the first round's peak), and the second round must
    not add to it (tests/integration/soak.py says why)."""
    raise_fd_limit(8192)
    stack = MultiHostStack(workdir=tmp_path_factory.mktemp("soak"), model_path=Path("unused"),
                           controller_port=CONTROLLER_PORT + 10, gateway_port=GATEWAY_PORT + 1,
                           net=net)
    try:
        stack.start_controller()
        gateway = stack.start_gateway("soak-gateway")
        for host in ("b", "c"):
            stack.start_fake_engine_on(host, "soak-model", ENGINE_PORT + 1, interval_ms=20)
        stack.wait_gateway_workers(2)
        soak = Soak(stack.gateway_url, gateway.proc.pid, model="soak-model")
        result = soak.run(stack.wait_for)
    finally:
        stack.close()
    figures["soak"] = result.figures()
    assert result.lost == [], result.lost[:5]
    assert result.fds_after <= result.fds_before
    assert result.rss_after_mib - result.rss_before_mib <= Soak.RSS_MARGIN_MIB
    assert result.rss_second_mib - result.rss_after_mib <= Soak.RSS_GROWTH_MIB
