"""The worker registry: soft state, rebuilt from registrations and heartbeats.

Pure logic with an injected clock, so expiry is testable without waiting.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable

from controller.protocol import (
    AdapterSpec,
    Heartbeat,
    Registration,
    Snapshot,
    WorkerRecord,
    WorkerState,
)

logger = logging.getLogger(__name__)


class UnknownWorker(KeyError):
    """A heartbeat or deregistration named a worker the registry does not hold."""


class Registry:
    def __init__(
        self,
        *,
        heartbeat_interval: float,
        expiry: float,
        model_memory: float = 24 * 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.heartbeat_interval = heartbeat_interval
        self.expiry = expiry
        # How long a model whose workers are all gone is still known (503, not 404).
        self.model_memory = model_memory
        self._clock = clock
        self._started = clock()
        self._workers: dict[str, WorkerRecord] = {}
        self._seen: dict[str, float] = {}
        self._known_models: dict[str, float] = {}
        # Bumped on every change that matters to routing, so gateways can see staleness.
        self.generation = 0
        # The adapter catalogue's reader (controller/adapters.py), for the snapshot.
        self.adapters: Callable[[], list[AdapterSpec]] = list

    def register(self, registration: Registration) -> WorkerRecord:
        now_wall, now = time.time(), self._clock()
        previous = self._workers.get(registration.worker_id)
        record = WorkerRecord(
            **registration.model_dump(),
            registered_at=previous.registered_at if previous else now_wall,
            last_heartbeat=now_wall,
        )
        self._workers[record.worker_id] = record
        self._seen[record.worker_id] = now
        for name in record.model_names:
            self._known_models[name] = now
        self.generation += 1
        logger.info(
            "registered worker_id=%s models=%s url=%s state=%s again=%s",
            record.worker_id, ",".join(record.model_names), record.engine_url,
            record.state.value, previous is not None,
        )
        return record

    def heartbeat(self, worker_id: str, beat: Heartbeat) -> WorkerRecord:
        record = self._workers.get(worker_id)
        if record is None:
            raise UnknownWorker(worker_id)
        now = self._clock()
        if record.state != beat.state:
            logger.info(
                "state worker_id=%s %s->%s", worker_id, record.state.value, beat.state.value
            )
            self.generation += 1
        record.state = beat.state
        record.load = beat.load
        if beat.max_model_len is not None:
            record.max_model_len = beat.max_model_len
        if beat.engine_paths is not None:
            record.engine_paths = beat.engine_paths
        if beat.adapters is not None and beat.adapters != record.adapters:
            logger.info("adapters worker_id=%s %s", worker_id, ",".join(beat.adapters) or "-")
            record.adapters = beat.adapters
            self.generation += 1
        record.last_heartbeat = time.time()
        self._seen[worker_id] = now
        for name in record.model_names:
            self._known_models[name] = now
        return record

    def deregister(self, worker_id: str) -> WorkerRecord:
        record = self._workers.pop(worker_id, None)
        if record is None:
            raise UnknownWorker(worker_id)
        self._seen.pop(worker_id, None)
        self.generation += 1
        logger.info("deregistered worker_id=%s", worker_id)
        return record

    def expire(self) -> list[str]:
        """Drop workers silent for longer than the expiry; returns their ids."""
        now = self._clock()
        gone = [wid for wid, seen in self._seen.items() if now - seen > self.expiry]
        for wid in gone:
            del self._workers[wid]
            del self._seen[wid]
            logger.warning("expired worker_id=%s silent_for>%.1fs", wid, self.expiry)
        for name, seen in list(self._known_models.items()):
            if now - seen > self.model_memory and not self.workers(name):
                del self._known_models[name]
        if gone:
            self.generation += 1
        return gone

    def workers(self, model: str | None = None) -> list[WorkerRecord]:
        records: Iterable[WorkerRecord] = self._workers.values()
        if model is not None:
            records = [r for r in records if model in r.model_names]
        return sorted(records, key=lambda r: r.worker_id)

    def models(self) -> list[str]:
        """Models that at least one registered worker serves, whatever its state."""
        return sorted({name for r in self._workers.values() for name in r.model_names})

    def known_models(self) -> list[str]:
        return sorted(self._known_models)

    def snapshot(self) -> Snapshot:
        return Snapshot(
            generation=self.generation,
            heartbeat_interval=self.heartbeat_interval,
            expiry=self.expiry,
            workers=self.workers(),
            models=self.known_models(),
            warming_up=self._clock() - self._started < self.expiry,
            adapters=self.adapters(),
        )

    def count_by_state(self) -> dict[WorkerState, int]:
        counts = dict.fromkeys(WorkerState, 0)
        for record in self._workers.values():
            counts[record.state] += 1
        return counts
