"""`fleet up`'s supervisor: a service that dies is started again, with backoff; the rest keep
running. Real child processes; the supervisor's clock is the test's, so no test waits for a delay.
"""

from __future__ import annotations

import socket
import sys

import pytest

from fleet.launcher import UpSettings, taken_ports
from fleet.supervisor import Backoff, Service, Stack
from tests.integration.harness import free_port

EXIT_3 = [sys.executable, "-c", "raise SystemExit(3)"]
SLEEPER = [sys.executable, "-c", "import time; time.sleep(600)"]


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _dead(service: Service) -> None:
    """Wait for the service's process to end (it exits at once)."""
    assert service.proc is not None
    service.proc.wait(timeout=30)


@pytest.fixture
def clock() -> Clock:
    return Clock()


def test_backoff_doubles_for_quick_exits_up_to_its_cap() -> None:
    backoff = Backoff(first=1, cap=30)
    assert [backoff.delay(n) for n in range(1, 8)] == [1, 2, 4, 8, 16, 30, 30]


def test_a_dead_service_is_restarted_after_the_delay_and_the_others_keep_running(
    clock: Clock
) -> None:
    crasher, steady = Service("worker-1", EXIT_3), Service("worker-0", SLEEPER)
    stack = Stack([crasher, steady], Backoff(first=1, cap=30, stable_after=60), clock=clock)
    try:
        stack.start(crasher)
        stack.start(steady)
        steady_pid = steady.proc.pid if steady.proc else None
        _dead(crasher)
        clock.now += 0.5
        stack.supervise()
        assert crasher.proc is None and crasher.restart_at == clock.now + 1
        clock.now += 0.9
        stack.supervise()
        assert crasher.proc is None, "restarted before its delay"
        clock.now += 0.2
        stack.supervise()
        assert crasher.proc is not None and crasher.restarts == 1
        assert steady.proc is not None and steady.proc.pid == steady_pid
        assert steady.proc.poll() is None
    finally:
        stack.stop(timeout=10)


def test_quick_exits_in_a_row_back_off_and_are_reported_and_a_long_run_is_forgiven(
    clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    crasher = Service("gateway", EXIT_3)
    stack = Stack([crasher], Backoff(first=1, cap=5, stable_after=60), clock=clock)
    delays = []
    try:
        stack.start(crasher)
        for _ in range(5):
            _dead(crasher)
            clock.now += 2  # each run lasted 2 s: a quick exit
            stack.supervise()
            assert crasher.restart_at is not None
            delays.append(crasher.restart_at - clock.now)
            clock.now = crasher.restart_at
            stack.supervise()
        assert delays == [1, 2, 4, 5, 5]
        assert "gateway keeps failing: 3 exits in a row" in caplog.text
        _dead(crasher)
        clock.now += 61  # this run lasted past stable_after
        stack.supervise()
        assert crasher.restart_at == clock.now + 1
    finally:
        stack.stop(timeout=10)


def test_stop_ends_the_running_services_and_cancels_pending_restarts(clock: Clock) -> None:
    crasher, steady = Service("webui", EXIT_3), Service("controller", SLEEPER)
    stack = Stack([crasher, steady], clock=clock)
    stack.start(crasher)
    stack.start(steady)
    _dead(crasher)
    stack.supervise()
    assert crasher.restart_at is not None
    stack.stop(timeout=10)
    assert steady.proc is not None and steady.proc.poll() is not None
    clock.now += 3600
    stack.supervise()
    assert crasher.proc is None


def test_a_taken_port_is_named_with_the_flag_that_moves_it() -> None:
    ports = ["--controller-port", str(free_port()), "--webui-port", str(free_port())]
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        args = UpSettings.from_cli([*ports, "--gateway-port", str(port)])
        taken = taken_ports(args)
    assert len(taken) == 1
    assert f"port {port} on 127.0.0.1, for the gateway" in taken[0]
    assert "--gateway-port" in taken[0]
    assert taken_ports(args) == []
