"""The controller's HTTP API: validation, error bodies, the re-register signal."""

import pytest
from fastapi.testclient import TestClient

from controller.app import create_app
from controller.settings import ControllerSettings

REG = {"worker_id": "w1", "engine_url": "http://127.0.0.1:9000", "model_names": ["m"]}


@pytest.fixture
def client() -> TestClient:
    with TestClient(create_app(ControllerSettings(heartbeat_interval=1, expiry=3))) as c:
        yield c


def assert_openai_error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"]
    return error


def test_register_returns_the_heartbeat_contract(client: TestClient) -> None:
    response = client.post("/workers/register", json=REG)
    assert response.status_code == 200
    assert response.json() == {"worker_id": "w1", "heartbeat_interval": 1.0, "expiry": 3.0}
    assert client.get("/models").json()["models"] == ["m"]
    assert client.get("/models/m/workers").json()["workers"][0]["state"] == "starting"


def test_heartbeat_from_unknown_worker_asks_it_to_register(client: TestClient) -> None:
    response = client.post("/workers/nobody/heartbeat", json={"state": "ready"})
    error = assert_openai_error(response, 404)
    assert error["code"] == "unknown_worker"


@pytest.mark.parametrize(
    "body, param",
    [
        ({**REG, "engine_url": "not a url"}, "engine_url"),
        ({**REG, "model_names": []}, "model_names"),
        ({**REG, "worker_id": "bad id with spaces"}, "worker_id"),
        ({k: v for k, v in REG.items() if k != "model_names"}, "model_names"),
        ({**REG, "load": {"running": -1}}, "load.running"),
        ({**REG, "surprise": 1}, "surprise"),
    ],
)
def test_bad_registration_is_a_clear_400(client: TestClient, body: dict, param: str) -> None:
    error = assert_openai_error(client.post("/workers/register", json=body), 400)
    assert error["param"] == param
    assert error["type"] == "invalid_request_error"


def test_bad_heartbeat_state_is_400(client: TestClient) -> None:
    client.post("/workers/register", json=REG)
    error = assert_openai_error(
        client.post("/workers/w1/heartbeat", json={"state": "sleepy"}), 400
    )
    assert error["param"] == "state"


def test_not_json_is_400(client: TestClient) -> None:
    response = client.post("/workers/register", content=b"{nope",
                           headers={"content-type": "application/json"})
    assert_openai_error(response, 400)


def test_unknown_route_and_model_are_404(client: TestClient) -> None:
    assert_openai_error(client.get("/nope"), 404)
    assert assert_openai_error(client.get("/models/ghost/workers"), 404)["code"] == \
        "model_not_found"


def test_deregister_then_snapshot_remembers_the_model(client: TestClient) -> None:
    client.post("/workers/register", json=REG)
    assert client.delete("/workers/w1").status_code == 200
    assert_openai_error(client.delete("/workers/w1"), 404)
    snap = client.get("/snapshot").json()
    assert snap["workers"] == [] and snap["models"] == ["m"]


def test_metrics_count_workers_by_state(client: TestClient) -> None:
    client.post("/workers/register", json=REG)
    client.post("/workers/w1/heartbeat", json={"state": "ready"})
    text = client.get("/metrics").text
    assert 'fleet_controller_workers{model="m",state="ready"} 1.0' in text


def test_the_chat_template_is_recorded_and_optional_for_older_workers(client: TestClient) -> None:
    client.post("/workers/register", json=REG)
    client.post("/workers/register", json={**REG, "worker_id": "w2", "chat_template": "chatml"})
    templates = {w["worker_id"]: w["chat_template"] for w in client.get("/workers").json()[
        "workers"]}
    assert templates == {"w1": None, "w2": "chatml"}


def test_the_table_by_changes_follows_the_registry_like_the_snapshot(client: TestClient) -> None:
    """A gateway that applies /table's changes ends with /snapshot's table."""
    from controller.protocol import Snapshot, TableChanges
    from gateway.controller_sync import ControllerSync
    from gateway.routing_table import RoutingTable

    sync = ControllerSync(RoutingTable(), None, ["http://c"], interval=1.0)  # type: ignore[arg-type]
    for n in range(3):
        client.post("/workers/register", json={**REG, "worker_id": f"w{n}", "state": "ready"})
    first = TableChanges.model_validate(client.get("/table").json())
    sync.apply("http://c", first)
    client.post("/workers/w0/heartbeat", json={"state": "ready", "load": {"running": 7}})
    client.post("/workers/w1/heartbeat", json={"state": "draining"})
    client.delete("/workers/w2")
    changes = TableChanges.model_validate(client.get(
        "/table", params={"since": first.revision, "epoch": first.epoch}).json())
    assert not changes.full and changes.loads == {"w0": (7, 0, 0.0)}
    mine = sync.apply("http://c", changes)
    truth = Snapshot.model_validate(client.get("/snapshot").json())
    assert [(w.worker_id, w.state, w.load) for w in mine.workers] == \
        [(w.worker_id, w.state, w.load) for w in truth.workers]
    assert client.get("/table", params={"since": -1}).status_code == 400


def test_what_a_worker_learned_reaches_the_gateway_and_survives_load_changes(
        client: TestClient) -> None:
    """The compact loads carry only the counts: a gateway applying them once lost the learned
    speeds and the busy adapters (placement then ran on defaults). A learned figure that moves
    ships the record; the counts alone keep what the gateway had."""
    from controller.protocol import TableChanges
    from gateway.controller_sync import ControllerSync
    from gateway.routing_table import RoutingTable

    sync = ControllerSync(RoutingTable(), None, ["http://c"], interval=1.0)  # type: ignore[arg-type]
    client.post("/workers/register", json={**REG, "state": "ready"})
    first = TableChanges.model_validate(client.get("/table").json())
    sync.apply("http://c", first)
    learned = {"prefill_tokens_per_s": 9000.0, "prefill_tokens_per_request": 300.0,
               "busy_adapters": ["sql"]}

    def beat(revision: int, **load: object) -> tuple[TableChanges, int]:
        client.post("/workers/w1/heartbeat", json={"state": "ready", "load": load})
        changes = TableChanges.model_validate(client.get(
            "/table", params={"since": revision, "epoch": first.epoch}).json())
        return changes, changes.revision

    changes, rev = beat(first.revision, running=1, **learned)
    assert [w.worker_id for w in changes.workers] == ["w1"]  # learned: the whole record
    table = sync.apply("http://c", changes)
    changes, rev = beat(rev, running=5, **{**learned, "prefill_tokens_per_s": 9600.0})
    assert changes.workers == [] and changes.loads == {"w1": (5, 0, 0.0)}  # moved 7 %
    load = sync.apply("http://c", changes).workers[0].load
    assert (load.running, load.prefill_tokens_per_s, load.prefill_tokens_per_request,
            load.busy_adapters) == (5, 9000.0, 300.0, ["sql"])
    changes, rev = beat(rev, running=5, **{**learned, "busy_adapters": []})
    load = sync.apply("http://c", changes).workers[0].load
    assert [w.worker_id for w in changes.workers] == ["w1"] and load.busy_adapters == []
    assert table.workers[0].load.prefill_tokens_per_request == 300.0
