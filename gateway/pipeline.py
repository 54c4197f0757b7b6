"""The walk of one routed request, top to bottom, as named steps.

parse → authorize → limits → choose and forward, with retries → relay → settle

Each step takes the one `RoutedRequest` the walk carries and fills in what it learned. Steps
raise `FleetError`s; `install_error_handlers` and `GenerateRoutes` turn those into the OpenAI
error body, and `_walk` counts and logs them. Choosing, forwarding and relaying are the
proxy's (gateway/proxy.py); settling a worker's load is its lease's (gateway/routing_table.py).
Settling the request itself (its key's place in flight) is `_walk`'s: when it raises or
returns a plain answer, or, for a stream, when the relayed response is over however it ended.

Three walks share the steps: `generate` (chat and completions, with the input limits),
`model_request` (every other endpoint addressed to a model: a JSON body, or a multipart upload
whose form names the model; gateway/endpoints.py), and `stored_response` (GET, cancel or
DELETE of a stored response, on the worker that holds it). Bodies are relayed as they came.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import pydantic_core
from fastapi import Request
from starlette.responses import Response

from fleetcore.errors import FleetError, NotFoundError, PermissionDeniedError
from gateway import continuation, validation
from gateway.asgi import ClientWatch, RelayResponse
from gateway.auth import Authenticator
from gateway.continuation import OPT_OUT_HEADER
from gateway.endpoints import ENDPOINT_NAMES, RESPONSES, EngineEndpoint
from gateway.forms import form_fields
from gateway.limits import KeyLimiter, usage_charger, usage_charger_for, with_usage
from gateway.metrics import GatewayMetrics
from gateway.protocol import ChatCompletionRequest, CompletionRequest, ModelRequest
from gateway.proxy import Proxy
from gateway.response_ids import ResponseOwners
from gateway.routed_request import RoutedRequest
from gateway.routing import RouteRequest
from gateway.routing_table import RoutingTable
from gateway.settings import GatewaySettings
from gateway.tracing import RequestTracing
from gateway.validation import GenerationRequest

logger = logging.getLogger(__name__)
Parsed = TypeVar("Parsed", bound=ChatCompletionRequest | CompletionRequest | ModelRequest)


class Pipeline:
    """The steps of a routed request, over the gateway's shared objects."""

    def __init__(self, settings: GatewaySettings, *, auth: Authenticator, limiter: KeyLimiter,
                 table: RoutingTable, metrics: GatewayMetrics, proxy: Proxy,
                 tracing: RequestTracing | None = None) -> None:
        self._session_header = settings.session_header
        self._limits = settings.input_limits()
        self._continue = settings.max_continuations > 0
        self._auth = auth
        self._limiter = limiter
        self._table = table
        self._metrics = metrics
        self._proxy = proxy
        self._tracing = tracing  # None: tracing is off (gateway/tracing.py)
        self.responses = ResponseOwners()

    async def generate(self, request: Request, path: str,
                       schema: type[GenerationRequest]) -> Response | RelayResponse:
        """A chat or completion request: its JSON body goes to a worker as it came."""
        routed = self._arrived(path, ENDPOINT_NAMES[path])

        async def prepare() -> None:
            parsed = await self.parse(request, routed, schema)
            self.authorize(routed, parsed.model)
            await self.limit(request, routed, parsed)
            await self.place(routed)

        return await self._walk(request, routed, prepare)

    async def model_request(self, request: Request,
                            endpoint: EngineEndpoint) -> Response | RelayResponse:
        """Any other request addressed to a model in its JSON body (embeddings, responses,
        messages, tokenize, rerank, ...): to a worker of that model whose engine serves the
        path, the body as it came."""
        routed = self._arrived(endpoint.path, endpoint.name)

        async def prepare() -> None:
            if endpoint.body == "form":
                parsed = await self.parse_form(request, routed)
            else:
                parsed = await self.parse(request, routed, ModelRequest)
            self.authorize(routed, parsed.model)
            await self.admit(request, routed, parsed.model)
            await self.place(routed)
            if endpoint.path == RESPONSES:
                model, key_id = parsed.model, routed.caller.key_id
                routed.on_answer = lambda first, worker_id: self.responses.learn(
                    first, worker_id, model, key_id)

        return await self._walk(request, routed, prepare)

    async def stored_response(self, request: Request) -> Response | RelayResponse:
        """GET, cancel or DELETE `/v1/responses/{id}[/...]`: to the worker whose engine made
        that response and holds it."""
        rest = request.url.path[len(RESPONSES) + 1:]
        response_id, _, action = rest.partition("/")
        query = f"?{request.url.query}" if request.url.query else ""
        routed = self._arrived(f"{request.url.path}{query}", "responses")
        routed.method = request.method
        # What the engine's spec calls the path, to check that the engine serves it.
        template = f"{RESPONSES}/{{response_id}}" + (f"/{action}" if action else "")

        async def prepare() -> None:
            owner = self.responses.owner(response_id, routed.caller.key_id)
            if owner is None:
                raise NotFoundError(
                    f"No response '{response_id}' was made through this gateway (or it was "
                    "long ago). Stored responses live in the engine that made them.",
                    param="response_id", code="response_not_found")
            self.authorize(routed, owner.model)
            await self.admit(request, routed, owner.model)
            routed.route = RouteRequest(model=owner.model, path=template,
                                        worker_id=owner.worker_id)

        return await self._walk(request, routed, prepare)

    @staticmethod
    def _arrived(path: str, endpoint: str) -> RoutedRequest:
        return RoutedRequest(request_id=f"fleet-{os.urandom(16).hex()}",  # as unique as uuid4
                             started=time.monotonic(), path=path, endpoint=endpoint)

    async def _walk(self, request: Request, routed: RoutedRequest,
                    prepare: Callable[[], Awaitable[None]]) -> Response | RelayResponse:
        """identify → (parse → authorize → limit) → forward; refusals counted and logged."""
        trace = None if self._tracing is None else self._tracing.begin(routed, request.headers)
        try:
            self.identify(request, routed)
            await prepare()
            response = await self._proxy.forward(routed, ClientWatch(request.receive))
        except BaseException as exc:
            routed.settle()
            if trace is not None:
                trace.end(routed, None, exc)
            if isinstance(exc, FleetError):
                self._metrics.count_request(routed.model, exc.status_code, routed.policy,
                                            routed.endpoint)
                exc.headers.setdefault("X-Request-Id", routed.request_id)
                logger.info("refused request_id=%s key=%s model=%s path=%s status=%d code=%s",
                            routed.request_id, routed.caller.name, routed.model, routed.path,
                            exc.status_code, exc.code)
            raise
        if isinstance(response, RelayResponse):
            response.add_close(routed.settle)  # in flight until the stream's relay is over
            if trace is not None:
                response.add_close(lambda: trace.end(routed, 200))
        else:
            routed.settle()
            if trace is not None:
                trace.end(routed, response.status_code)
        self._metrics.count_request(routed.model, response.status_code, routed.policy,
                                    routed.endpoint)
        return response

    # --- the steps ---

    def identify(self, request: Request, routed: RoutedRequest) -> None:
        """The client's request id, if it gave a sane one, and who the client is."""
        routed.request_id = validation.request_id(request.headers.get("x-request-id")) \
            or routed.request_id
        headers = request.headers
        # Anthropic's clients send their key as x-api-key.
        key = headers.get("authorization") or (
            f"Bearer {headers['x-api-key']}" if "x-api-key" in headers else None)
        routed.caller = self._auth.authenticate(key)

    async def parse(self, request: Request, routed: RoutedRequest, schema: type[Parsed]
                    ) -> Parsed:
        validation.check_headers(request, self._limits, self._session_header)
        routed.body = await validation.read_body(request, self._limits.max_body_bytes)
        routed.fields = validation.json_object(routed.body)
        parsed = validation.validate(routed.fields, schema)
        routed.stream = bool(parsed.stream)
        return parsed

    async def parse_form(self, request: Request, routed: RoutedRequest) -> ModelRequest:
        """A multipart upload: its text fields say the model; the body goes on as it came."""
        content_type = request.headers.get("content-type", "")
        routed.content_type = content_type
        routed.body = await validation.read_body(request, self._limits.max_body_bytes)
        fields = form_fields(routed.body, content_type)
        parsed = validation.parse(pydantic_core.to_json(
            {"model": fields.get("model"), "stream": fields.get("stream") == "true"}),
            ModelRequest)
        routed.stream = bool(parsed.stream)
        return parsed

    def authorize(self, routed: RoutedRequest, model: str) -> None:
        if not routed.caller.entry.allows(model):
            raise PermissionDeniedError(
                f"This API key may not use model '{model}'.", param="model"
            )
        table = self._table
        # Client-chosen names would make the label set unbounded.
        routed.model = model if table.is_known(model) else "unknown"
        routed.policy = table.policy_for(model).name

    async def limit(self, request: Request, routed: RoutedRequest,
                    parsed: GenerationRequest) -> None:
        """The gateway's input limits and the key's rate limits; then what routing looks at."""
        max_model_len = self._table.max_model_len(parsed.model)
        validation.check_limits(parsed, self._limits, max_model_len)
        caller = routed.caller
        routed.slot = await self._limiter.acquire(caller)
        options = parsed.stream_options
        usage_asked = bool(parsed.stream and options and options.include_usage)
        if caller.entry.tpm is not None:
            routed.on_usage = usage_charger(self._limiter, caller, parsed, max_model_len)
        if routed.stream:
            # For a key with a tokens limit, a stream's usage is asked for (one more chunk).
            self.plan_continuation(request, routed,
                                   ask_usage=caller.entry.tpm is not None and not usage_asked)
        routed.route = RouteRequest(
            model=parsed.model,
            session=request.headers.get(self._session_header) or parsed.user,
            path=routed.path,
            render_prompt=parsed.prompt_text,
            prompt_ids=parsed.prompt_ids,
        )

    def plan_continuation(self, request: Request, routed: RoutedRequest,
                          ask_usage: bool) -> None:
        """Whether another worker may continue this stream if its worker fails mid-answer;
        if so, the engine is asked for the answer's token ids (gateway/continuation.py).
        The fields it needs are added to the body as it came, with the usage asked for too if
        need be."""
        if not ask_usage and not self._continue:
            return
        fields = routed.fields if routed.fields is not None else validation.json_object(
            routed.body)
        data = fields
        added: dict[str, Any] = {}
        if ask_usage:
            data = with_usage(data)
            added["stream_options"] = data["stream_options"]
        plan = continuation.plan(routed.path, data, request.headers.get(OPT_OUT_HEADER),
                                 self._continue)
        if isinstance(plan, str):
            logger.debug("not continuable request_id=%s why=%s", routed.request_id, plan)
        else:
            routed.resume = plan
            if not plan.keep_ids:
                added["return_token_ids"] = True
        if added:
            routed.body = validation.with_fields(routed.body, fields, added)

    async def place(self, routed: RoutedRequest) -> None:
        """A request naming a LoRA adapter waits until a worker it may go to holds it. The
        last step before forwarding: nothing awaits between it and the lease, so the adapter
        cannot be unloaded in between."""
        adapters = self._table.adapters
        if adapters is not None and routed.route is not None:
            await adapters.ensure(routed.route)

    async def admit(self, request: Request, routed: RoutedRequest, model: str) -> None:
        """The key's rate limits for a request the gateway does not read beyond its model:
        tokens are charged from the answer's usage, where it reports one."""
        caller = routed.caller
        routed.slot = await self._limiter.acquire(caller)
        if caller.entry.tpm is not None:
            # Without a usage (a stream cut off, an endpoint that reports none), about a token
            # for every four bytes of the request.
            routed.on_usage = usage_charger_for(self._limiter, caller,
                                                fallback=len(routed.body) // 4)
        routed.route = RouteRequest(model=model, session=request.headers.get(
            self._session_header), path=routed.path)
