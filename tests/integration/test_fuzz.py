"""Fuzzing the gateway's and the controller's OpenAPI specs with schemathesis, in a bounded run.

Both services run as real processes: the controller on its own (so fuzzed registrations reach
nobody's routing), and a gateway in front of a second controller and the fake engine (the
subject is the gateway). Every generated request, valid or not, must get an answer below 500
that matches the spec, and both services must be healthy afterwards.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
from fastapi import FastAPI
from hypothesis import HealthCheck, settings
from prometheus_client.parser import text_string_to_metric_families
from schemathesis.config import SchemathesisConfig
from schemathesis.specs.openapi.checks import positive_data_acceptance

from controller.app import create_app as create_controller
from controller.settings import ControllerSettings
from gateway.app import create_app as create_gateway
from gateway.settings import GatewaySettings
from tests.integration.harness import API_KEY, CLUSTER_AUTH, MODEL_NAME, Stack

pytestmark = pytest.mark.integration

MAX_EXAMPLES = 40
_FUZZ = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
                 suppress_health_check=list(HealthCheck))
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def _spec_of(app: FastAPI) -> schemathesis.BaseSchema:
    # The spec is built from the same app factory the services run (the served copy is checked
    # against it below): a lazily fetched schema does not work with this pytest.
    config = SchemathesisConfig.from_dict({"generation": {"mode": "all"}})
    return schemathesis.openapi.from_dict(app.openapi(), config=config)


GATEWAY_SETTINGS = GatewaySettings(api_keys=[API_KEY])
gateway = _spec_of(create_gateway(GATEWAY_SETTINGS))
controller = _spec_of(create_controller(ControllerSettings()))


@pytest.fixture(scope="module")
def gateway_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(workdir=tmp_path_factory.mktemp("fuzz-gateway"), model_path=Path("unused"))
    try:
        stack.start_controller()
        stack.start_fake_engine()
        stack.start_gateway()
        stack.wait_routable(timeout=60)
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="module")
def controller_stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(workdir=tmp_path_factory.mktemp("fuzz-controller"), model_path=Path("unused"))
    try:
        stack.start_controller()
        yield stack
    finally:
        stack.close()


def test_the_fuzzed_specs_are_the_served_ones(gateway_stack: Stack,
                                              controller_stack: Stack) -> None:
    served = httpx.get(f"{gateway_stack.gateway_url}/openapi.json", timeout=5).json()
    assert served == gateway.raw_schema
    served = httpx.get(f"{controller_stack.controller_url}/openapi.json", timeout=5).json()
    assert served == controller.raw_schema
    body = served_body = gateway.raw_schema["paths"]["/v1/chat/completions"]["post"]
    served_body = body["requestBody"]["content"]["application/json"]["schema"]
    assert served_body == {"$ref": "#/components/schemas/ChatCompletionRequest"}


def valid_data_accepted_unless_past_the_context(ctx: Any, response: Any,
                                                case: schemathesis.Case) -> bool | None:
    """schemathesis' positive_data_acceptance, less the one refusal a spec cannot foresee: a
    prompt plus max_tokens longer than the context of the model that serves it."""
    if response.status_code == 400:
        with contextlib.suppress(ValueError, KeyError, TypeError):
            if response.json()["error"]["code"] == "context_length_exceeded":
                return None
    return positive_data_acceptance(ctx, response, case)


@gateway.parametrize()
@_FUZZ
def test_gateway_spec_fuzz(case: schemathesis.Case, gateway_stack: Stack) -> None:
    case.call_and_validate(base_url=gateway_stack.gateway_url, headers=AUTH, timeout=30,
                           excluded_checks=[positive_data_acceptance],
                           additional_checks=[valid_data_accepted_unless_past_the_context])


@controller.parametrize()
@_FUZZ
def test_controller_spec_fuzz(case: schemathesis.Case, controller_stack: Stack) -> None:
    case.call_and_validate(base_url=controller_stack.controller_url, headers=CLUSTER_AUTH,
                           timeout=30)


def answered(stack: Stack) -> dict[str, float]:
    """Requests the gateway answered during the fuzz, by status."""
    counts: dict[str, float] = {}
    text = httpx.get(f"{stack.gateway_url}/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        if family.name == "fleet_gateway_requests":
            for sample in family.samples:
                if sample.name.endswith("_total"):
                    status = sample.labels["status"]
                    counts[status] = counts.get(status, 0) + sample.value
    return counts


def test_gateway_is_healthy_after_the_fuzz(gateway_stack: Stack) -> None:
    counts = answered(gateway_stack)
    print(f"gateway answers during the fuzz, by status: {counts}")
    # The fuzz reached the engine (valid requests for the served model) and the refusals.
    assert counts.get("200", 0) >= 2 and counts.get("400", 0) >= 20
    assert not any(status.startswith("5") for status in counts)
    assert all(s.alive for s in gateway_stack.services.values())
    assert httpx.get(f"{gateway_stack.gateway_url}/health", timeout=5).json()["status"] == "ok"
    reply = httpx.post(f"{gateway_stack.gateway_url}/v1/chat/completions", timeout=30,
                       headers={"Authorization": f"Bearer {API_KEY}"},
                       json={"model": MODEL_NAME, "messages": [{"role": "user", "content": "hi"}]})
    assert reply.status_code == 200 and reply.json()["choices"]
    log = gateway_stack.services["gateway"].tail(10_000)
    assert "Traceback" not in log and "unhandled error" not in log


def test_controller_is_healthy_after_the_fuzz(controller_stack: Stack) -> None:
    assert controller_stack.services["controller"].alive
    assert httpx.get(f"{controller_stack.controller_url}/health", timeout=5).json() == {
        "status": "ok"}
    assert isinstance(controller_stack.workers(), list)
    log = controller_stack.services["controller"].tail(10_000)
    assert "Traceback" not in log and "unhandled error" not in log
