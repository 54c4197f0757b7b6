"""The walk of one routed request, top to bottom, as named steps.

parse → authorize → limits → choose and forward, with retries → relay → settle

Each step takes the one `RoutedRequest` the walk carries and fills in what it learned. Steps
raise `FleetError`s; `install_error_handlers` and `GenerateRoutes` turn those into the OpenAI
error body, and `generate` counts and logs them. Choosing, forwarding and relaying are the
proxy's (gateway/proxy.py); settling a worker's load is its lease's (gateway/routing_table.py).
Settling the request itself (its key's place in flight) is `generate`'s: when it raises or
returns a plain answer, or, for a stream, when the relayed response is over however it ended.

Generation requests (a JSON body, relayed unchanged) are the only walk for now; other kinds of
request (multipart uploads streamed through, GET and DELETE of engine resources) are further
walks over the same steps, with their own parse step.
"""

from __future__ import annotations

import logging
import os
import time

from fastapi import Request
from starlette.responses import Response

from fleet.errors import FleetError, PermissionDeniedError
from gateway import validation
from gateway.asgi import ClientWatch, RelayResponse
from gateway.auth import Authenticator
from gateway.limits import KeyLimiter, ask_for_usage, usage_charger
from gateway.metrics import GatewayMetrics
from gateway.proxy import Proxy
from gateway.routed_request import RoutedRequest
from gateway.routing import RouteRequest
from gateway.routing_table import RoutingTable
from gateway.settings import GatewaySettings
from gateway.validation import GenerationRequest

logger = logging.getLogger(__name__)


class Pipeline:
    """The steps of a routed request, over the gateway's shared objects."""

    def __init__(self, settings: GatewaySettings, *, auth: Authenticator, limiter: KeyLimiter,
                 table: RoutingTable, metrics: GatewayMetrics, proxy: Proxy) -> None:
        self._session_header = settings.session_header
        self._limits = settings.input_limits()
        self._auth = auth
        self._limiter = limiter
        self._table = table
        self._metrics = metrics
        self._proxy = proxy

    async def generate(self, request: Request, path: str,
                       schema: type[GenerationRequest]) -> Response | RelayResponse:
        """A chat or completion request: its JSON body goes to a worker as it came."""
        routed = RoutedRequest(request_id=f"fleet-{os.urandom(16).hex()}",  # as unique as uuid4
                               started=time.monotonic(), path=path)
        try:
            self.identify(request, routed)
            parsed = await self.parse(request, routed, schema)
            self.authorize(routed, parsed)
            self.limit(request, routed, parsed)
            response = await self._proxy.forward(routed, ClientWatch(request.receive))
        except BaseException as exc:
            routed.settle()
            if isinstance(exc, FleetError):
                self._metrics.requests.labels(routed.model, str(exc.status_code),
                                              routed.policy).inc()
                exc.headers.setdefault("X-Request-Id", routed.request_id)
                logger.info("refused request_id=%s key=%s model=%s status=%d code=%s",
                            routed.request_id, routed.caller.name, routed.model,
                            exc.status_code, exc.code)
            raise
        if isinstance(response, RelayResponse):
            response.add_close(routed.settle)  # in flight until the stream's relay is over
        else:
            routed.settle()
        self._metrics.requests.labels(routed.model, str(response.status_code),
                                      routed.policy).inc()
        return response

    # --- the steps ---

    def identify(self, request: Request, routed: RoutedRequest) -> None:
        """The client's request id, if it gave a sane one, and who the client is."""
        routed.request_id = validation.request_id(request.headers.get("x-request-id")) \
            or routed.request_id
        routed.caller = self._auth.authenticate(request.headers.get("authorization"))

    async def parse(self, request: Request, routed: RoutedRequest,
                    schema: type[GenerationRequest]) -> GenerationRequest:
        validation.check_headers(request, self._limits, self._session_header)
        routed.body = await validation.read_body(request, self._limits.max_body_bytes)
        parsed = validation.parse(routed.body, schema)
        routed.stream = bool(parsed.stream)
        return parsed

    def authorize(self, routed: RoutedRequest, parsed: GenerationRequest) -> None:
        if not routed.caller.entry.allows(parsed.model):
            raise PermissionDeniedError(
                f"This API key may not use model '{parsed.model}'.", param="model"
            )
        table = self._table
        # Client-chosen names would make the label set unbounded.
        known = table.snapshot is not None and parsed.model in table.snapshot.models
        routed.model = parsed.model if known else "unknown"
        routed.policy = table.policy_for(parsed.model).name

    def limit(self, request: Request, routed: RoutedRequest, parsed: GenerationRequest) -> None:
        """The gateway's input limits and the key's rate limits; then what routing looks at."""
        max_model_len = self._table.max_model_len(parsed.model)
        validation.check_limits(parsed, self._limits, max_model_len)
        caller = routed.caller
        routed.slot = self._limiter.admit(caller)
        if caller.entry.tpm is not None:
            options = parsed.stream_options
            if parsed.stream and not (options and options.include_usage):
                routed.body = ask_for_usage(routed.body)
            routed.on_usage = usage_charger(self._limiter, caller, parsed, max_model_len)
        routed.route = RouteRequest(
            model=parsed.model,
            session=request.headers.get(self._session_header) or parsed.user,
            render_prompt=parsed.prompt_text,
        )
