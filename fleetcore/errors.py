"""Every error of llm-fleet, the OpenAI error body, and where exceptions become HTTP responses.

One class per kind of error, each with its HTTP status, OpenAI `type` and `code`. The same
classes serve both ends of the wire:
- a service raises them, and `install_error_handlers` turns those, FastAPI's validation errors,
  unknown routes and unexpected exceptions into `{"error": {message, type, param, code}}`;
- a client gets them from `fleetcore.openai_errors.from_openai`, which maps what the `openai`
  package raised back onto these classes, with the body's fields, the request id and Retry-After.

`retryable` says whether the same request may succeed later. The kinds only a client meets (the
gateway unreachable, the client's own timeout, an error event mid-stream) have no status.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

logger = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class FleetError(Exception):
    """A request that got no result: an OpenAI error body with an HTTP status, sent or received.

    Keywords given override the class's defaults for this one error (`status_code`, `type`,
    `code`); `headers` go out with the response (Retry-After, Allow). On the client's side,
    `request_id` and `retry_after` come from the response's headers.
    """

    status_code: int | None = None
    type: str = "server_error"
    code: str | None = None
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        type: str | None = None,  # noqa: A002 - the OpenAI body's name for it
        code: str | None = None,
        param: str | None = None,
        headers: Mapping[str, str] | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code
        if type is not None:
            self.type = type
        if code is not None:
            self.code = code
        self.param = param
        self.headers = dict(headers or {})
        self.request_id = request_id
        self.retry_after = retry_after

    def __str__(self) -> str:
        status = f"{self.status_code} " if self.status_code is not None else ""
        code = f" ({self.code})" if self.code else ""
        return f"{status}{self.message}{code}"

    def body(self) -> dict[str, Any]:
        detail = ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return {"error": detail.model_dump()}


class InvalidRequestError(FleetError):
    """400: a malformed request, or one the engine refuses (say, longer than the context)."""

    status_code = 400
    type = "invalid_request_error"


class AuthenticationError(FleetError):
    """401: the API key or token is missing or wrong."""

    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(FleetError):
    """403: the key may not do this (say, use this model)."""

    status_code = 403
    type = "permission_error"
    code = "model_not_allowed"


class NotFoundError(FleetError):
    """404: no such model, or no such route."""

    status_code = 404
    type = "invalid_request_error"
    code = "not_found"


class ConflictError(FleetError):
    """409: the request conflicts with what is there (say, a name already taken)."""

    status_code = 409
    type = "invalid_request_error"
    code = "conflict"


class OverloadedError(FleetError):
    """429, any: every worker of a model is at the gateway's in-flight cap and its queue is full,
    or a request waited in the queue too long; carries Retry-After. `RateLimitError` is the 429
    of a key over its own limits, so `except OverloadedError` catches every 429."""

    status_code = 429
    type = "rate_limit_error"
    code = "overloaded"
    retryable = True


class RateLimitError(OverloadedError):
    """429: a client key over its requests- or tokens-per-minute limit, or at its limit of
    requests in flight; carries Retry-After."""

    code = "rate_limit_exceeded"


class ServerError(FleetError):
    """500 (or another 5xx without its own class): something broke in the service or engine."""

    status_code = 500
    retryable = True


class BadGatewayError(FleetError):
    """502: the engine failed before it answered."""

    status_code = 502
    code = "upstream_error"
    retryable = True


class ServiceUnavailableError(FleetError):
    """503: nothing can serve it now (no worker of the model is ready, the registry is away)."""

    status_code = 503
    code = "service_unavailable"
    retryable = True


class GatewayTimeoutError(FleetError):
    """504: the engine went silent for longer than the gateway's read timeout."""

    status_code = 504
    code = "upstream_timeout"
    retryable = True


class GatewayUnreachableError(FleetError):
    """A client's: the gateway could not be reached at all (refused, reset, DNS)."""

    retryable = True


class RequestTimeoutError(FleetError):
    """A client's: its own timeout ran out waiting for the gateway."""

    retryable = True


class StreamError(FleetError):
    """A client's: an error event in the middle of a stream; the worker failed while answering."""

    retryable = True


def error_response(exc: FleetError) -> JSONResponse:
    # A kind without a status is a client's; raised in a service anyway, it is the service's bug.
    return JSONResponse(exc.body(), status_code=exc.status_code or 500, headers=exc.headers)


_UNION_TAGS = frozenset({"str", "int", "float", "bool", "none", "dict", "list"})


def validation_error(exc: ValidationError | RequestValidationError) -> InvalidRequestError:
    """The first pydantic error, phrased for a person, naming the offending field."""
    errors = exc.errors()
    if not errors:
        return InvalidRequestError("The request body is invalid.")
    first = errors[0]
    loc = []
    for part in first.get("loc", ()):
        if isinstance(part, str) and (part in _UNION_TAGS or "[" in part or "-" in part):
            # pydantic names the member of a union it tried ("str", "list[int]",
            # "constrained-str"): the field's path ends before it.
            break
        if part != "body":
            loc.append(str(part))
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid value")
    where = f"'{param}': " if param else ""
    more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
    return InvalidRequestError(f"Invalid request body: {where}{msg}{more}.", param=param)


async def _fleet_error_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FleetError)
    return error_response(exc)


async def _validation_handler(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    return error_response(validation_error(exc))


def _allow(request: Request, headers: Mapping[str, str] | None) -> dict[str, str]:
    """The methods of every route with the path template of the route Starlette matched."""
    routes = request.app.router.routes
    matched = next((r for r in routes if r.matches(request.scope)[0] is not Match.NONE), None)
    template = getattr(matched, "path", None)
    methods: set[str] = set()
    for route in routes:
        if template is not None and getattr(route, "path", None) == template:
            methods |= getattr(route, "methods", None) or set()
    out = dict(headers or {})
    if methods:
        out["Allow"] = ", ".join(sorted(methods))
    return out


async def _http_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        err: FleetError = NotFoundError(f"No route {request.method} {request.url.path}.")
    elif exc.status_code == 405:
        # RFC 9110 requires `Allow` on a 405. Starlette names the methods of the first route
        # whose path matched; a path served by several routes (PUT and DELETE) has them all.
        err = InvalidRequestError(f"Method {request.method} is not allowed on {request.url.path}.",
                                  status_code=405, code="method_not_allowed",
                                  headers=_allow(request, exc.headers))
    else:
        err = FleetError(str(exc.detail), status_code=exc.status_code,
                         type="invalid_request_error" if exc.status_code < 500 else "server_error")
    return error_response(err)


async def _unexpected_handler(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error path=%s", request.url.path)
    return error_response(ServerError("Internal error; the server logged the details."))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(FleetError, _fleet_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(Exception, _unexpected_handler)
