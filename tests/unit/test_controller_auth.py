"""Who may call the controller: the cluster token writes and reads, the read token only reads,
everyone else gets 401 (or 403) with an OpenAI error body; /health and /metrics stay open."""

from __future__ import annotations

import logging
from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from controller.app import create_app
from controller.auth import Access, ClusterAuth
from controller.settings import ControllerSettings
from fleetcore.errors import AuthenticationError, PermissionDeniedError

TOKEN = "cluster-token-for-unit-tests-0001"
READ_TOKEN = "read-token-for-unit-tests-000001"
ENGINE_KEY = "sk-engine-key-nobody-may-see"
REG = {"worker_id": "w1", "engine_url": "http://127.0.0.1:9000", "model_names": ["m"],
       "engine_api_key": ENGINE_KEY}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
def client() -> Iterator[TestClient]:
    settings = ControllerSettings(heartbeat_interval=1, expiry=3, cluster_token=TOKEN,
                                  read_token=READ_TOKEN)
    with TestClient(create_app(settings)) as c:
        assert c.post("/workers/register", json=REG, headers=bearer(TOKEN)).status_code == 200
        yield c


WRITES = [
    ("POST", "/workers/register", REG),
    ("POST", "/workers/w1/heartbeat", {"state": "ready"}),
    ("DELETE", "/workers/w1", None),
]
READS = ["/workers", "/models", "/models/m/workers", "/snapshot"]
NO_OR_BAD_TOKEN = [
    ({}, "missing_cluster_token"),
    (bearer("not-the-cluster-token-at-all"), "invalid_cluster_token"),
    ({"Authorization": f"Basic {TOKEN}"}, "missing_cluster_token"),
    ({"Authorization": "Bearer"}, "missing_cluster_token"),
]


def assert_refused(response, status: int, code: str) -> None:  # type: ignore[no-untyped-def]
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert ENGINE_KEY not in response.text
    if status == 401:
        assert error["type"] == "authentication_error"
        assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize("method, path, body", WRITES)
@pytest.mark.parametrize("headers, code", NO_OR_BAD_TOKEN)
def test_a_write_without_the_cluster_token_is_401_and_changes_nothing(
    client: TestClient, method: str, path: str, body: dict | None, headers: dict, code: str
) -> None:
    response = client.request(method, path, json=body, headers=headers)
    assert_refused(response, 401, code)
    (worker,) = client.get("/workers", headers=bearer(TOKEN)).json()["workers"]
    assert worker["state"] == "starting"


@pytest.mark.parametrize("method, path, body", WRITES)
def test_the_read_token_cannot_write(client: TestClient, method: str, path: str,
                                     body: dict | None) -> None:
    response = client.request(method, path, json=body, headers=bearer(READ_TOKEN))
    assert_refused(response, 403, "read_only_token")
    assert response.json()["error"]["type"] == "permission_error"


@pytest.mark.parametrize("method, path, body", WRITES)
def test_the_cluster_token_writes(client: TestClient, method: str, path: str,
                                  body: dict | None) -> None:
    assert client.request(method, path, json=body, headers=bearer(TOKEN)).status_code == 200


@pytest.mark.parametrize("path", READS)
@pytest.mark.parametrize("headers, code", NO_OR_BAD_TOKEN)
def test_reading_the_registry_without_a_token_is_401(client: TestClient, path: str,
                                                     headers: dict, code: str) -> None:
    assert_refused(client.get(path, headers=headers), 401, code)


@pytest.mark.parametrize("token", [TOKEN, READ_TOKEN])
def test_either_token_reads_and_only_then_sees_the_engine_key(client: TestClient,
                                                               token: str) -> None:
    snapshot = client.get("/snapshot", headers=bearer(token))
    assert snapshot.status_code == 200
    assert snapshot.json()["workers"][0]["engine_api_key"] == ENGINE_KEY
    for path in READS:
        assert client.get(path, headers=bearer(token)).status_code == 200


def test_the_check_comes_before_the_body_is_read(client: TestClient) -> None:
    # Unauthenticated callers learn nothing from validation, and their body is never parsed.
    response = client.post("/workers/register", content=b"{not json" * 1000,
                           headers={"content-type": "application/json"})
    assert_refused(response, 401, "missing_cluster_token")


def test_unknown_routes_are_closed_too(client: TestClient) -> None:
    assert_refused(client.get("/workers/w1/secrets"), 401, "missing_cluster_token")
    assert client.get("/nope", headers=bearer(TOKEN)).status_code == 404


def test_health_metrics_and_docs_stay_open(client: TestClient) -> None:
    assert client.get("/health").json() == {"status": "ok"}
    metrics = client.get("/metrics")
    assert metrics.status_code == 200 and ENGINE_KEY not in metrics.text
    assert client.get("/openapi.json").status_code == 200


def test_the_openapi_spec_declares_the_token(client: TestClient) -> None:
    spec = client.get("/openapi.json").json()
    assert spec["components"]["securitySchemes"]["ClusterToken"]["scheme"] == "bearer"
    paths = spec["paths"]
    assert paths["/workers/register"]["post"]["security"] == [{"ClusterToken": []}]
    assert {"401", "403"} <= paths["/workers/register"]["post"]["responses"].keys()
    assert "401" in paths["/snapshot"]["get"]["responses"]
    assert "security" not in paths["/health"]["get"]


def test_refusals_are_logged_without_the_token(client: TestClient,
                                               caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="controller.auth"):
        client.get("/snapshot", headers=bearer("a-guess-that-is-long-enough"))
    assert "code=invalid_cluster_token" in caplog.text and "path=/snapshot" in caplog.text
    assert "a-guess-that-is-long-enough" not in caplog.text


def test_without_a_token_the_controller_is_open_and_says_so(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="controller.auth"):
        app = create_app(ControllerSettings(heartbeat_interval=1, expiry=3))
    assert "no cluster token" in caplog.text
    with TestClient(app) as c:
        assert c.post("/workers/register", json=REG).status_code == 200
        assert c.get("/snapshot").json()["workers"][0]["engine_api_key"] == ENGINE_KEY


def test_the_placeholder_token_is_accepted_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    with caplog.at_level(logging.WARNING, logger="controller.auth"):
        ClusterAuth("change-me-cluster-token")
    assert "placeholder" in caplog.text


def test_cluster_auth_on_its_own() -> None:
    auth = ClusterAuth(TOKEN, READ_TOKEN)
    auth.check(TOKEN, Access.WRITE)
    auth.check(READ_TOKEN, Access.READ)
    with pytest.raises(PermissionDeniedError):
        auth.check(READ_TOKEN, Access.WRITE)
    # A prefix, or the token with more after it, is a different token.
    for guess in (TOKEN[:-1], TOKEN + "x", "", None):
        with pytest.raises(AuthenticationError):
            auth.check(guess, Access.READ)
    with pytest.raises(ValueError, match="needs a cluster token"):
        ClusterAuth(None, READ_TOKEN)
    open_auth = ClusterAuth(None)
    assert not open_auth.enabled
    open_auth.check(None, Access.WRITE)
