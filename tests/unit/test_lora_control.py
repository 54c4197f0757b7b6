"""LoRA on the control plane: what workers read from their engine's arguments and report, and
the controller's adapter catalogue, which outlives a restart in its adapters file."""

from __future__ import annotations

from pathlib import Path

import pytest
from fastapi.testclient import TestClient

from controller.app import create_app
from controller.protocol import Heartbeat
from controller.settings import ControllerSettings
from worker.engine import build_engine_command
from worker.lora import LoraArgs, adapters_in, parse_lora_args

REG = {"worker_id": "w1", "engine_url": "http://127.0.0.1:9000", "model_names": ["m"]}
SPEC = {"name": "sql", "source": "/adapters/sql", "base_model": "m"}
BODY = {"source": "/adapters/sql", "base_model": "m"}


@pytest.mark.parametrize("args, expected", [
    ([], LoraArgs()),
    (["--max-loras", "4"], LoraArgs()),  # not enabled: no slots
    (["--enable-lora"], LoraArgs(slots=1)),
    (["--enable-lora", "--max-loras", "2", "--max-lora-rank", "8"], LoraArgs(slots=2)),
    (["--enable-lora", "--max-loras=3", "--lora-modules", "a=/x/a", "b=/x/b", "--foo"],
     LoraArgs(slots=3, static=["a", "b"])),
    (["--enable-lora", "--lora-modules", '{"name": "j", "path": "/x/j"}'],
     LoraArgs(slots=1, static=["j"])),
    (["--enable-lora", "--max-loras", "2", "--max-cpu-loras", "6"],
     LoraArgs(slots=6, batch_slots=2)),  # 6 held, 2 per engine step
])
def test_lora_settings_come_from_the_engine_arguments(args: list[str], expected: LoraArgs
                                                      ) -> None:
    assert parse_lora_args(args) == expected


def test_a_malformed_lora_module_is_refused() -> None:
    with pytest.raises(ValueError, match="name=path"):
        parse_lora_args(["--enable-lora", "--lora-modules", "/just/a/path"])


def test_adapters_are_the_engine_models_that_name_a_parent() -> None:
    models = {"data": [{"id": "m", "parent": None}, {"id": "b", "parent": "m"},
                       {"id": "a", "parent": "m"}]}
    assert adapters_in(models) == ["a", "b"]
    with pytest.raises(ValueError):
        adapters_in({"error": "x"})


def test_an_engine_with_lora_may_load_adapters_at_run_time() -> None:
    def env(args: list[str]) -> dict[str, str]:
        return build_engine_command(
            model_path="/m", served_names=["m"], host="127.0.0.1", port=1, api_key="k" * 16,
            gpus=None, cpus=None, cpu_kvcache_gib=1, extra_args=args, base_env={}).env
    assert env(["--enable-lora"])["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] == "True"
    assert "VLLM_ALLOW_RUNTIME_LORA_UPDATING" not in env([])


def test_a_heartbeat_without_adapters_leaves_them_as_they_were() -> None:
    assert Heartbeat.model_validate({"state": "ready"}).adapters is None


def _client(path: Path | None) -> TestClient:
    return TestClient(create_app(ControllerSettings(heartbeat_interval=1, expiry=3,
                                                    adapters_file=path)))


def test_heartbeats_change_what_a_worker_holds_and_the_snapshot_says_so() -> None:
    with _client(None) as client:
        client.post("/workers/register", json={**REG, "lora_slots": 2,
                                               "static_adapters": ["s"], "adapters": ["s"]})
        before = client.get("/snapshot").json()
        client.post("/workers/w1/heartbeat", json={"state": "ready", "adapters": ["s", "x"]})
        after = client.get("/snapshot").json()
        assert after["workers"][0]["adapters"] == ["s", "x"]
        assert after["workers"][0]["lora_slots"] == 2
        assert after["generation"] > before["generation"]
        # An old worker's heartbeat says nothing of adapters: they stay.
        client.post("/workers/w1/heartbeat", json={"state": "ready"})
        assert client.get("/snapshot").json()["workers"][0]["adapters"] == ["s", "x"]


def test_the_catalogue_survives_a_controller_restart(tmp_path: Path) -> None:
    path = tmp_path / "state" / "adapters.json"
    with _client(path) as client:
        assert client.put("/adapters/sql", json=BODY).json() == SPEC
        assert client.put("/adapters/chat", json=BODY).status_code == 200
        assert client.delete("/adapters/chat").status_code == 200
        assert client.get("/snapshot").json()["adapters"] == [SPEC]
    with _client(path) as client:
        assert client.get("/adapters").json() == {"adapters": [SPEC]}
        assert client.get("/snapshot").json()["adapters"] == [SPEC]


def test_bad_declarations_are_refused(tmp_path: Path) -> None:
    with _client(None) as client:
        client.post("/workers/register", json=REG)
        assert client.put("/adapters/sql", json=SPEC).status_code == 400  # no name in it
        taken = client.put("/adapters/m", json=BODY)
        assert taken.status_code == 409 and taken.json()["error"]["code"] == "name_taken"
        assert client.put("/adapters/sql", json={**BODY, "source": "two words"}
                          ).status_code == 400
        assert client.put("/adapters/two%20words", json=BODY).status_code == 400
        assert client.delete("/adapters/none").json()["error"]["code"] == "adapter_not_found"


def test_a_worker_without_lora_sends_what_older_controllers_accept() -> None:
    from controller.protocol import Registration

    body = Registration.model_validate(REG).model_dump(exclude_defaults=True)
    assert not {"lora_slots", "static_adapters", "adapters"} & set(body)
    # A worker whose engine runs as many adapters per step as it holds sends only lora_slots,
    # which the controllers that came with LoRA take.
    with_lora = Registration.model_validate({**REG, "lora_slots": 2}).model_dump(
        exclude_defaults=True)
    assert "lora_slots" in with_lora and "lora_batch_slots" not in with_lora
    beat = Heartbeat.model_validate({"state": "ready"}).model_dump(exclude_defaults=True)
    assert "adapters" not in beat
