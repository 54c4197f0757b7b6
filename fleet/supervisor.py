"""`fleet up`'s services as child processes: started, restarted when one dies, stopped as one.

A service that exits on its own once the stack is up (a crash, an OOM kill, a `kill -9`) is
started again after a delay that doubles with each exit in a row that came soon after its start,
up to a cap; a run that lasts is forgiven. The other services keep running meanwhile: the
gateway routes around a dead worker, the worker re-registers when it is back. Before the stack is
up, any exit is final (`fleet up` stops and says which service failed): a bad model path or a
taken port would only fail again.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import httpx

logger = logging.getLogger("fleet.up")
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Backoff:
    """Delays between restarts: `first`, doubled for each quick exit in a row, at most `cap`.

    A run of at least `stable_after` seconds ends the series: the next exit waits `first` again.
    """

    first: float = 1.0
    cap: float = 30.0
    stable_after: float = 60.0

    def delay(self, quick_exits: int) -> float:
        return float(min(self.cap, self.first * 2 ** max(0, quick_exits - 1)))


@dataclass
class Service:
    name: str
    argv: list[str]
    proc: subprocess.Popen[bytes] | None = None
    env: dict[str, str] = field(default_factory=dict)
    started_at: float = 0.0
    restarts: int = 0
    quick_exits: int = 0  # exits in a row, each within Backoff.stable_after of its start
    restart_at: float | None = None  # when a dead service is due to start again


def _child_setup() -> None:
    # If `fleet up` itself is killed, its services are told to stop (and workers stop engines).
    with contextlib.suppress(Exception):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class Stack:
    def __init__(self, services: list[Service], backoff: Backoff | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.services = services
        self.backoff = backoff or Backoff()
        self._clock = clock

    def start(self, service: Service) -> None:
        logger.info("starting %s: %s", service.name, " ".join(service.argv))
        # The token comes in FLEET_CLUSTER_TOKEN; a token file variable beside it would clash.
        env = {k: v for k, v in os.environ.items() if k != "FLEET_CLUSTER_TOKEN_FILE"}
        service.proc = subprocess.Popen(
            service.argv, env={**env, **service.env},
            # Own session: the terminal's Ctrl-C reaches only us, and we stop services in order.
            start_new_session=True, preexec_fn=_child_setup,
        )
        service.started_at = self._clock()
        service.restart_at = None

    def exited(self) -> list[tuple[Service, int]]:
        """Services that were started and have exited since, with their exit codes (until
        `supervise` takes note of them)."""
        return [(s, code) for s in self.services
                if s.proc is not None and (code := s.proc.poll()) is not None]

    def supervise(self) -> None:
        """One round: schedule a restart for each service that died, start those that are due."""
        now = self._clock()
        for service, code in self.exited():
            ran = now - service.started_at
            service.proc = None
            service.quick_exits = 0 if ran >= self.backoff.stable_after \
                else service.quick_exits + 1
            delay = self.backoff.delay(max(1, service.quick_exits))
            service.restart_at = now + delay
            if service.quick_exits >= 3:
                logger.error("%s keeps failing: %d exits in a row, each within %gs of its start "
                             "(last code %s); next try in %gs", service.name,
                             service.quick_exits, self.backoff.stable_after, code, delay)
            else:
                logger.error("%s exited with code %s after %.1fs; restarting it in %gs; the "
                             "other services keep running", service.name, code, ran, delay)
        for service in self.services:
            if service.proc is None and service.restart_at is not None \
                    and now >= service.restart_at:
                service.restarts += 1
                logger.info("restarting %s (restart %d)", service.name, service.restarts)
                self.start(service)

    def stop(self, timeout: float) -> None:
        for service in self.services:
            service.restart_at = None
        running = [(s.name, s.proc) for s in self.services
                   if s.proc is not None and s.proc.poll() is None]
        for _, proc in running:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        for name, proc in running:
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.warning("%s did not stop in time; killing it", name)
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def wait_until(check: Callable[[], bool], deadline: float, stack: Stack, what: str) -> None:
    """Poll `check` until it holds; any service exiting meanwhile ends the wait with an error."""
    while time.monotonic() < deadline:
        if dead := stack.exited():
            names = ", ".join(f"{service.name} (exit {code})" for service, code in dead)
            raise RuntimeError(f"{names} stopped while waiting for {what}")
        with contextlib.suppress(httpx.HTTPError):
            if check():
                return
        time.sleep(0.5)
    raise RuntimeError(f"timed out waiting for {what}")
