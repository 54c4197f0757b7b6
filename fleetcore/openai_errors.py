"""What a client of the gateway got, as `fleetcore.errors` classes: `from_openai`.

The `openai` package raises its own exceptions for the gateway's OpenAI error bodies; this maps
them onto the classes the gateway raised them from, so that callers can `except
ServiceUnavailableError:` rather than compare status codes. It lives apart from the classes so
that the services, which never call the gateway through `openai`, do not import that package.
"""

from __future__ import annotations

from typing import Any

import openai

from fleetcore.errors import (
    AuthenticationError,
    BadGatewayError,
    FleetError,
    GatewayTimeoutError,
    GatewayUnreachableError,
    InvalidRequestError,
    NotFoundError,
    OverloadedError,
    PermissionDeniedError,
    RateLimitError,
    RequestTimeoutError,
    ServerError,
    ServiceUnavailableError,
    StreamError,
)

BY_STATUS: dict[int, type[FleetError]] = {
    cls.status_code: cls
    for cls in (InvalidRequestError, AuthenticationError, PermissionDeniedError, NotFoundError,
                OverloadedError, ServerError, BadGatewayError, ServiceUnavailableError,
                GatewayTimeoutError)
    if cls.status_code is not None
}


def _error_fields(body: object) -> dict[str, Any]:
    """The `error` object of an OpenAI error body; the openai package may pass either level."""
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict):
            return inner
    return {}


def _retry_after(headers: Any) -> float | None:
    try:
        return float(headers.get("retry-after"))
    except (TypeError, ValueError, AttributeError):
        return None


def _class_for(status: int, code: object) -> type[FleetError]:
    if status == RateLimitError.status_code and code == RateLimitError.code:
        return RateLimitError
    return BY_STATUS.get(status) or (ServerError if status >= 500 else FleetError)


def _described(err: FleetError, fields: dict[str, Any]) -> FleetError:
    """`err` with the body's own type and code: what the client got, not the class's defaults."""
    if isinstance(fields.get("type"), str):
        err.type = fields["type"]
    err.code = fields.get("code")
    return err


def from_openai(exc: openai.OpenAIError) -> FleetError:
    """The error for an exception the `openai` package raised."""
    if isinstance(exc, openai.APITimeoutError):
        return RequestTimeoutError("The gateway did not answer in time.")
    if isinstance(exc, openai.APIConnectionError):
        return GatewayUnreachableError(f"Cannot reach the gateway: {exc.__cause__ or exc}")
    if not isinstance(exc, openai.APIError):
        return FleetError(str(exc))
    fields = _error_fields(exc.body)
    message = str(fields.get("message") or exc.message)
    param = fields.get("param")
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        cls = _class_for(status, fields.get("code"))
        err = cls(message, status_code=status, param=param,
                  request_id=exc.response.headers.get("x-request-id"),
                  retry_after=_retry_after(exc.response.headers))
        return _described(err, fields)
    return _described(StreamError(message, param=param), fields)
