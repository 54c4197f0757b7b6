"""The worker's own small HTTP service: /health for probes and /metrics for Prometheus."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI, Response
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from controller.protocol import WorkerState
from fleetcore.errors import install_error_handlers

if TYPE_CHECKING:
    from worker.service import Worker


class WorkerMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.engine_up = Gauge(
            "fleet_worker_engine_up", "1 while the engine answers /health", registry=self.registry
        )
        self.engine_restarts = Counter(
            "fleet_worker_engine_restarts", "Engine restarts after a crash", registry=self.registry
        )


def create_app(worker: Worker) -> FastAPI:
    app = FastAPI(title="llm-fleet worker", version="0.1.0")
    install_error_handlers(app)

    @app.get("/health")
    async def health() -> JSONResponse:
        # Ready and draining both mean "alive"; probes that need "routable" read `state`.
        state = worker.state
        ok = state in (WorkerState.READY, WorkerState.DRAINING)
        body = {"state": state.value, "worker_id": worker.worker_id,
                "engine_url": worker.engine_url}
        return JSONResponse(body, status_code=200 if ok else 503)

    @app.get("/metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(worker.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return app


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its host process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
