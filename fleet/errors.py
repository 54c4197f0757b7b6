"""The OpenAI error body, and the one place where exceptions become HTTP responses.

Handlers raise `FleetError` subclasses; `install_error_handlers` turns those, FastAPI's validation
errors, unknown routes and unexpected exceptions into `{"error": {message, type, param, code}}`.
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

logger = logging.getLogger(__name__)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class FleetError(Exception):
    """An error with an HTTP status that clients see as an OpenAI error body."""

    status_code: int = 500
    type: str = "server_error"
    code: str | None = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = dict(headers or {})

    def body(self) -> dict[str, Any]:
        detail = ErrorDetail(message=self.message, type=self.type, param=self.param, code=self.code)
        return {"error": detail.model_dump()}


class InvalidRequestError(FleetError):
    status_code = 400
    type = "invalid_request_error"


class AuthenticationError(FleetError):
    status_code = 401
    type = "authentication_error"
    code = "invalid_api_key"


class PermissionDeniedError(FleetError):
    status_code = 403
    type = "permission_error"
    code = "model_not_allowed"


class RateLimitError(FleetError):
    """A client key over its requests- or tokens-per-minute limit, or at its limit of requests
    in flight; carries Retry-After."""

    status_code = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class OverloadedError(FleetError):
    """Every worker of a model is at the gateway's in-flight cap and its queue is full, or a
    request waited in the queue too long; carries Retry-After."""

    status_code = 429
    type = "rate_limit_error"
    code = "overloaded"


class NotFoundError(FleetError):
    status_code = 404
    type = "invalid_request_error"
    code = "not_found"


class ServiceUnavailableError(FleetError):
    status_code = 503
    type = "server_error"
    code = "service_unavailable"


class BadGatewayError(FleetError):
    status_code = 502
    type = "server_error"
    code = "upstream_error"


class GatewayTimeoutError(FleetError):
    status_code = 504
    type = "server_error"
    code = "upstream_timeout"


def error_response(exc: FleetError) -> JSONResponse:
    return JSONResponse(exc.body(), status_code=exc.status_code, headers=exc.headers)


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


async def _http_handler(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    if exc.status_code == 404:
        err: FleetError = NotFoundError(f"No route {request.method} {request.url.path}.")
    elif exc.status_code == 405:
        # Starlette names the allowed methods in `Allow`, which RFC 9110 requires on a 405.
        err = InvalidRequestError(f"Method {request.method} is not allowed on {request.url.path}.",
                                  code="method_not_allowed", headers=exc.headers)
        err.status_code = 405
    else:
        err = FleetError(str(exc.detail))
        err.status_code = exc.status_code
        err.type = "invalid_request_error" if exc.status_code < 500 else "server_error"
    return error_response(err)


async def _unexpected_handler(request: Request, exc: Exception) -> JSONResponse:
    logger.exception("unhandled error path=%s", request.url.path)
    return error_response(FleetError("Internal error; the server logged the details."))


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(FleetError, _fleet_error_handler)
    app.add_exception_handler(RequestValidationError, _validation_handler)
    app.add_exception_handler(StarletteHTTPException, _http_handler)
    app.add_exception_handler(Exception, _unexpected_handler)
