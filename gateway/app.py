"""The gateway's HTTP service, built by `create_app(settings)`."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pydantic_core
from fastapi import FastAPI, Request
from prometheus_client import generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from pydantic import BaseModel, ValidationError
from starlette.responses import Response

from fleet.cluster_auth import bearer
from fleet.errors import (
    ErrorResponse,
    FleetError,
    InvalidRequestError,
    install_error_handlers,
    validation_error,
)
from gateway.auth import ApiKeys
from gateway.breaker import Breakers
from gateway.metrics import GatewayMetrics
from gateway.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    ModelCard,
    ModelList,
    TableHealth,
)
from gateway.proxy import Proxy
from gateway.routing import POLICIES, CacheAware, RouteRequest, RoutingPolicy
from gateway.routing_table import Limits, RoutingTable
from gateway.settings import GatewaySettings

logger = logging.getLogger(__name__)

_ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorResponse, "description": text}
    for code, text in [
        (400, "Malformed request"),
        (401, "Missing or invalid API key"),
        (404, "Unknown model"),
        (429, "Every worker is busy and the queue is full"),
        (503, "No worker available for the model"),
    ]
}


def _parse(body: bytes, schema: type[BaseModel]) -> BaseModel:
    if not body:
        raise InvalidRequestError("The request body is empty; expected a JSON object.")
    try:
        data = pydantic_core.from_json(body)
    except ValueError as exc:
        raise InvalidRequestError(f"The request body is not valid JSON: {exc}.") from None
    if not isinstance(data, dict):
        raise InvalidRequestError("The request body must be a JSON object.")
    try:
        return schema.model_validate(data)
    except ValidationError as exc:
        raise validation_error(exc) from None


def _policy(name: str, settings: GatewaySettings) -> RoutingPolicy:
    if name == CacheAware.name:
        return CacheAware(match_threshold=settings.cache_match_threshold,
                          balance_abs=settings.balance_abs, balance_rel=settings.balance_rel)
    return POLICIES[name]()


def build_table(settings: GatewaySettings) -> RoutingTable:
    return RoutingTable(
        _policy(settings.routing, settings),
        overrides={m: _policy(p, settings) for m, p in settings.routing_overrides.items()},
        breakers=Breakers(threshold=settings.breaker_threshold,
                          cooldown=settings.breaker_cooldown),
        limits=Limits(max_inflight_per_worker=settings.max_inflight_per_worker,
                      queue_size=settings.queue_size, queue_timeout=settings.queue_timeout),
    )


def create_app(settings: GatewaySettings) -> FastAPI:
    keys = ApiKeys(settings.load_keys())
    table = build_table(settings)
    metrics = GatewayMetrics(table)
    if not keys.enabled:
        logger.warning("no API keys configured: the gateway accepts every client")

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # One session for the controller and the engines, verifying both against the given CA.
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30,
                                         ssl=settings.ssl_context())
        async with aiohttp.ClientSession(connector=connector, auto_decompress=False) as session:
            app.state.proxy = Proxy(
                session, table, metrics,
                max_attempts=settings.max_attempts,
                connect_timeout=settings.connect_timeout,
                read_timeout=settings.read_timeout,
                retry_backoff=settings.retry_backoff,
            )
            sync = asyncio.create_task(table.sync_forever(
                session, settings.controller_addresses, settings.sync_interval,
                headers=bearer(settings.controller_token()),
            ))
            try:
                yield
            finally:
                sync.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await sync

    app = FastAPI(title="llm-fleet gateway", version="0.1.0", lifespan=lifespan)
    app.state.table = table
    app.state.metrics = metrics
    app.state.settings = settings
    install_error_handlers(app)

    async def _read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > settings.max_body_bytes:
            raise InvalidRequestError(
                f"The request body is larger than {settings.max_body_bytes} bytes."
            )
        body = await request.body()
        if len(body) > settings.max_body_bytes:
            raise InvalidRequestError(
                f"The request body is larger than {settings.max_body_bytes} bytes."
            )
        return body

    def _model_label(model: str) -> str:
        # Client-chosen names would make the label set unbounded.
        return model if table.snapshot is not None and model in table.snapshot.models \
            else "unknown"

    async def _generate(request: Request, path: str, schema: type[BaseModel]) -> Response:
        started = time.monotonic()
        request_id = (request.headers.get("x-request-id") or f"fleet-{uuid.uuid4().hex}")[:128]
        model, policy = "unknown", "-"
        try:
            keys.check(request.headers.get("authorization"))
            body = await _read_body(request)
            parsed = _parse(body, schema)
            assert isinstance(parsed, ChatCompletionRequest | CompletionRequest)
            model, policy = _model_label(parsed.model), table.policy_for(parsed.model).name
            route = RouteRequest(
                model=parsed.model,
                session=request.headers.get(settings.session_header) or parsed.user,
                render_prompt=parsed.prompt_text,
            )
            proxy: Proxy = request.app.state.proxy
            response = await proxy.forward(request, path, body, route, bool(parsed.stream),
                                           request_id, started)
        except FleetError as exc:
            metrics.requests.labels(model, str(exc.status_code), policy).inc()
            exc.headers.setdefault("X-Request-Id", request_id)
            logger.info("refused request_id=%s model=%s status=%d code=%s", request_id, model,
                        exc.status_code, exc.code)
            raise
        metrics.requests.labels(model, str(response.status_code), policy).inc()
        return response

    @app.post("/v1/chat/completions", responses=_ERRORS,
              openapi_extra=_body_schema(ChatCompletionRequest))
    async def chat_completions(request: Request) -> Response:
        return await _generate(request, "/v1/chat/completions", ChatCompletionRequest)

    @app.post("/v1/completions", responses=_ERRORS, openapi_extra=_body_schema(CompletionRequest))
    async def completions(request: Request) -> Response:
        return await _generate(request, "/v1/completions", CompletionRequest)

    @app.get("/v1/models", response_model=ModelList, responses=_ERRORS)
    async def list_models(request: Request) -> ModelList:
        keys.check(request.headers.get("authorization"))
        created = int(time.time())
        cards = []
        for name, workers in sorted(table.models().items()):
            lens = [w.max_model_len for w in workers if w.max_model_len]
            cards.append(ModelCard(id=name, created=created, max_model_len=min(lens, default=None)))
        return ModelList(data=cards)

    @app.get("/metrics", include_in_schema=False)
    async def prometheus_metrics() -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/health", response_model=TableHealth)
    async def health() -> TableHealth:
        if table.synced_at is None:
            controller = "never-synced"
        else:
            controller = "stale" if table.stale else "ok"
        age = None if table.synced_at is None else round(time.monotonic() - table.synced_at, 3)
        workers = len(table.snapshot.workers) if table.snapshot else 0
        return TableHealth(controller=controller, table_age_s=age, workers=workers,
                           models=sorted(table.models()))

    _add_body_schemas(app, [ChatCompletionRequest, CompletionRequest])
    return app


_REF = "#/components/schemas/{model}"


def _body_schema(model: type[BaseModel]) -> dict[str, object]:
    # Handlers read raw bytes (they are relayed unchanged); the docs still show the schema.
    schema = {"$ref": _REF.format(model=model.__name__)}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": schema}}}}


def _add_body_schemas(app: FastAPI, models: list[type[BaseModel]]) -> None:
    """Put the request models that handlers parse themselves into the OpenAPI components."""
    build = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = build()
            components = spec.setdefault("components", {}).setdefault("schemas", {})
            for model in models:
                schema = model.model_json_schema(ref_template=_REF)
                components.update(schema.pop("$defs", {}))
                components[model.__name__] = schema
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
