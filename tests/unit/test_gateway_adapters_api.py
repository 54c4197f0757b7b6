"""The gateway's LoRA answers without an engine: who may declare adapters, and how /v1/models
lists them (with their base model as `parent`)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from fastapi.testclient import TestClient

from controller.protocol import AdapterSpec, Snapshot, WorkerRecord, WorkerState
from gateway.app import create_app
from gateway.settings import GatewaySettings

KEY, ADMIN = "sk-test", "sk-admin"
LOAD = {"lora_name": "sql", "lora_path": "/adapters/sql"}


def _worker(wid: str, **extra: object) -> WorkerRecord:
    return WorkerRecord(worker_id=wid, engine_url="http://127.0.0.1:9", model_names=["m"],
                        state=WorkerState.READY, registered_at=0, last_heartbeat=0,
                        **extra)


@pytest.fixture
def client() -> Iterator[TestClient]:
    settings = GatewaySettings(api_keys=[KEY], admin_api_keys=[ADMIN],
                               controller_address="http://127.0.0.1:9", sync_interval=60)
    app = create_app(settings)
    with TestClient(app) as c:
        app.state.table.update(Snapshot(
            generation=1, heartbeat_interval=2, expiry=6, models=["m"],
            workers=[_worker("w0", lora_slots=2, static_adapters=["static"],
                             adapters=["static", "held"])],
            adapters=[AdapterSpec(name="held", source="/a/held", base_model="m"),
                      AdapterSpec(name="cold", source="org/cold", base_model="m")],
        ))
        yield c


def test_declaring_an_adapter_takes_an_admin_key(client: TestClient) -> None:
    assert client.post("/v1/load_lora_adapter", json=LOAD).status_code == 401
    refused = client.post("/v1/load_lora_adapter", json=LOAD,
                          headers={"Authorization": f"Bearer {KEY}"})
    assert refused.status_code == 403
    assert refused.json()["error"]["code"] == "admin_required"
    refused = client.post("/v1/unload_lora_adapter", json={"lora_name": "held"},
                          headers={"Authorization": f"Bearer {KEY}"})
    assert refused.status_code == 403


def test_with_no_controller_to_keep_it_a_declaration_fails_loudly(client: TestClient) -> None:
    answer = client.post("/v1/load_lora_adapter", json=LOAD,
                         headers={"Authorization": f"Bearer {ADMIN}"})
    assert answer.status_code == 502, answer.text
    models = client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()
    assert "sql" not in {card["id"] for card in models["data"]}


def test_bad_declarations_are_400_or_404(client: TestClient) -> None:
    admin = {"Authorization": f"Bearer {ADMIN}"}
    assert client.post("/v1/load_lora_adapter", json={**LOAD, "lora_name": "m"},
                       headers=admin).json()["error"]["code"] == "name_taken"
    assert client.post("/v1/load_lora_adapter", json={**LOAD, "base_model_name": "nope"},
                       headers=admin).status_code == 404
    assert client.post("/v1/load_lora_adapter", json={"lora_name": "x"},
                       headers=admin).status_code == 400
    assert client.post("/v1/unload_lora_adapter", json={"lora_name": "never"},
                       headers=admin).json()["error"]["code"] == "adapter_not_found"


def test_models_lists_declared_and_held_adapters_with_their_parent(client: TestClient) -> None:
    cards = {card["id"]: card for card in client.get(
        "/v1/models", headers={"Authorization": f"Bearer {KEY}"}).json()["data"]}
    assert set(cards) == {"m", "held", "cold", "static"}
    assert cards["m"]["parent"] is None
    assert {cards[a]["parent"] for a in ("held", "cold", "static")} == {"m"}
    assert cards["cold"]["root"] == "org/cold"
    assert "/v1/chat/completions" in cards["held"]["endpoints"]
