"""Typed errors of a gateway client, mapped from the OpenAI error bodies the gateway sends.

One class per way a request fails, so that callers can `except NoWorkerError:` rather than
compare status codes. `retryable` says whether the same request may succeed later.
"""

from __future__ import annotations

from typing import Any

import openai


class FleetAPIError(Exception):
    """A request the gateway (or the engine behind it) did not answer with a result."""

    status_code: int | None = None
    retryable: bool = False

    def __init__(
        self,
        message: str,
        *,
        status_code: int | None = None,
        type: str | None = None,  # noqa: A002 - the OpenAI body's name for it
        code: str | None = None,
        param: str | None = None,
        request_id: str | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        if status_code is not None:
            self.status_code = status_code
        self.type = type
        self.code = code
        self.param = param
        self.request_id = request_id
        self.retry_after = retry_after

    def __str__(self) -> str:
        status = f"{self.status_code} " if self.status_code is not None else ""
        code = f" ({self.code})" if self.code else ""
        return f"{status}{self.message}{code}"


class BadRequestError(FleetAPIError):
    """400: a malformed request, or one the engine refuses (say, longer than the context)."""

    status_code = 400


class AuthenticationError(FleetAPIError):
    """401: the API key is missing or wrong."""

    status_code = 401


class PermissionDeniedError(FleetAPIError):
    """403: the key may not do this."""

    status_code = 403


class ModelNotFoundError(FleetAPIError):
    """404: no such model (or route)."""

    status_code = 404


class OverloadedError(FleetAPIError):
    """429: the key is over its rate limit, or every worker is busy and the queue is full."""

    status_code = 429
    retryable = True


class ServerError(FleetAPIError):
    """500: something broke inside the gateway or the engine."""

    status_code = 500
    retryable = True


class BadGatewayError(FleetAPIError):
    """502: the engine failed before it answered."""

    status_code = 502
    retryable = True


class NoWorkerError(FleetAPIError):
    """503: the model is known but no worker of it is ready (starting, restarting)."""

    status_code = 503
    retryable = True


class GatewayTimeoutError(FleetAPIError):
    """504: the engine went silent for longer than the gateway's read timeout."""

    status_code = 504
    retryable = True


class GatewayUnreachableError(FleetAPIError):
    """The gateway could not be reached at all (refused, reset, DNS)."""

    retryable = True


class RequestTimeoutError(FleetAPIError):
    """The client's own timeout ran out waiting for the gateway."""

    retryable = True


class StreamError(FleetAPIError):
    """An error event in the middle of a stream: the worker failed while answering."""

    retryable = True


BY_STATUS: dict[int, type[FleetAPIError]] = {
    cls.status_code: cls
    for cls in (BadRequestError, AuthenticationError, PermissionDeniedError, ModelNotFoundError,
                OverloadedError, ServerError, BadGatewayError, NoWorkerError, GatewayTimeoutError)
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


def from_openai(exc: openai.OpenAIError) -> FleetAPIError:
    """The typed error for an exception the `openai` package raised."""
    if isinstance(exc, openai.APITimeoutError):
        return RequestTimeoutError("The gateway did not answer in time.")
    if isinstance(exc, openai.APIConnectionError):
        return GatewayUnreachableError(f"Cannot reach the gateway: {exc.__cause__ or exc}")
    if not isinstance(exc, openai.APIError):
        return FleetAPIError(str(exc))
    fields = _error_fields(exc.body)
    message = str(fields.get("message") or exc.message)
    common = {"type": fields.get("type"), "code": fields.get("code"),
              "param": fields.get("param")}
    if isinstance(exc, openai.APIStatusError):
        status = exc.status_code
        cls = BY_STATUS.get(status) or (ServerError if status >= 500 else FleetAPIError)
        return cls(message, status_code=status, **common,
                   request_id=exc.response.headers.get("x-request-id"),
                   retry_after=_retry_after(exc.response.headers))
    return StreamError(message, **common)
