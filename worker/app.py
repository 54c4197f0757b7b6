"""The worker's own small HTTP service: /health for probes, /metrics for Prometheus, and
/kv-cache for gateways (what the engine's prefix cache holds, and its tokenizer)."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import Iterator
from typing import TYPE_CHECKING

import uvicorn
from fastapi import FastAPI, Query, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from controller.protocol import WorkerState
from fleetcore.errors import AuthenticationError, NotFoundError, install_error_handlers
from worker.protocol import KvCacheChanges, TokenizerFiles

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

    def check_key(request: Request) -> None:
        # The engine's key: the gateways that may send the engine prompts may read what it holds.
        given = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
        if not secrets.compare_digest(given.encode(), worker.engine_api_key.encode()):
            raise AuthenticationError("The worker's /kv-cache needs its engine's API key.")

    @app.get("/kv-cache", response_model=KvCacheChanges)
    async def kv_cache(request: Request, epoch: str | None = None,
                       after: int = Query(0, ge=0),
                       wait: float = Query(0.0, ge=0.0, le=30.0)) -> KvCacheChanges:
        """What the engine's prefix cache gained and lost past (`epoch`, `after`); with `wait`,
        held open up to that many seconds until there is something."""
        check_key(request)
        index = worker.kv_index
        if index is None:
            raise NotFoundError("This worker's engine publishes no KV events.",
                                code="kv_events_off")
        await index.wait_past(epoch, after, wait)
        return index.changes(epoch, after)

    @app.get("/kv-cache/tokenizer", response_model=TokenizerFiles)
    async def kv_tokenizer(request: Request) -> TokenizerFiles:
        check_key(request)
        if worker.tokenizer_files is None:
            raise NotFoundError("This worker has no tokenizer.json to share.",
                                code="no_tokenizer")
        return worker.tokenizer_files

    return app


class EmbeddedServer(uvicorn.Server):
    """A uvicorn server that leaves signal handling to its host process."""

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield
