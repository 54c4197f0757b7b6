"""Routing policies: given the candidate workers for a model, pick one.

A policy is a small object behind one interface, testable without a server.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Mapping, Sequence
from typing import Protocol

from controller.protocol import WorkerRecord

logger = logging.getLogger(__name__)


class RoutingPolicy(Protocol):
    name: str

    def choose(
        self, candidates: Sequence[WorkerRecord], inflight: Mapping[str, int]
    ) -> WorkerRecord: ...


def load_score(worker: WorkerRecord, inflight: Mapping[str, int]) -> float:
    """Our own requests in flight to the worker plus the engine's queue as last reported.

    KV-cache use breaks ties: a fuller cache is closer to preempting.
    """
    return inflight.get(worker.worker_id, 0) + worker.load.running + worker.load.waiting + (
        worker.load.kv_cache_usage * 0.5
    )


class LeastLoad:
    name = "least-load"

    def __init__(self, rng: random.Random | None = None) -> None:
        self._rng = rng or random.Random()

    def choose(
        self, candidates: Sequence[WorkerRecord], inflight: Mapping[str, int]
    ) -> WorkerRecord:
        if not candidates:
            raise ValueError("no candidates")
        scores = [load_score(w, inflight) for w in candidates]
        best = min(scores)
        # Random among equals, so idle workers share the first requests of a burst.
        tied = [w for w, s in zip(candidates, scores, strict=True) if s == best]
        return tied[0] if len(tied) == 1 else self._rng.choice(tied)
