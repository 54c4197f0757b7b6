"""One class per kind of error, the same on both ends of the wire: what a service sends for it,
and what a client that got it back sees (`from_openai`). tests/unit/test_client.py goes through
the real `openai` client; these build its exceptions directly."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest

try:  # The HTTP library under the openai client: httpx2 since openai 3, httpx before.
    import httpx2
except ImportError:  # pragma: no cover
    import httpx as httpx2  # type: ignore[no-redef]

from fleetcore import errors
from fleetcore.openai_errors import from_openai

REQUEST = httpx2.Request("POST", "http://gateway.test/v1/chat/completions")

# What a service sends for each kind: the status, the OpenAI type and code, and whether a client
# may try the same request again.
KINDS = [
    (errors.InvalidRequestError, 400, "invalid_request_error", None, False),
    (errors.AuthenticationError, 401, "authentication_error", "invalid_api_key", False),
    (errors.PermissionDeniedError, 403, "permission_error", "model_not_allowed", False),
    (errors.NotFoundError, 404, "invalid_request_error", "not_found", False),
    (errors.OverloadedError, 429, "rate_limit_error", "overloaded", True),
    (errors.RateLimitError, 429, "rate_limit_error", "rate_limit_exceeded", True),
    (errors.ServerError, 500, "server_error", None, True),
    (errors.BadGatewayError, 502, "server_error", "upstream_error", True),
    (errors.ServiceUnavailableError, 503, "server_error", "service_unavailable", True),
    (errors.GatewayTimeoutError, 504, "server_error", "upstream_timeout", True),
]


def status_error(exc: errors.FleetError, body: Any = None) -> openai.APIStatusError:
    """What the `openai` package raises for `exc` as a service sent it (or for `body`)."""
    headers = {**exc.headers, "x-request-id": "req-1"}
    sent = exc.body() if body is None else body
    response = httpx2.Response(exc.status_code or 500, content=json.dumps(sent).encode(),
                               headers=headers, request=REQUEST)
    return openai.APIStatusError(exc.message, response=response, body=sent)


@pytest.mark.parametrize("cls, status, type_, code, retryable", KINDS)
def test_each_kind_sends_its_status_type_and_code(cls: type[errors.FleetError], status: int,
                                                  type_: str, code: str | None,
                                                  retryable: bool) -> None:
    response = errors.error_response(cls("Nope.", param="model", headers={"Retry-After": "2"}))
    assert response.status_code == status
    assert json.loads(response.body) == {
        "error": {"message": "Nope.", "type": type_, "param": "model", "code": code}}
    assert response.headers["retry-after"] == "2"
    assert cls.retryable is retryable


@pytest.mark.parametrize("cls", [kind[0] for kind in KINDS])
def test_a_client_gets_back_the_class_the_service_raised(cls: type[errors.FleetError]) -> None:
    sent = cls("Nope.", param="model", headers={"Retry-After": "2"})
    got = from_openai(status_error(sent))
    assert type(got) is cls
    assert (got.status_code, got.type, got.code, got.param, got.message) == \
        (sent.status_code, sent.type, sent.code, sent.param, sent.message)
    assert (got.request_id, got.retry_after) == ("req-1", 2.0)


def test_a_key_over_its_limit_is_still_an_overloaded_429() -> None:
    got = from_openai(status_error(errors.RateLimitError("Over 10 requests per minute.")))
    assert isinstance(got, errors.RateLimitError) and isinstance(got, errors.OverloadedError)
    assert str(got) == "429 Over 10 requests per minute. (rate_limit_exceeded)"


def test_a_client_keeps_the_code_it_got_not_the_class_default() -> None:
    body = {"error": {"message": "Who are you?", "type": "authentication_error"}}
    got = from_openai(status_error(errors.AuthenticationError("x"), body))
    assert isinstance(got, errors.AuthenticationError)
    assert got.code is None and str(got) == "401 Who are you?"


def test_an_unknown_status_keeps_its_number() -> None:
    teapot = from_openai(status_error(errors.FleetError("short and stout", status_code=418)))
    assert type(teapot) is errors.FleetError and teapot.status_code == 418
    assert not teapot.retryable
    full = from_openai(status_error(errors.FleetError("disk full", status_code=507)))
    assert type(full) is errors.ServerError and full.status_code == 507 and full.retryable


@pytest.mark.parametrize("cls", [errors.GatewayUnreachableError, errors.RequestTimeoutError,
                                 errors.StreamError])
def test_the_kinds_only_a_client_meets_have_no_status(cls: type[errors.FleetError]) -> None:
    err = cls("The gateway is away.")
    assert err.status_code is None and err.retryable and str(err) == "The gateway is away."
    # Raised in a service by mistake, one is that service's fault: a 500.
    assert errors.error_response(err).status_code == 500
