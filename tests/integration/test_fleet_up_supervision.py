"""`fleet up` keeps the stack serving when one of its services dies, and brings that one back.

Everything here runs through `fleet up` itself, as a user starts it: two CPU workers (one core
each), the gateway, the controller and the web UI are its children, and the faults are dealt to
those children.
"""

from __future__ import annotations

import itertools
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from tests.integration.fleet_up import FleetUp, kill_tree
from tests.integration.harness import MODEL_NAME

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[FleetUp]:
    up = FleetUp(tmp_path_factory.mktemp("fleet-up-2"),
                 ["--cpu-workers", "2", "--max-model-len", "2048"])
    try:
        up.start_and_wait(timeout=600)
        yield up
    finally:
        up.stop()


def chat(fleet: FleetUp, text: str, timeout: float = 120) -> httpx.Response:
    return httpx.post(f"{fleet.gateway_url}/v1/chat/completions", timeout=timeout,
                      json={"model": MODEL_NAME, "temperature": 0, "max_tokens": 8,
                            "messages": [{"role": "user", "content": text}]})


@dataclass
class Load:
    """Chat requests from a few clients in a loop, each counted by outcome and worker."""

    fleet: FleetUp
    clients: int = 4
    served: list[str] = field(default_factory=list)  # the worker of each 200, in order
    failed: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _run(self, client: int) -> None:
        for n in itertools.count():
            if self._stop.is_set():
                return
            # A new prompt each time, so no worker is preferred for a cached prefix.
            try:
                reply = chat(self.fleet, f"Client {client}, question {n}: name a colour.")
            except httpx.HTTPError as exc:
                self.failed.append(f"{type(exc).__name__}: {exc}")
                continue
            if reply.status_code == 200:
                self.served.append(reply.headers["x-fleet-worker"])
            else:
                self.failed.append(f"{reply.status_code}: {reply.text[:300]}")

    def __enter__(self) -> Load:
        self._threads = [threading.Thread(target=self._run, args=(i,), daemon=True)
                         for i in range(self.clients)]
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=150)


def worker_id_of(fleet: FleetUp, worker: psutil.Process) -> str:
    """The registry's id of a worker process: the record whose engine port its engine has."""
    for child in worker.children(recursive=True):
        argv = child.cmdline()
        if "vllm.entrypoints.openai.api_server" in argv and "--port" in argv:
            port = argv[argv.index("--port") + 1]
            for record in fleet.workers():
                if record["engine_url"].rstrip("/").endswith(f":{port}"):
                    return str(record["worker_id"])
    raise AssertionError(f"no registered worker runs the engine of pid {worker.pid}")


def test_kill_9_of_one_worker_under_load_fails_no_request_and_the_worker_comes_back(
    fleet: FleetUp
) -> None:
    before = fleet.services()
    victim = before["worker-1"]
    victim_id = worker_id_of(fleet, victim)
    survivor_id = worker_id_of(fleet, before["worker-0"])
    with Load(fleet) as load:
        fleet.wait_for(lambda: {victim_id, survivor_id} <= set(load.served),
                       "the load to reach both workers", 120)
        killed_at = time.monotonic()
        kill_tree(victim)
        served_at_kill = len(load.served)
        # fleet up starts it again after the first restart's delay (1 s), not later.
        fleet.wait_for(lambda: "restarting worker-1 (restart 1)" in fleet.text(),
                       "fleet up to restart the worker", 10)
        restarted_after = time.monotonic() - killed_at

        def new_worker_serves() -> bool:
            ready = {w["worker_id"] for w in fleet.workers() if w["state"] == "ready"}
            new = ready - {victim_id, survivor_id}
            return bool(new) and bool(new & set(load.served[served_at_kill:]))

        # Then it takes its engine's start time, which under this load on one core is up to
        # twice what it took idle, when the stack came up.
        fleet.wait_for(new_worker_serves, "the restarted worker to serve",
                       2 * fleet.up_after + 60)
        back_after = time.monotonic() - killed_at
    assert load.failed == [], load.failed[:5]
    assert len(load.served) > served_at_kill
    assert survivor_id in load.served[served_at_kill:]
    after = fleet.services()
    assert after["worker-1"].pid != victim.pid
    # Nothing else was restarted.
    for name in ("controller", "gateway", "webui", "worker-0"):
        assert after[name].pid == before[name].pid, name
    assert "worker-1 exited with code -9" in fleet.text()
    assert "stopping the stack" not in fleet.text()
    print(f"\nworker restarted after {restarted_after:.1f}s, serving after {back_after:.1f}s "
          f"(stack start {fleet.up_after:.1f}s); "
          f"{len(load.served)} requests served, {len(load.failed)} failed")


def test_kill_9_of_the_gateway_brings_a_new_one_that_serves(fleet: FleetUp) -> None:
    before = fleet.services()
    kill_tree(before["gateway"])

    def serving_again() -> bool:
        return fleet.services()["gateway"].pid != before["gateway"].pid and \
            chat(fleet, "What is the capital of France?").status_code == 200

    fleet.wait_for(serving_again, "a new gateway to serve", 60)
    after = fleet.services()
    for name in ("controller", "webui", "worker-0", "worker-1"):
        assert after[name].pid == before[name].pid, name
    assert "gateway exited with code -9" in fleet.text()


def test_sighup_stops_the_whole_stack_and_leaves_nothing_behind(fleet: FleetUp) -> None:
    # The terminal went away: as Ctrl-C, everything stops (stop() checks nothing is left).
    assert fleet.stop(signum=signal.SIGHUP) == 0, fleet.tail()
    assert "stopping the stack" in fleet.text()


def test_a_taken_port_stops_fleet_up_at_once_with_a_clear_message(tmp_path: Path) -> None:
    up = FleetUp(tmp_path)
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", up.gateway_port))
        holder.listen()
        code = up.start().wait(timeout=120)
    assert code == 2, up.tail()
    assert (f"port {up.gateway_port} on 127.0.0.1, for the gateway, is in use"
            in up.text()), up.tail()
    assert "--gateway-port" in up.text()
    assert "starting controller" not in up.text()
