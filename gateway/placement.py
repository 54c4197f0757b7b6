"""Where a prompt waits least for its first token: cache hits against each engine's queue.

For each candidate the gateway estimates the prefill work ahead of the prompt there (its
backlog) plus the part of the prompt that engine would compute (what it does not hold), and
divides by that engine's prefill speed. The prompt goes where that wait is shortest. So a
prompt stays on the worker that holds its prefix until that worker's pending prefill passes a
limit: the time the other workers would take to compute the prefix again, plus their own
backlog. Nothing to tune: the speeds and the work per waiting request are learned by each
worker from its engine's counters (worker/load.py) and the backlog is kept here.

The backlog is what this gateway sent and the engine has not yet prefilled, which it knows the
instant it routes (a burst cannot pile onto one worker from stale reports), drained at the
engine's learned speed; or, when larger, the engine's own reported queue (requests waiting
times its prefill work per request), which also counts other gateways' requests.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from controller.protocol import WorkerRecord

# Until an engine has reported its speed: slower than any GPU engine, so that a backlog this
# gateway cannot yet measure drains late rather than early (it spreads rather than piles).
DEFAULT_TOKENS_PER_S = 2000.0


@dataclass
class _Backlog:
    tokens: float = 0.0
    at: float = 0.0


@dataclass(frozen=True)
class Estimate:
    worker: WorkerRecord
    backlog: float  # prefill tokens ahead of this prompt
    uncached: float  # prompt tokens the engine would compute
    rate: float  # prefill tokens per second

    @property
    def wait(self) -> float:
        """Seconds until the prompt's prefill would be done there."""
        return (self.backlog + self.uncached) / self.rate


class Placement:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._backlogs: dict[str, _Backlog] = {}

    @staticmethod
    def rate(worker: WorkerRecord, candidates: Iterable[WorkerRecord] = ()) -> float:
        """The worker's prefill speed; unknown: the slowest known among `candidates`."""
        if worker.load.prefill_tokens_per_s:
            return worker.load.prefill_tokens_per_s
        known = [w.load.prefill_tokens_per_s for w in candidates if w.load.prefill_tokens_per_s]
        return min(known, default=DEFAULT_TOKENS_PER_S)

    def own_backlog(self, worker: WorkerRecord, rate: float) -> float:
        state = self._backlogs.get(worker.worker_id)
        if state is None:
            return 0.0
        now = self._clock()
        state.tokens = max(0.0, state.tokens - rate * (now - state.at))
        state.at = now
        return state.tokens

    def backlog(self, worker: WorkerRecord, rate: float, prompt_tokens: float) -> float:
        load = worker.load
        per_request = load.prefill_tokens_per_request or prompt_tokens
        return max(self.own_backlog(worker, rate), load.waiting * per_request)

    def estimates(self, candidates: Iterable[WorkerRecord],
                  uncached: Callable[[WorkerRecord], float],
                  prompt_tokens: float) -> list[Estimate]:
        candidates = list(candidates)
        out = []
        for worker in candidates:
            rate = self.rate(worker, candidates)
            out.append(Estimate(worker, self.backlog(worker, rate, prompt_tokens),
                                uncached(worker), rate))
        return out

    def sent(self, estimate: Estimate) -> None:
        """The prompt went to `estimate.worker`: its prefill is now ahead of the next one."""
        state = self._backlogs.setdefault(estimate.worker.worker_id, _Backlog())
        self.own_backlog(estimate.worker, estimate.rate)  # drained up to now
        state.tokens += estimate.uncached
        state.at = self._clock()

    def forget(self, live_worker_ids: set[str]) -> None:
        for wid in set(self._backlogs) - live_worker_ids:
            del self._backlogs[wid]
