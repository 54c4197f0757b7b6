"""The worker registry: soft state, rebuilt from registrations and heartbeats.

Every change gets the next `revision`, so that a gateway can ask for the changes since the one
it holds (`changes_since`) instead of the whole table. A worker's record (registration, state,
facts) and its load change apart: a heartbeat whose state and facts are as before but whose
load moved only marks the load, which then travels as three numbers, not a record; a load that
moved less than `LOAD_KV_STEP` in KV-cache use and not at all in requests marks nothing.

Pure logic with an injected clock, so expiry is testable without waiting.
"""

from __future__ import annotations

import collections
import logging
import secrets
import time
from collections.abc import Callable, Iterable

from controller.protocol import (
    AdapterSpec,
    CompactLoad,
    Heartbeat,
    Registration,
    Snapshot,
    TableChanges,
    WorkerLoad,
    WorkerRecord,
    WorkerState,
)

logger = logging.getLogger(__name__)


class UnknownWorker(KeyError):
    """A heartbeat or deregistration named a worker the registry does not hold."""


# KV-cache use that moves less than this since the load last shipped is not a change: the
# routing score weighs it 2x (gateway/routing.py), so this is 0.04 of one request.
LOAD_KV_STEP = 0.02


def compact(load: WorkerLoad) -> CompactLoad:
    return (load.running, load.waiting, load.kv_cache_usage)


def _load_moved(old: WorkerLoad, new: WorkerLoad) -> bool:
    return (old.running != new.running or old.waiting != new.waiting
            or abs(old.kv_cache_usage - new.kv_cache_usage) >= LOAD_KV_STEP)


# The load's slower fields, learned by the worker (moving averages) or rarely changing: they
# are not in the compact load, so a change in them ships the whole record. A learned figure
# that moves less than this fraction since it last shipped is not a change.
LOAD_LEARNED_STEP = 0.1
_LEARNED = ("prefill_tokens_per_s", "prefill_tokens_per_request")


def _slow_moved(old: WorkerLoad, new: WorkerLoad) -> bool:
    if old.busy_adapters != new.busy_adapters:
        return True
    for name in _LEARNED:
        was, now = getattr(old, name), getattr(new, name)
        if (was is None) != (now is None):
            return True
        if was is not None and now is not None and abs(now - was) > LOAD_LEARNED_STEP * was:
            return True
    return False


class Registry:
    def __init__(
        self,
        *,
        heartbeat_interval: float,
        expiry: float,
        model_memory: float = 24 * 3600.0,
        clock: Callable[[], float] = time.monotonic,
        max_removed: int = 10_000,
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
        # Names this run: a restarted controller counts revisions from 0 again.
        self.epoch = secrets.token_hex(8)
        self.revision = 0
        # worker id -> revision of its last record change (or removal), oldest first.
        self._record_changes: collections.OrderedDict[str, int] = collections.OrderedDict()
        # worker id -> revision of its last load change alone, oldest first.
        self._load_changes: collections.OrderedDict[str, int] = collections.OrderedDict()
        # The load each worker's changes last carried, to tell a move from noise.
        self._shipped: dict[str, WorkerLoad] = {}
        # Removals remembered, oldest first; one forgotten raises the floor, below which a
        # gateway gets the whole table again.
        self._removed: collections.deque[tuple[int, str]] = collections.deque()
        self._max_removed = max_removed
        self._floor = 0
        # The adapter catalogue's reader (controller/adapters.py), for the snapshot and
        # the table's changes.
        self.adapters: Callable[[], list[AdapterSpec]] = list

    def _record_changed(self, worker_id: str) -> None:
        self.revision += 1
        self._record_changes[worker_id] = self.revision
        self._record_changes.move_to_end(worker_id)
        self._load_changes.pop(worker_id, None)

    def _removed_worker(self, worker_id: str) -> None:
        self._record_changed(worker_id)
        self._shipped.pop(worker_id, None)
        self._removed.append((self.revision, worker_id))
        while len(self._removed) > self._max_removed:
            revision, wid = self._removed.popleft()
            self._floor = revision
            if self._record_changes.get(wid) == revision:
                del self._record_changes[wid]

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
        self._record_changed(record.worker_id)
        self._shipped[record.worker_id] = record.load
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
        changed = record.state != beat.state
        if changed:
            logger.info(
                "state worker_id=%s %s->%s", worker_id, record.state.value, beat.state.value
            )
            self.generation += 1
        record.state = beat.state
        record.load = beat.load
        if beat.max_model_len is not None and beat.max_model_len != record.max_model_len:
            record.max_model_len = beat.max_model_len
            changed = True
        if beat.engine_paths is not None and beat.engine_paths != record.engine_paths:
            record.engine_paths = beat.engine_paths
            changed = True
        if beat.adapters is not None and beat.adapters != record.adapters:
            logger.info("adapters worker_id=%s %s", worker_id, ",".join(beat.adapters) or "-")
            record.adapters = beat.adapters
            self.generation += 1
            changed = True
        if changed or _slow_moved(self._shipped[worker_id], beat.load):
            self._record_changed(worker_id)
            self._shipped[worker_id] = beat.load
        elif _load_moved(self._shipped[worker_id], beat.load):
            self.revision += 1
            self._load_changes[worker_id] = self.revision
            self._load_changes.move_to_end(worker_id)
            self._shipped[worker_id] = beat.load
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
        self._removed_worker(worker_id)
        logger.info("deregistered worker_id=%s", worker_id)
        return record

    def expire(self) -> list[str]:
        """Drop workers silent for longer than the expiry; returns their ids."""
        now = self._clock()
        gone = [wid for wid, seen in self._seen.items() if now - seen > self.expiry]
        for wid in gone:
            del self._workers[wid]
            del self._seen[wid]
            self._removed_worker(wid)
            logger.warning("expired worker_id=%s silent_for>%.1fs", wid, self.expiry)
        for name, seen in list(self._known_models.items()):
            if now - seen > self.model_memory and not self.workers(name):
                del self._known_models[name]
        if gone:
            self.generation += 1
        return gone

    def ids(self) -> dict[str, WorkerRecord]:
        """The registered workers by id, read-only (the hot heartbeat route's lookup)."""
        return self._workers

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

    def changes_since(self, since: int | None, epoch: str | None) -> TableChanges:
        """What changed after revision `since` of run `epoch`; the whole table when that
        cannot be told (no revision, another run, or removals since forgotten)."""
        workers: list[WorkerRecord]
        removed: list[str] = []
        loads: dict[str, CompactLoad] = {}
        full = since is None or epoch != self.epoch or not self._floor <= since <= self.revision
        if full or since is None:
            workers = self.workers()
        else:
            workers = []
            for wid in reversed(self._record_changes):
                if self._record_changes[wid] <= since:
                    break
                record = self._workers.get(wid)
                if record is None:
                    removed.append(wid)
                else:
                    workers.append(record)
            for wid in reversed(self._load_changes):
                if self._load_changes[wid] <= since:
                    break
                loads[wid] = compact(self._workers[wid].load)
        # Built from checked parts without checking them again: a full table is 10,000 records.
        return TableChanges.model_construct(
            epoch=self.epoch, revision=self.revision, full=full, generation=self.generation,
            heartbeat_interval=self.heartbeat_interval, expiry=self.expiry,
            models=self.known_models(), warming_up=self._clock() - self._started < self.expiry,
            workers=workers, removed=removed, loads=loads, adapters=self.adapters(),
        )

    def count_by_state(self) -> dict[WorkerState, int]:
        counts = dict.fromkeys(WorkerState, 0)
        for record in self._workers.values():
            counts[record.state] += 1
        return counts
