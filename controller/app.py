"""The controller's HTTP service, built by `create_app(settings)`."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import FastAPI, Path, Query, Request, Response
from prometheus_client import CollectorRegistry, Gauge, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from controller.adapters import AdapterCatalogue
from controller.auth import ClusterAuth, ClusterAuthMiddleware, document_security
from controller.heartbeat_route import HeartbeatRoute
from controller.protocol import (
    MODEL_NAME_PATTERN,
    AdapterDeclaration,
    AdapterList,
    AdapterSpec,
    Heartbeat,
    ModelList,
    RegisterResponse,
    Registration,
    Snapshot,
    TableChanges,
    WorkerList,
    WorkerRecord,
)
from controller.registry import Registry, UnknownWorker
from controller.settings import ControllerSettings
from fleetcore.errors import (
    ConflictError,
    ErrorResponse,
    NotFoundError,
    install_error_handlers,
)
from fleetcore.tracing import Tracing, server_span

logger = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorResponse, "description": "Invalid request"},
    404: {"model": ErrorResponse, "description": "Unknown worker"},
}


_ADAPTER_ERRORS: dict[int | str, dict[str, object]] = {
    400: {"model": ErrorResponse, "description": "Invalid request"},
    404: {"model": ErrorResponse, "description": "Unknown adapter"},
    409: {"model": ErrorResponse, "description": "The name is a base model's"},
}
AdapterName = Annotated[str, Path(pattern=MODEL_NAME_PATTERN)]


def _unknown_worker(worker_id: str) -> NotFoundError:
    # Workers react to this code by registering again.
    return NotFoundError(
        f"Worker '{worker_id}' is not registered; register again.",
        param="worker_id",
        code="unknown_worker",
    )


def _get_registry(request: Request) -> Registry:
    return request.app.state.registry  # type: ignore[no-any-return]


async def _expire_forever(registry: Registry) -> None:
    # Checking a few times per expiry keeps a dead worker's overstay short.
    period = min(registry.heartbeat_interval, registry.expiry / 4)
    frozen_at = 0
    while True:
        await asyncio.sleep(period)
        registry.expire()
        # The records live as long as their workers: moved out of the collector's sight once
        # the fleet has grown, so that its full collections (65 ms at 10,000 workers) do not
        # stall heartbeats. They are acyclic, so reference counting still frees them.
        if len(registry.ids()) > 1.25 * frozen_at + 100:
            frozen_at = len(registry.ids())
            gc.freeze()


# WorkerLoad's fields added after /snapshot's readers were written (issue 23).
_NEWER_LOAD_FIELDS = {"workers": {"__all__": {"load": {
    "prefill_tokens_per_s", "prefill_tokens_per_request", "busy_adapters"}}}}


def create_app(settings: ControllerSettings) -> FastAPI:
    registry = Registry(heartbeat_interval=settings.heartbeat_interval, expiry=settings.expiry)
    catalogue = AdapterCatalogue(settings.adapters_file)
    registry.adapters = catalogue.list
    # Off unless the OTEL_* variables configure an exporter (fleetcore/tracing.py): then a
    # worker's registrations and heartbeats are spans in the worker's traces.
    tracing = Tracing.from_env("llm-fleet-controller")
    tracer = tracing.tracer if tracing is not None else None

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        task = asyncio.create_task(_expire_forever(registry))
        try:
            yield
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            if tracing is not None:
                await asyncio.to_thread(tracing.shutdown)  # exports what is left

    app = FastAPI(title="llm-fleet controller", version="0.1.0", lifespan=lifespan)
    app.state.registry = registry
    app.state.adapters = catalogue
    app.state.settings = settings
    install_error_handlers(app)
    # Every call but /health, /metrics and the docs needs a token: the registry decides where
    # traffic goes, and it holds the engines' API keys.
    # Added first, so it runs inside the token check (the last added is the outermost). Not
    # with tracing on: a traced heartbeat is a span, which the FastAPI route makes.
    if tracer is None:
        app.add_middleware(HeartbeatRoute, registry=registry)
    token, read_token = settings.cluster_token, settings.read_token
    app.add_middleware(ClusterAuthMiddleware, auth=ClusterAuth(
        token.get_secret_value() if token else None,
        read_token.get_secret_value() if read_token else None,
    ))
    document_security(app)

    metrics = CollectorRegistry()
    workers_gauge = Gauge(
        "fleet_controller_workers", "Registered workers by state and model",
        ["state", "model"], registry=metrics,
    )

    @app.post("/workers/register", response_model=RegisterResponse, responses=_ERRORS)
    async def register(body: Registration, request: Request) -> RegisterResponse:
        reg = _get_registry(request)
        with server_span(tracer, "register", request.headers, {"fleet.worker_id": body.worker_id}):
            reg.register(body)
        return RegisterResponse(
            worker_id=body.worker_id,
            heartbeat_interval=reg.heartbeat_interval,
            expiry=reg.expiry,
        )

    @app.post("/workers/{worker_id}/heartbeat", response_model=WorkerRecord, responses=_ERRORS)
    async def heartbeat(worker_id: str, body: Heartbeat, request: Request) -> WorkerRecord:
        try:
            with server_span(tracer, "heartbeat", request.headers, {"fleet.worker_id": worker_id}):
                return _get_registry(request).heartbeat(worker_id, body)
        except UnknownWorker:
            raise _unknown_worker(worker_id) from None

    @app.delete("/workers/{worker_id}", response_model=WorkerRecord, responses=_ERRORS)
    async def deregister(worker_id: str, request: Request) -> WorkerRecord:
        try:
            return _get_registry(request).deregister(worker_id)
        except UnknownWorker:
            raise _unknown_worker(worker_id) from None

    @app.get("/workers", response_model=WorkerList)
    async def list_workers(request: Request) -> WorkerList:
        return WorkerList(workers=_get_registry(request).workers())

    @app.get("/models", response_model=ModelList)
    async def list_models(request: Request) -> ModelList:
        return ModelList(models=_get_registry(request).models())

    @app.get("/models/{model}/workers", response_model=WorkerList, responses=_ERRORS)
    async def model_workers(model: str, request: Request) -> WorkerList:
        reg = _get_registry(request)
        if model not in reg.known_models():
            raise NotFoundError(f"No worker has ever served model '{model}'.", param="model",
                                code="model_not_found")
        return WorkerList(workers=reg.workers(model))

    @app.get("/snapshot", response_model=Snapshot)
    async def snapshot(request: Request) -> Response:
        # The whole table, for gateways that predate /table. Their WorkerLoad forbids fields
        # it does not know, so the loads leave out those added since (new gateways read /table).
        body = _get_registry(request).snapshot().model_dump_json(exclude=_NEWER_LOAD_FIELDS)
        return Response(body, media_type="application/json")

    @app.get("/table", response_model=TableChanges, responses={400: _ERRORS[400]})
    async def table(
        request: Request,
        since: int | None = Query(None, ge=0, description="The revision the gateway holds."),
        epoch: str | None = Query(None, max_length=64,
                                  description="The epoch that revision belongs to."),
    ) -> Response:
        """The table's changes since a revision, or the whole table: gateways read this
        every second instead of /snapshot, so a quiet fleet costs almost nothing to follow."""
        changes = _get_registry(request).changes_since(since, epoch)
        # Serialised straight from the registry's records, which are checked on the way in.
        return Response(changes.model_dump_json(), media_type="application/json")

    @app.get("/adapters", response_model=AdapterList)
    async def list_adapters() -> AdapterList:
        return AdapterList(adapters=catalogue.list())

    @app.put("/adapters/{name}", response_model=AdapterSpec, responses=_ADAPTER_ERRORS)
    async def declare_adapter(body: AdapterDeclaration, name: AdapterName) -> AdapterSpec:
        if name in registry.known_models():
            raise ConflictError(f"'{name}' is the name of a base model.", param="name",
                                code="name_taken")
        spec = AdapterSpec(name=name, **body.model_dump())
        if catalogue.put(spec):
            registry.generation += 1
        return spec

    @app.delete("/adapters/{name}", response_model=AdapterSpec, responses=_ADAPTER_ERRORS)
    async def remove_adapter(name: AdapterName) -> AdapterSpec:
        spec = catalogue.remove(name)
        if spec is None:
            raise NotFoundError(f"No adapter '{name}' is declared.", param="name",
                                code="adapter_not_found")
        registry.generation += 1
        return spec

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics(request: Request) -> Response:
        workers_gauge.clear()
        for record in _get_registry(request).workers():
            for name in record.model_names:
                workers_gauge.labels(record.state.value, name).inc()
        return Response(generate_latest(metrics), media_type=CONTENT_TYPE_LATEST)
    return app
