"""The gateway's HTTP service, built by `create_app(settings)`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any, Literal

import aiohttp
from fastapi import FastAPI, Request
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel
from starlette.responses import Response

from fleetcore.cluster_auth import bearer
from fleetcore.errors import ErrorResponse, FleetError, NotFoundError, install_error_handlers
from fleetcore.tracing import Tracing
from gateway import validation
from gateway.adapter_admin import AdapterAdmin
from gateway.adapters import AdapterFleet
from gateway.asgi import GenerateRoutes, Handler, RelayResponse
from gateway.auth import Authenticator
from gateway.breaker import Breakers
from gateway.controller_sync import ControllerSync
from gateway.endpoints import (
    ENDPOINTS,
    RESPONSES,
    EngineEndpoint,
    anthropic_error,
    routed_paths,
)
from gateway.engine_client import EngineClient
from gateway.kv_view import KvSync, KvViews
from gateway.limits import KeyLimiter
from gateway.lora_placement import PLACEMENTS, DemandPlacement, PlacementPolicy
from gateway.metrics import GatewayMetrics
from gateway.pipeline import Pipeline
from gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    GatewayStatus,
    LoadLoraAdapterRequest,
    ModelCard,
    ModelList,
    ModelRequest,
    TableHealth,
    UnloadLoraAdapterRequest,
)
from gateway.proxy import Proxy
from gateway.routing import POLICIES, CacheAware, RoutingPolicy
from gateway.routing_table import Limits, RoutingTable
from gateway.settings import GatewaySettings
from gateway.tracing import RequestTracing

logger = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in [
        (400, "Malformed request"),
        (401, "Missing or invalid API key"),
        (403, "The API key may not use this model"),
        (404, "Unknown model"),
        (409, "A LoRA adapter may not take a base model's name"),
        (429, "The API key is over a limit, or every worker is busy and the queue is full"),
        (503, "No worker available for the model"),
    ]
}
_SSE_EVENT = {"type": "object", "required": ["data"], "properties": {
    "data": {"type": "string", "description": "A chunk as JSON, or [DONE] at the end."}}}
# The engine's answer, relayed: a JSON object, or server-sent events for `"stream": true`.
_GENERATED: dict[int | str, dict[str, object]] = {
    200: {"description": "The engine's answer",
          "content": {"application/json": {}, "text/event-stream": {"schema": _SSE_EVENT}}},
    **_ERRORS,
}


def _policy(name: str, views: KvViews) -> RoutingPolicy:
    if name == CacheAware.name:
        return CacheAware(views=views)
    return POLICIES[name]()


def _placement(settings: GatewaySettings) -> PlacementPolicy:
    if settings.lora_placement == DemandPlacement.name:
        return DemandPlacement(spread_at=settings.adapter_spread_at,
                               spread_free_at=settings.adapter_spread_free_at,
                               batch_aware=settings.adapter_batch_aware,
                               shrink_after=settings.adapter_shrink_after)
    return PLACEMENTS[settings.lora_placement]()


def build_table(settings: GatewaySettings, views: KvViews | None = None) -> RoutingTable:
    views = views or KvViews()
    table = RoutingTable(
        _policy(settings.routing, views),
        overrides={m: _policy(p, views) for m, p in settings.routing_overrides.items()},
        breakers=Breakers(threshold=settings.breaker_threshold,
                          cooldown=settings.breaker_cooldown),
        limits=Limits(max_inflight_per_worker=settings.max_inflight_per_worker,
                      queue_size=settings.queue_size, queue_timeout=settings.queue_timeout),
    )
    table.adapters = AdapterFleet(table, _placement(settings),
                                  wait_timeout=settings.adapter_wait_timeout)
    return table


async def _upkeep_forever(adapters: AdapterFleet, interval: float) -> None:
    while True:
        await asyncio.sleep(interval)
        adapters.upkeep()


async def _reconcile_forever(kv_sync: KvSync, table: RoutingTable, interval: float) -> None:
    while True:
        if table.snapshot is not None:
            kv_sync.reconcile(table.snapshot.workers)
        await asyncio.sleep(interval)


def create_app(settings: GatewaySettings) -> FastAPI:
    auth = Authenticator(settings.load_keys(), settings.keys_file, settings.admin_api_keys)
    shared = None
    if settings.shared_state is not None:
        # Imported here: the store's client (redis) is needed only by gateways that share one.
        from gateway.shared_state import SharedState

        shared = SharedState(settings.shared_state, timeout=settings.shared_state_timeout,
                             interval=settings.shared_state_interval)
    limiter = KeyLimiter(shared=shared)
    views = KvViews()
    table = build_table(settings, views)
    # Only cache-aware reads the engines' caches: nothing is polled for the other policies.
    reads_caches = CacheAware.name in (settings.routing, *settings.routing_overrides.values())
    adapters = table.adapters
    assert adapters is not None
    metrics = GatewayMetrics(table)
    table.on_latency = metrics.observe_latency
    if not auth.enabled:
        logger.warning("no API keys configured: the gateway accepts every client")
    # The controller is asked once a second, through aiohttp; the engines carry every request,
    # through the gateway's lean client (gateway/engine_client.py). Both verify against the
    # given CA.
    tls = settings.ssl_context()
    engines = EngineClient(connect_timeout=settings.connect_timeout,
                           read_timeout=settings.read_timeout,
                           dead_peer_timeout=settings.dead_peer_timeout, ssl_context=tls)
    proxy = Proxy(engines, table, metrics, max_attempts=settings.max_attempts,
                  retry_backoff=settings.retry_backoff,
                  max_continuations=settings.max_continuations,
                  stall_timeout=settings.stall_timeout)
    # Off unless the OTEL_* variables configure an exporter (fleetcore/tracing.py).
    tracing = Tracing.from_env("llm-fleet-gateway")
    pipeline = Pipeline(settings, auth=auth, limiter=limiter, table=table, metrics=metrics,
                        proxy=proxy,
                        tracing=None if tracing is None else RequestTracing(tracing.tracer))
    admin = AdapterAdmin(table, adapters, lambda: adapters.session,
                         settings.controller_addresses, bearer(settings.controller_token()))

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        connector = aiohttp.TCPConnector(ssl=tls)
        async with aiohttp.ClientSession(connector=connector) as session:
            sync = ControllerSync(table, session, settings.controller_addresses,
                                  interval=settings.sync_interval,
                                  headers=bearer(settings.controller_token()))
            adapters.session = session
            tasks = [asyncio.create_task(sync.run_forever()),
                     asyncio.create_task(_upkeep_forever(adapters, settings.sync_interval))]
            if shared is not None:
                tasks.append(asyncio.create_task(shared.run_forever(table)))
            kv_sync = KvSync(views, session) if reads_caches else None
            if kv_sync is not None:
                tasks.append(asyncio.create_task(_reconcile_forever(
                    kv_sync, table, settings.sync_interval)))
            if auth.keys_file is not None:
                tasks.append(asyncio.create_task(
                    auth.watch_forever(settings.keys_reload_interval, limiter.forget)
                ))
            try:
                yield
            finally:
                for task in tasks:
                    task.cancel()
                # Bounded: a task that swallows its cancellation (a client library's bug) must
                # not keep the gateway from stopping.
                await asyncio.wait(tasks, timeout=5)
                if shared is not None:
                    await shared.close()
                if kv_sync is not None:
                    await kv_sync.close()
                adapters.session = None
                engines.close()
                if tracing is not None:
                    await asyncio.to_thread(tracing.shutdown)  # exports what is left

    app = FastAPI(title="llm-fleet gateway", version="0.1.0", lifespan=lifespan)
    app.state.table = table
    app.state.metrics = metrics
    app.state.settings = settings
    app.state.auth = auth
    app.state.limiter = limiter
    app.state.shared = shared
    app.state.pipeline = pipeline
    install_error_handlers(app)

    async def chat_completions(request: Request) -> Response | RelayResponse:
        return await pipeline.generate(request, "/v1/chat/completions", ChatCompletionRequest)

    async def completions(request: Request) -> Response | RelayResponse:
        return await pipeline.generate(request, "/v1/completions", CompletionRequest)

    # Served by GenerateRoutes (gateway/asgi.py) before FastAPI routes anything; declared here
    # for the OpenAPI spec and for anything that walks the routes.
    app.post("/v1/chat/completions", responses=_GENERATED, response_model=None,
             openapi_extra=_body_schema(ChatCompletionRequest))(chat_completions)
    app.post("/v1/completions", responses=_GENERATED, response_model=None,
             openapi_extra=_body_schema(CompletionRequest))(completions)
    routes: dict[str, Handler] = {"/v1/chat/completions": chat_completions,
                                  "/v1/completions": completions}
    for endpoint in ENDPOINTS.values():
        routes[endpoint.path] = _model_route(pipeline, endpoint)
        body = _FORM_BODY if endpoint.body == "form" else _body_schema(ModelRequest)
        app.post(endpoint.path, summary=endpoint.summary, response_model=None,
                 responses=_GENERATED, openapi_extra=body)(routes[endpoint.path])
    # Stored responses, by id: served under RESPONSES/ by GenerateRoutes; declared for the spec.
    async def stored_response(request: Request, response_id: str) -> Response | RelayResponse:
        return await pipeline.stored_response(request)

    stored = RESPONSES + "/{response_id}"
    app.get(stored, summary="Retrieve a stored response (OpenAI)", response_model=None,
            responses=_GENERATED, openapi_extra=_BEARER)(stored_response)
    app.post(stored + "/cancel", summary="Cancel a response in the background (OpenAI)",
             response_model=None, responses=_GENERATED, openapi_extra=_BEARER)(stored_response)
    GenerateRoutes.install(app, routes, under={RESPONSES + "/": pipeline.stored_response})

    def model_cards(request: Request) -> list[ModelCard]:
        caller = auth.authenticate(request.headers.get("authorization"))
        created = int(time.time())
        served = table.models()
        cards = [
            # A base model is its own root; an adapter names its base as parent.
            ModelCard(id=name, created=created, root=name,
                      max_model_len=table.max_model_len(name), endpoints=routed_paths(workers))
            for name, workers in sorted(served.items()) if caller.entry.allows(name)
        ]
        for name, source, base in adapters.listing():
            workers = [w for w in served.get(base, []) if w.lora_slots
                       or w.worker_id in adapters.holders(name)]
            if workers and caller.entry.allows(name):
                cards.append(ModelCard(id=name, created=created, root=source, parent=base,
                                       max_model_len=table.max_model_len(base),
                                       endpoints=routed_paths(workers)))
        return cards

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS,
             openapi_extra=_BEARER)
    async def list_models(request: Request) -> ModelList:
        return ModelList(data=model_cards(request))

    @app.get("/v1/models/{model:path}", response_model=ModelCard, responses=_ERRORS,
             openapi_extra=_BEARER)
    async def retrieve_model(request: Request, model: str) -> ModelCard:
        card = next((c for c in model_cards(request) if c.id == model), None)
        if card is None:  # a model the key may not use is not shown to exist either
            raise NotFoundError(f"The model '{model}' does not exist.", param="model",
                                code="model_not_found")
        return card

    @app.post("/v1/load_lora_adapter", responses=_ERRORS, openapi_extra=_BEARER,
              summary="Declare a LoRA adapter for the fleet (admin key)")
    async def load_lora_adapter(request: Request, body: LoadLoraAdapterRequest) -> Response:
        auth.authenticate_admin(request.headers.get("authorization"))
        await admin.declare(body)
        # vLLM's own answer, so that its clients and scripts work unchanged.
        return Response(f"Success: LoRA adapter '{body.lora_name}' added successfully.",
                        media_type="text/plain")

    @app.post("/v1/unload_lora_adapter", responses=_ERRORS, openapi_extra=_BEARER,
              summary="Remove a LoRA adapter from the fleet (admin key)")
    async def unload_lora_adapter(request: Request, body: UnloadLoraAdapterRequest
                                  ) -> Response:
        auth.authenticate_admin(request.headers.get("authorization"))
        await admin.remove(body.lora_name)
        return Response(f"Success: LoRA adapter '{body.lora_name}' removed successfully.",
                        media_type="text/plain")

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health", response_model=TableHealth | GatewayStatus,
             openapi_extra=_BEARER_OPTIONAL)
    async def health(request: Request) -> TableHealth | GatewayStatus:
        """Always 200 while the gateway serves: probes and load balancers call it without a
        key. With keys on, only a valid key sees the table, counted over the key's models."""
        caller = auth.caller_or_none(request.headers.get("authorization"))
        if caller is None:
            return GatewayStatus()
        controller: Literal["ok", "stale", "never-synced"]
        if table.synced_at is None:
            controller = "never-synced"
        else:
            controller = "stale" if table.stale else "ok"
        age = None if table.synced_at is None else round(time.monotonic() - table.synced_at, 3)
        allows = caller.entry.allows
        workers, routable = table.worker_counts(None if caller.entry.all_models else allows)
        return TableHealth(controller=controller, table_age_s=age, workers=workers,
                           routable_workers=routable,
                           models=sorted(m for m in table.models() if allows(m)),
                           shared_state=None if shared is None else
                           ("ok" if shared.up else "down"))

    _add_body_schemas(app, [ChatCompletionRequest, CompletionRequest, ModelRequest],
                      settings.input_limits())
    return app


def _model_route(pipeline: Pipeline, endpoint: EngineEndpoint) -> Handler:
    """The handler of one model-addressed endpoint; Anthropic-shaped errors on Anthropic's."""

    async def relay(request: Request) -> Response | RelayResponse:
        return await pipeline.model_request(request, endpoint)

    if endpoint.errors == "openai":
        return relay

    async def anthropic(request: Request) -> Response | RelayResponse:
        try:
            return await relay(request)
        except FleetError as exc:
            return anthropic_error(exc)

    return anthropic


_REF = "#/components/schemas/{model}"
# Handlers check the key themselves (gateway/auth.py); the spec still says a bearer key is needed.
_BEARER: dict[str, Any] = {"security": [{"bearer": []}]}
_BEARER_OPTIONAL: dict[str, Any] = {"security": [{"bearer": []}, {}]}  # more with a key


# An upload: routed by its `model` field, relayed whole.
_FORM_BODY: dict[str, Any] = {**_BEARER, "requestBody": {"required": True, "content": {
    "multipart/form-data": {"schema": {
        "type": "object", "required": ["model", "file"],
        "properties": {"model": {"type": "string", "minLength": 1, "maxLength": 256},
                       "file": {"type": "string", "format": "binary"}}}}}}}


def _body_schema(model: type[BaseModel]) -> dict[str, object]:
    # Handlers read raw bytes (they are relayed unchanged); the docs still show the schema.
    schema = {"$ref": _REF.format(model=model.__name__)}
    return {**_BEARER, "requestBody": {"required": True,
                                       "content": {"application/json": {"schema": schema}}}}


def _add_body_schemas(app: FastAPI, models: list[type[BaseModel]],
                      limits: validation.InputLimits) -> None:
    """Put the request models that handlers parse themselves into the OpenAPI components,
    with this gateway's limits."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = build()
            spec.setdefault("components", {})["securitySchemes"] = {
                "bearer": {"type": "http", "scheme": "bearer"}
            }
            components = spec["components"].setdefault("schemas", {})
            for model in models:
                schema = model.model_json_schema(ref_template=_REF)
                validation.describe_limits(schema, limits)
                components.update(schema.pop("$defs", {}))
                components[model.__name__] = schema
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
