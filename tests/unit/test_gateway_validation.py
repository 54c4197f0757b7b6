"""Hostile input and key rules at the gateway's door, before any engine work.

The routing table holds one ready worker of model "m" (context 100 tokens) whose engine does
not exist: a request that gets past every check ends in a 503 from the proxy, so any other
status proves the gateway refused it first.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from controller.protocol import Snapshot, WorkerRecord, WorkerState
from gateway.app import create_app
from gateway.keys import KeyEntry, append_key, hash_key
from gateway.protocol import ChatCompletionRequest, CompletionRequest
from gateway.settings import GatewaySettings
from gateway.validation import InputLimits, check_limits, parse

PLAIN = "sk-plain"
ALICE = "sk-fleet-alice-test-key"  # may use "m" only, 2 requests a minute
OTHER = "sk-fleet-other-test-key"  # may use "other" only
AUTH = {"Authorization": f"Bearer {PLAIN}"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


def _snapshot() -> Snapshot:
    workers = [
        WorkerRecord(worker_id=f"w-{name}", engine_url="http://127.0.0.1:9", model_names=[name],
                     state=WorkerState.READY, max_model_len=100, registered_at=0,
                     last_heartbeat=0)
        for name in ("m", "other")
    ]
    return Snapshot(generation=1, heartbeat_interval=2, expiry=6, models=["m", "other"],
                    workers=workers)


@pytest.fixture
def client(tmp_path: Path) -> Iterator[TestClient]:
    keys = tmp_path / "keys.yaml"
    append_key(keys, hash_key(ALICE), KeyEntry(name="alice", models=["m"], rpm=2))
    append_key(keys, hash_key(OTHER), KeyEntry(name="other", models=["other"]))
    settings = GatewaySettings(
        api_keys=[PLAIN], keys_file=keys, controller_address="http://127.0.0.1:9",
        sync_interval=60, max_attempts=1, max_body_bytes=4096, max_messages=3, max_n=2,
        max_tokens_limit=50,
    )
    app = create_app(settings)
    with TestClient(app) as c:
        app.state.table.update(_snapshot())
        yield c


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body) == {"error"}
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def post(client: TestClient, body: dict | bytes, key: str = PLAIN,
         path: str = "/v1/chat/completions", **headers: str):
    headers = {"Authorization": f"Bearer {key}", **headers}
    if isinstance(body, bytes):
        return client.post(path, content=body,
                           headers={"content-type": "application/json", **headers})
    return client.post(path, json=body, headers=headers)


def test_a_request_within_every_limit_reaches_the_proxy(client: TestClient) -> None:
    assert error_of(post(client, CHAT), 503)["code"] == "upstream_unavailable"


def chat(**extra: object) -> dict:
    return {**CHAT, **extra}


@pytest.mark.parametrize("body, param, code", [
    (chat(messages=[{"role": "user", "content": "x"}] * 4), "messages", "limit_exceeded"),
    (chat(n=3), "n", "limit_exceeded"),
    (chat(max_tokens=51), "max_tokens", "limit_exceeded"),
    (chat(max_completion_tokens=51), "max_completion_tokens", "limit_exceeded"),
    (chat(messages=[{"role": "user", "content": "x" * 1200}]), "messages",
     "context_length_exceeded"),
    (chat(max_tokens=50, messages=[{"role": "user", "content": "x" * 600}]), "max_tokens",
     "context_length_exceeded"),
    (chat(max_tokens="5"), "max_tokens", None),
    (chat(max_tokens=5.5), "max_tokens", None),
    (chat(n=True), "n", None),
    (chat(temperature="hot"), "temperature", None),
    (chat(model=["m"]), "model", None),
    (chat(messages="hi"), "messages", None),
    (chat(messages=[{"role": "user", "content": 5}]), "messages.0.content", None),
    (chat(stream_options={"include_usage": "yes"}), "stream_options.include_usage", None),
])
def test_chat_over_a_limit_or_mistyped_is_400_naming_the_field(
    client: TestClient, body: dict, param: str, code: str | None
) -> None:
    error = error_of(post(client, body), 400)
    assert error["param"] == param and error["type"] == "invalid_request_error"
    if code:
        assert error["code"] == code


@pytest.mark.parametrize("body, param", [
    ({"model": "m", "prompt": ["a", "b", "c", "d"]}, "prompt"),
    ({"model": "m", "prompt": list(range(101))}, "prompt"),
    ({"model": "m", "prompt": [[1, 2], list(range(101))]}, "prompt"),
    ({"model": "m", "prompt": "x" * 1001}, "prompt"),
    ({"model": "m", "prompt": "x", "max_tokens": 100}, "max_tokens"),
    ({"model": "m", "prompt": [1, "a"]}, "prompt"),
])
def test_completion_limits(client: TestClient, body: dict, param: str) -> None:
    assert error_of(post(client, body, path="/v1/completions"), 400)["param"] == param


def test_whole_floats_are_integers_as_in_json_schema(client: TestClient) -> None:
    assert error_of(post(client, chat(max_tokens=5.0, n=1.0)), 503)
    response = post(client, {"model": "m", "prompt": [1.0, 2]}, path="/v1/completions")
    assert error_of(response, 503)


def test_prompts_as_token_ids_within_the_context_pass(client: TestClient) -> None:
    response = post(client, {"model": "m", "prompt": list(range(99)), "max_tokens": 1},
                    path="/v1/completions")
    assert error_of(response, 503)


@pytest.mark.parametrize("body", [b"{not json", b"[1, 2]", b'"text"', b"null", b"",
                                  b'{"model": "m", "messages": [], "x": NaN}',
                                  b'{"model": "m", "temperature": 1e999, "messages": [{}]}',
                                  b"\xff\xfe", b"[" * 10000])
def test_malformed_json_is_400(client: TestClient, body: bytes) -> None:
    assert error_of(post(client, body), 400)["type"] == "invalid_request_error"


def test_body_over_the_limit_is_400_with_or_without_content_length(client: TestClient) -> None:
    big = chat(pad="x" * 5000)
    assert error_of(post(client, big), 400)["code"] == "body_too_large"

    def chunks() -> Iterator[bytes]:
        yield b'{"model": "m", "pad": "'
        for _ in range(10):
            yield b"x" * 1000
        yield b'"}'

    response = client.post("/v1/chat/completions", content=chunks(),
                           headers={**AUTH, "content-type": "application/json"})
    assert error_of(response, 400)["code"] == "body_too_large"


@pytest.mark.parametrize("headers, param", [
    ({"content-type": "application/x-www-form-urlencoded"}, "Content-Type"),
    ({"content-type": "text/plain"}, "Content-Type"),
    ({"x-request-id": "has spaces in it"}, "X-Request-Id"),
    ({"x-request-id": "x" * 129}, "X-Request-Id"),
    ({"x-session-id": "s" * 300}, "X-Session-Id"),
])
def test_bad_headers_are_400(client: TestClient, headers: dict, param: str) -> None:
    response = client.post("/v1/chat/completions", content=b'{"model": "m"}',
                           headers={**AUTH, **headers})
    assert error_of(response, 400)["param"] == param


def test_json_with_a_charset_and_vendor_json_types_are_fine(client: TestClient) -> None:
    for kind in ("application/json; charset=utf-8", "application/vnd.api+json"):
        response = post(client, b'{"model": "m", "messages": [{"role": "user"}]}',
                        **{"content-type": kind})
        assert response.status_code == 503, response.text


def test_a_key_from_the_file_may_use_only_its_models(client: TestClient) -> None:
    error = error_of(post(client, chat(model="other"), key=ALICE), 403)
    assert error["code"] == "model_not_allowed" and error["param"] == "model"
    assert error["type"] == "permission_error"
    # Also for a model nobody serves: the key learns nothing about what exists.
    assert error_of(post(client, chat(model="secret"), key=ALICE), 403)
    assert error_of(post(client, chat(model="nope")), 404)


def test_models_list_shows_only_a_keys_models(client: TestClient) -> None:
    def ids(key: str) -> list[str]:
        response = client.get("/v1/models", headers={"Authorization": f"Bearer {key}"})
        return [m["id"] for m in response.json()["data"]]

    assert ids(ALICE) == ["m"] and ids(OTHER) == ["other"] and ids(PLAIN) == ["m", "other"]
    assert client.get("/v1/models", headers={"Authorization": "Bearer bad"}).status_code == 401


def test_a_key_over_its_rpm_gets_429_with_retry_after(client: TestClient) -> None:
    for _ in range(2):
        assert post(client, CHAT, key=ALICE).status_code == 503  # admitted, no engine
    response = post(client, CHAT, key=ALICE)
    error = error_of(response, 429)
    assert error["type"] == "rate_limit_error" and error["code"] == "rate_limit_exceeded"
    assert 1 <= int(response.headers["retry-after"]) <= 60
    assert response.headers["x-request-id"]
    assert post(client, CHAT).status_code == 503  # the plain key has no limit


def test_invalid_requests_do_not_use_up_the_rpm(client: TestClient) -> None:
    for _ in range(5):
        assert post(client, chat(n=10), key=ALICE).status_code == 400
    assert post(client, CHAT, key=ALICE).status_code == 503


def test_unknown_key_is_401_before_the_body_is_looked_at(client: TestClient) -> None:
    error = error_of(post(client, b"{broken", key="sk-nobody"), 401)
    assert error["code"] == "invalid_api_key"


def test_an_unexpected_error_is_a_500_without_internals(client: TestClient,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    def explode(*_: object) -> None:
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr("gateway.validation.check_limits", explode)
    no_raise = TestClient(client.app, raise_server_exceptions=False)
    response = no_raise.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    error = error_of(response, 500)
    assert "secret" not in response.text and "Traceback" not in response.text
    assert error["type"] == "server_error"


def test_check_limits_without_a_known_context_checks_the_rest() -> None:
    limits = InputLimits(max_messages=2, max_n=1, max_tokens=10)
    long_prompt = ChatCompletionRequest.model_validate(
        {"model": "m", "messages": [{"role": "user", "content": "x" * 10**6}]})
    check_limits(long_prompt, limits, max_model_len=None)
    completion = parse(b'{"model": "m", "prompt": "hi", "max_tokens": 10}', CompletionRequest)
    assert isinstance(completion, CompletionRequest)
    check_limits(completion, limits, max_model_len=None)


def test_the_spec_describes_bodies_limits_and_bearer_auth(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    chat_op = spec["paths"]["/v1/chat/completions"]["post"]
    assert chat_op["security"] == [{"bearer": []}]
    assert spec["components"]["securitySchemes"]["bearer"]["scheme"] == "bearer"
    assert set(chat_op["responses"]["200"]["content"]) == {"application/json",
                                                           "text/event-stream"}
    assert {"400", "401", "403", "404", "429", "503"} <= set(chat_op["responses"])
    props = spec["components"]["schemas"]["ChatCompletionRequest"]["properties"]
    assert props["messages"]["maxItems"] == 3 and props["messages"]["minItems"] == 1
    assert props["n"]["anyOf"][0]["maximum"] == 2
    assert props["max_tokens"]["anyOf"][0] == {"type": "integer", "minimum": 1, "maximum": 50}
