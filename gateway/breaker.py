"""Per-worker circuit breakers: passive failure detection on the request path.

A refused or reset connection opens the breaker at once: the worker is gone, and the controller
will only say so at its expiry. Other failures (5xx before the first byte, timeouts) open it after
`threshold` in a row. After `cooldown` seconds an open breaker lets one trial request through
(half-open); its success closes the breaker, its failure opens it again.
"""

from __future__ import annotations

import enum
import logging
import time
from collections.abc import Callable

logger = logging.getLogger(__name__)


class BreakerState(enum.IntEnum):
    CLOSED = 0
    HALF_OPEN = 1
    OPEN = 2


class CircuitBreaker:
    def __init__(self, worker_id: str, *, threshold: int, cooldown: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.worker_id = worker_id
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._trial_out = False

    @property
    def state(self) -> BreakerState:
        if self._state is BreakerState.OPEN and self._clock() - self._opened_at >= self.cooldown:
            self._state = BreakerState.HALF_OPEN
            self._trial_out = False
        return self._state

    def allows(self) -> bool:
        """May a request go to this worker now? (Does not take the half-open trial slot.)"""
        state = self.state
        return state is BreakerState.CLOSED or (
            state is BreakerState.HALF_OPEN and not self._trial_out
        )

    def acquire(self) -> bool:
        """Count a request sent to the worker; True if it is the half-open trial."""
        if self.state is BreakerState.HALF_OPEN:
            self._trial_out = True
            return True
        return False

    def abandon_trial(self) -> None:
        """The trial request ended with no verdict on the worker (its client left, or the
        gateway stopped it): the next request may try instead."""
        if self._state is BreakerState.HALF_OPEN:
            self._trial_out = False

    def record_success(self) -> None:
        if self._state is not BreakerState.CLOSED:
            logger.info("breaker closed worker=%s", self.worker_id)
        self._state = BreakerState.CLOSED
        self._failures = 0
        self._trial_out = False

    def record_failure(self, *, fatal: bool = False) -> None:
        self._failures += 1
        if fatal or self._failures >= self.threshold or self._state is BreakerState.HALF_OPEN:
            if self._state is not BreakerState.OPEN:
                logger.warning("breaker open worker=%s failures=%d fatal=%s", self.worker_id,
                               self._failures, fatal)
            self._state = BreakerState.OPEN
            self._opened_at = self._clock()
            self._trial_out = False


class Breakers:
    """The breakers of every worker a gateway has sent to."""

    def __init__(self, *, threshold: int = 3, cooldown: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.threshold = threshold
        self.cooldown = cooldown
        self._clock = clock
        self._by_worker: dict[str, CircuitBreaker] = {}

    def __getitem__(self, worker_id: str) -> CircuitBreaker:
        breaker = self._by_worker.get(worker_id)
        if breaker is None:
            breaker = self._by_worker[worker_id] = CircuitBreaker(
                worker_id, threshold=self.threshold, cooldown=self.cooldown, clock=self._clock
            )
        return breaker

    def allows(self, worker_id: str) -> bool:
        breaker = self._by_worker.get(worker_id)
        return breaker is None or breaker.allows()

    def states(self) -> dict[str, BreakerState]:
        return {wid: b.state for wid, b in self._by_worker.items()}

    def forget(self, live_worker_ids: set[str]) -> None:
        for wid in set(self._by_worker) - live_worker_ids:
            del self._by_worker[wid]
