"""The engine's door (worker/engine_auth.py): only GET and HEAD of /health and /metrics answer
without the engine's key; every other path, method and websocket gets 401 and the OpenAI error
body before the app sees it. The app here stands in for vLLM's; the real engine is checked from
another host in tests/integration/test_multihost.py and on `fleet up` in test_fleet_up.py."""

from __future__ import annotations

import importlib
from collections.abc import Iterator

import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route, WebSocketRoute
from starlette.testclient import TestClient, WebSocketDenialResponse
from starlette.websockets import WebSocket

from worker.engine import AUTH_MIDDLEWARE, build_engine_command
from worker.engine_auth import KEY_ENV, EngineKeyMiddleware

KEY = "engine-key-for-unit-tests-0001"
METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def _app(seen: list[str]) -> Starlette:
    async def anything(request: Request) -> PlainTextResponse:
        seen.append(f"{request.method} {request.url.path}")
        await request.body()
        return PlainTextResponse("served")

    async def socket(websocket: WebSocket) -> None:
        seen.append(f"WS {websocket.url.path}")
        await websocket.accept()
        await websocket.send_text("served")
        await websocket.close()

    app = Starlette(routes=[Route("/{path:path}", anything, methods=METHODS),
                            WebSocketRoute("/v1/realtime", socket)])
    # As vLLM adds a `--middleware` class: with the app alone; the key from the environment.
    app.add_middleware(EngineKeyMiddleware)
    return app


@pytest.fixture
def seen() -> list[str]:
    return []


@pytest.fixture
def client(monkeypatch: pytest.MonkeyPatch, seen: list[str]) -> Iterator[TestClient]:
    monkeypatch.setenv(KEY_ENV, KEY)
    with TestClient(_app(seen)) as c:
        yield c


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("path", ["/health", "/metrics"])
def test_health_and_metrics_answer_without_a_key(client: TestClient, seen: list[str],
                                                 method: str, path: str) -> None:
    assert client.request(method, path).status_code == 200
    assert seen == [f"{method} {path}"]


REFUSED_PATHS = [
    # Outside vLLM's guarded prefixes: what its own --api-key lets through.
    "/invocations", "/tokenize", "/pooling", "/pause", "/sleep", "/collective_rpc",
    "/update_weights", "/load", "/version", "/ping", "/server_info", "/openapi.json", "/docs",
    # Inside them, and near the open paths without being them.
    "/v1/chat/completions", "/v1/models", "/health/", "/healthz", "/metrics/x", "//health",
    "/a-path-a-later-vllm-adds",
]
NO_OR_BAD_KEY = [
    ({}, "missing_api_key"),
    (bearer("not-the-engine-key-at-all"), "invalid_api_key"),
    (bearer(KEY + "x"), "invalid_api_key"),
    ({"Authorization": f"Basic {KEY}"}, "invalid_authorization"),
    ({"Authorization": "Bearer"}, "invalid_authorization"),
    ({"Authorization": KEY}, "invalid_authorization"),
]


@pytest.mark.parametrize("path", REFUSED_PATHS)
@pytest.mark.parametrize(("headers", "code"), NO_OR_BAD_KEY)
def test_every_other_path_needs_the_key(client: TestClient, seen: list[str], path: str,
                                        headers: dict[str, str], code: str) -> None:
    reply = client.post(path, headers=headers, json={"model": "m", "prompt": "hi"})
    assert reply.status_code == 401
    assert reply.headers["www-authenticate"] == "Bearer"
    error = reply.json()["error"]
    assert error["type"] == "authentication_error" and error["code"] == code
    assert KEY not in reply.text
    assert seen == []  # refused before the app: the body was never read


@pytest.mark.parametrize("method", METHODS)
def test_every_method_needs_the_key_even_preflight(client: TestClient, seen: list[str],
                                                   method: str) -> None:
    # vLLM's own check lets OPTIONS through; a CORS preflight gets nothing here either.
    headers = {"Origin": "http://elsewhere", "Access-Control-Request-Method": "POST"}
    assert client.request(method, "/v1/completions", headers=headers).status_code == 401
    # Only GET and HEAD of the open paths are open.
    if method not in ("GET", "HEAD"):
        assert client.request(method, "/health").status_code == 401
    assert seen == []


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("path", ["/invocations", "/v1/chat/completions", "/health", "/pause"])
def test_the_key_opens_every_path_and_method(client: TestClient, seen: list[str], method: str,
                                            path: str) -> None:
    assert client.request(method, path, headers=bearer(KEY)).status_code == 200
    assert seen == [f"{method} {path}"]


def test_the_scheme_is_case_insensitive_as_in_vllms_check(client: TestClient) -> None:
    assert client.post("/invocations", headers={"Authorization": f"bearer {KEY}"}).is_success


def test_a_websocket_needs_the_key(client: TestClient, seen: list[str]) -> None:
    with pytest.raises(WebSocketDenialResponse) as denied, client.websocket_connect("/v1/realtime"):
        pass
    assert denied.value.status_code == 401
    assert denied.value.json()["error"]["code"] == "missing_api_key"
    with pytest.raises(WebSocketDenialResponse), client.websocket_connect(
            "/v1/realtime", headers=bearer("wrong-key-wrong-key")):
        pass
    assert seen == []
    with client.websocket_connect("/v1/realtime", headers=bearer(KEY)) as ws:
        assert ws.receive_text() == "served"
    assert seen == ["WS /v1/realtime"]


def test_without_a_key_in_the_environment_the_engine_does_not_start(
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(KEY_ENV, raising=False)
    with pytest.raises(RuntimeError, match=KEY_ENV), TestClient(_app([])):
        pass
    monkeypatch.setenv(KEY_ENV, "")
    with pytest.raises(RuntimeError, match=KEY_ENV):
        EngineKeyMiddleware(_app([]))


def test_refusals_are_logged_without_the_key(client: TestClient,
                                             caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("WARNING", logger="worker.engine_auth")
    client.post("/pause", headers=bearer("a-guess-at-the-engine-key"))
    (record,) = caplog.records
    assert "path=/pause" in record.getMessage() and "code=invalid_api_key" in record.getMessage()
    assert "a-guess" not in record.getMessage()


def test_the_worker_hands_the_door_to_vllm_last() -> None:
    cmd = build_engine_command(
        model_path="/m", served_names=["m"], host="0.0.0.0", port=9000, api_key=KEY, gpus=None,
        cpus=None, cpu_kvcache_gib=1, extra_args=["--middleware", "users.Own", "--seed", "1"],
        base_env={}, python="py")
    # vLLM adds middleware in the order given, the last outermost: ours sees every request
    # first, a user's own only those with the key.
    assert cmd.argv[-2:] == ["--middleware", AUTH_MIDDLEWARE]
    assert cmd.argv.index("users.Own") < len(cmd.argv) - 1
    assert cmd.env[KEY_ENV] == KEY
    # What vLLM does with the path: import the module, take the class.
    module, name = AUTH_MIDDLEWARE.rsplit(".", 1)
    assert getattr(importlib.import_module(module), name) is EngineKeyMiddleware
