"""The gateway's own answers: keys, request validation and OpenAI error bodies.

No engine is involved: every request here is refused before routing, or routed to nothing.
"""

import contextlib
import socket
import threading
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from controller.protocol import Snapshot, WorkerRecord, WorkerState
from gateway.app import create_app
from gateway.keys import KeyEntry, append_key, hash_key
from gateway.routing_table import RoutingTable
from gateway.settings import GatewaySettings

KEY = "sk-test"
AUTH = {"Authorization": f"Bearer {KEY}"}
CHAT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}


@pytest.fixture
def client() -> TestClient:
    # A controller address where nothing listens: the table is filled by hand below.
    settings = GatewaySettings(api_keys=[KEY], controller_address="http://127.0.0.1:9",
                               sync_interval=60)
    app = create_app(settings)
    with TestClient(app) as c:
        app.state.table.update(Snapshot(
            generation=1, heartbeat_interval=2, expiry=6, models=["m"],
            workers=[WorkerRecord(worker_id="w", engine_url="http://127.0.0.1:9",
                                  model_names=["m"], state=WorkerState.STARTING,
                                  registered_at=0, last_heartbeat=0)],
        ))
        yield c


def error_of(response, status: int) -> dict:
    assert response.status_code == status, response.text
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("headers, code", [
    ({}, "missing_api_key"),
    ({"Authorization": "Bearer wrong"}, "invalid_api_key"),
    ({"Authorization": f"Basic {KEY}"}, "invalid_authorization"),
])
def test_bad_key_is_401(client: TestClient, headers: dict, code: str) -> None:
    error = error_of(client.post("/v1/chat/completions", json=CHAT, headers=headers), 401)
    assert error["code"] == code and error["type"] == "authentication_error"
    error_of(client.get("/v1/models", headers=headers), 401)


@pytest.mark.parametrize("body, param", [
    (b"{not json", None),
    (b"[1, 2]", None),
    (b"", None),
    (b'{"messages": [{"role": "user", "content": "x"}]}', "model"),
    (b'{"model": "m"}', "messages"),
    (b'{"model": "m", "messages": []}', "messages"),
    (b'{"model": "m", "messages": [{"content": "x"}]}', "messages.0.role"),
    (b'{"model": "m", "messages": [{"role": "user"}], "max_tokens": 0}', "max_tokens"),
    (b'{"model": "m", "messages": [{"role": "user"}], "stream": "yes please"}', "stream"),
])
def test_malformed_chat_body_is_400_naming_the_field(
    client: TestClient, body: bytes, param: str | None
) -> None:
    response = client.post("/v1/chat/completions", content=body,
                           headers={**AUTH, "content-type": "application/json"})
    error = error_of(response, 400)
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param


def test_completion_needs_a_prompt(client: TestClient) -> None:
    error = error_of(client.post("/v1/completions", json={"model": "m"}, headers=AUTH), 400)
    assert error["param"] == "prompt"


def test_unknown_model_is_404(client: TestClient) -> None:
    error = error_of(client.post("/v1/chat/completions", json={**CHAT, "model": "nope"},
                                 headers=AUTH), 404)
    assert error["code"] == "model_not_found" and "nope" in error["message"]


def test_model_without_ready_worker_is_503(client: TestClient) -> None:
    response = client.post("/v1/chat/completions", json=CHAT, headers=AUTH)
    error = error_of(response, 503)
    assert error["code"] == "no_worker_available"
    assert response.headers["retry-after"]


def test_models_list_shows_only_servable_models(client: TestClient) -> None:
    assert client.get("/v1/models", headers=AUTH).json() == {"object": "list", "data": []}


def test_health_says_when_the_controller_was_never_reached() -> None:
    settings = GatewaySettings(controller_address="http://127.0.0.1:9", sync_interval=60)
    with TestClient(create_app(settings)) as fresh:
        body = fresh.get("/health").json()
    assert body["controller"] == "never-synced" and body["workers"] == 0


def test_health_counts_the_workers_of_the_table(client: TestClient) -> None:
    body = client.get("/health", headers=AUTH).json()
    assert body["workers"] == 1 and body["routable_workers"] == 0 and body["models"] == []
    table = client.app.state.table  # type: ignore[attr-defined]
    ready = table.snapshot.workers[0].model_copy(update={"state": WorkerState.READY})
    table.update(table.snapshot.model_copy(update={"generation": 2, "workers": [ready]}))
    body = client.get("/health", headers=AUTH).json()
    assert body["workers"] == 1 and body["routable_workers"] == 1 and body["models"] == ["m"]


@pytest.mark.parametrize("headers", [{}, {"Authorization": "Bearer wrong"},
                                     {"Authorization": f"Basic {KEY}"}])
def test_health_without_a_valid_key_says_only_ok(client: TestClient, headers: dict) -> None:
    """A probe or a stranger learns that the gateway serves, nothing about models or workers."""
    response = client.get("/health", headers=headers)
    assert response.status_code == 200 and response.json() == {"status": "ok"}


def _two_model_table(table: RoutingTable) -> None:
    table.update(Snapshot(generation=1, heartbeat_interval=2, expiry=6, models=["m", "secret"],
                          workers=[WorkerRecord(worker_id=wid, engine_url="http://127.0.0.1:9",
                                                model_names=[model], state=WorkerState.READY,
                                                registered_at=0, last_heartbeat=0)
                                   for wid, model in (("w1", "m"), ("w2", "secret"),
                                                      ("w3", "secret"))]))


def test_health_with_a_key_counts_only_that_keys_models(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    append_key(keys, hash_key("sk-only-m"), KeyEntry(name="only-m", models=["m"]))
    settings = GatewaySettings(keys_file=keys, api_keys=[KEY],
                               controller_address="http://127.0.0.1:9", sync_interval=60)
    app = create_app(settings)
    with TestClient(app) as c:
        _two_model_table(app.state.table)
        limited = c.get("/health", headers={"Authorization": "Bearer sk-only-m"}).json()
        full = c.get("/health", headers=AUTH).json()
        stranger = c.get("/health").json()
    assert limited["models"] == ["m"] and limited["workers"] == limited["routable_workers"] == 1
    assert full["models"] == ["m", "secret"] and full["routable_workers"] == 3
    assert stranger == {"status": "ok"}


def test_health_without_keys_configured_shows_the_whole_table() -> None:
    settings = GatewaySettings(controller_address="http://127.0.0.1:9", sync_interval=60)
    app = create_app(settings)
    with TestClient(app) as c:
        _two_model_table(app.state.table)
        body = c.get("/health").json()
    assert body["models"] == ["m", "secret"] and body["workers"] == 3


def test_unknown_route_is_openai_shaped_404(client: TestClient) -> None:
    error_of(client.get("/v1/nothing-here", headers=AUTH), 404)


def test_a_bug_on_the_generation_path_is_a_logged_openai_shaped_500(
        client: TestClient, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    def broken(*_: object) -> None:
        raise RuntimeError("bug")

    monkeypatch.setattr("gateway.validation.check_limits", broken)
    error = error_of(client.post("/v1/chat/completions", json=CHAT, headers=AUTH), 500)
    assert "bug" not in error["message"]  # details go to the log, not to the client
    assert any(r.exc_info and r.exc_info[0] is RuntimeError for r in caplog.records)


def test_an_engine_that_breaks_off_its_status_line_is_a_502_not_sent_again(
        client: TestClient) -> None:
    """An engine that took the request and answered half a status line: it may have run it."""
    accepted = []

    with socket.create_server(("127.0.0.1", 0)) as server:
        def engine() -> None:
            server.settimeout(10)
            with contextlib.suppress(OSError):
                while True:
                    conn, _ = server.accept()
                    accepted.append(conn)
                    conn.recv(65536)
                    conn.sendall(b"HTTP/1.1 2")
                    conn.close()

        threading.Thread(target=engine, daemon=True).start()
        table = client.app.state.table  # type: ignore[attr-defined]
        port = server.getsockname()[1]
        worker = table.snapshot.workers[0].model_copy(
            update={"state": WorkerState.READY, "engine_url": f"http://127.0.0.1:{port}"})
        table.update(table.snapshot.model_copy(update={"generation": 2, "workers": [worker]}))
        error = error_of(client.post("/v1/chat/completions", json=CHAT, headers=AUTH), 502)
    assert "broke off its answer" in error["message"]
    assert len(accepted) == 1


def test_served_as_the_gateway_serves_itself_the_routes_answer_alike() -> None:
    """`python -m gateway` puts the generation routes ahead of the proxy-headers middleware
    and FastAPI's call (gateway/__main__.py); both ways in answer the same."""
    from uvicorn.middleware.proxy_headers import ProxyHeadersMiddleware

    from gateway.asgi import GenerateRoutes

    settings = GatewaySettings(api_keys=[KEY], controller_address="http://127.0.0.1:9",
                               sync_interval=60)
    app = create_app(settings)
    front = GenerateRoutes.ahead_of(app, ProxyHeadersMiddleware(app))  # type: ignore[arg-type]
    with TestClient(app) as inner, TestClient(front) as outer:
        for c in (inner, outer):
            assert c.get("/health").json() == {"status": "ok"}  # FastAPI's route, no key
            missing = c.post("/v1/chat/completions", json=CHAT)
            assert missing.status_code == 401, missing.text
            assert missing.json()["error"]["code"] == "missing_api_key"
            # The key's header found however it is spelt, as Starlette finds it.
            unknown = c.post("/v1/chat/completions", json=CHAT,
                             headers={"AUTHORIZATION": f"Bearer {KEY}"})
            assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "model"
            wrong_type = c.post("/v1/chat/completions", content=b"{}",
                                headers={**AUTH, "Content-Type": "text/plain"})
            assert wrong_type.json()["error"]["param"] == "Content-Type"
