"""Where the cluster token comes from, and who sends it: settings, token files, the worker's
controller client, and `fleet up`, which hands one token to every service it starts."""

from __future__ import annotations

import asyncio
import stat
from pathlib import Path

import httpx
import pytest
from pydantic import ValidationError

from controller.app import create_app
from controller.protocol import Heartbeat, Registration, WorkerState
from controller.settings import ControllerSettings
from fleet.fleet_file import FleetFile, FleetModel
from fleet.launcher import UpSettings, cluster_token, plan
from fleetcore.cluster_auth import ControllerCredentials, load_or_create_token_file
from gateway.settings import GatewaySettings
from worker.registration import ControllerClient, ControllerRefused
from worker.settings import WorkerSettings

ONE_MODEL = FleetFile(models=[FleetModel(source="/models/m")])

TOKEN = "cluster-token-for-unit-tests-0001"
READ_TOKEN = "read-token-for-unit-tests-000001"


def test_every_service_reads_the_same_unprefixed_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("FLEET_CLUSTER_TOKEN", TOKEN)
    for settings in (ControllerSettings(), WorkerSettings(model="m"), GatewaySettings()):
        assert settings.cluster_token is not None
        assert settings.cluster_token.get_secret_value() == TOKEN
        # A SecretStr: the token cannot leak into a repr or a log line.
        assert TOKEN not in repr(settings)


def test_the_token_file_flag(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(f"  {TOKEN}\n")
    settings = ControllerSettings.from_cli(["--cluster-token-file", str(path)])
    assert settings.cluster_token is not None
    assert settings.cluster_token.get_secret_value() == TOKEN


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    ("short", "shorter than 16"),
])
def test_unusable_token_files_are_refused(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "token"
    path.write_text(content)
    with pytest.raises(ValidationError, match=message):
        WorkerSettings(model="m", cluster_token_file=path)
    with pytest.raises(ValidationError, match="cannot read the token file"):
        WorkerSettings(model="m", cluster_token_file=tmp_path / "missing")


def test_a_token_in_both_places_is_refused(tmp_path: Path,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN)
    monkeypatch.setenv("FLEET_CLUSTER_TOKEN", TOKEN)
    with pytest.raises(ValidationError, match="not both"):
        GatewaySettings(cluster_token_file=path)


def test_an_empty_variable_means_no_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_CLUSTER_TOKEN", "")
    assert ControllerSettings().cluster_token is None


def test_a_read_token_alone_is_a_controller_setup_error() -> None:
    with pytest.raises(ValidationError, match="needs a cluster token"):
        ControllerSettings(read_token=READ_TOKEN)


def test_readers_prefer_the_read_token(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_CLUSTER_TOKEN", TOKEN)
    assert ControllerCredentials().controller_token() == TOKEN
    monkeypatch.setenv("FLEET_READ_TOKEN", READ_TOKEN)
    assert ControllerCredentials().controller_token() == READ_TOKEN
    assert GatewaySettings().controller_token() == READ_TOKEN


def test_a_token_file_is_created_once_readable_by_its_owner_only(tmp_path: Path) -> None:
    path = tmp_path / "state" / "cluster-token"
    token = load_or_create_token_file(path)
    assert len(token) >= 32
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_or_create_token_file(path) == token  # kept across runs
    assert path.read_text().strip() == token


# -- the worker's client, against the real controller app in-process ----------------------------

REG = Registration(worker_id="w1", engine_url="http://127.0.0.1:9000", model_names=["m"],
                   engine_api_key="sk-engine")


async def _talk(worker_token: str | None) -> tuple[ControllerClient, list[str]]:
    app = create_app(ControllerSettings(heartbeat_interval=1, expiry=3, cluster_token=TOKEN))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app)) as http:
        controller = ControllerClient("http://controller", http, token=worker_token)
        outcomes = []
        for call in (lambda: controller.register(REG),
                     lambda: controller.heartbeat("w1", Heartbeat(state=WorkerState.READY)),
                     lambda: controller.deregister("w1")):
            try:
                await call()
                outcomes.append("ok")
            except ControllerRefused as exc:
                outcomes.append(str(exc))
        return controller, outcomes


def test_a_worker_with_the_token_registers_heartbeats_and_leaves() -> None:
    _, outcomes = asyncio.run(_talk(TOKEN))
    assert outcomes == ["ok", "ok", "ok"]


@pytest.mark.parametrize("token", [None, "a-wrong-token-of-decent-length"])
def test_a_worker_without_the_token_is_told_what_to_set(token: str | None) -> None:
    controller, outcomes = asyncio.run(_talk(token))
    assert len(outcomes) == 3 and not controller.registered
    for outcome in outcomes:
        assert "refused this worker (401)" in outcome
        assert "FLEET_CLUSTER_TOKEN" in outcome


# -- fleet up -----------------------------------------------------------------------------------

def test_fleet_up_hands_the_token_over_in_the_environment_only() -> None:
    args = UpSettings.from_cli(["--cpu-workers", "1", "--cpus", "0"])
    services = plan(args, ONE_MODEL, TOKEN)
    names = [s.name for s in services]
    assert names == ["controller", "worker-0", "gateway", "webui"]
    for service in services:
        assert TOKEN not in " ".join(service.argv)
        expected = service.name != "webui"  # the web UI talks to the gateway only
        assert (service.env.get("FLEET_CLUSTER_TOKEN") == TOKEN) is expected


def test_fleet_up_uses_the_environment_token_or_makes_one(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "cluster-token"
    token, source = cluster_token(path)
    assert source == str(path) and path.read_text().strip() == token
    assert cluster_token(path) == (token, str(path))
    monkeypatch.setenv("FLEET_CLUSTER_TOKEN", TOKEN)
    assert cluster_token(None) == (TOKEN, "FLEET_CLUSTER_TOKEN")
    with pytest.raises(ValueError, match="not both"):
        cluster_token(path)


def test_fleet_up_with_tls_serves_https_everywhere(tmp_path: Path) -> None:
    args = UpSettings.from_cli([
        "--cpus", "0", "--ssl-certfile", "c.pem", "--ssl-keyfile", "k.pem",
        "--ssl-ca-file", str(tmp_path / "ca.pem")])
    services = plan(args, ONE_MODEL, TOKEN)
    for service in services:
        assert service.argv[service.argv.index("--ssl-certfile") + 1] == "c.pem"
        assert service.argv[service.argv.index("--ssl-keyfile") + 1] == "k.pem"
        assert service.env["FLEET_SSL_CA_FILE"] == str(tmp_path / "ca.pem")
    worker, gateway, webui = services[1], services[2], services[3]
    for client in (worker, gateway):
        address = client.argv[client.argv.index("--controller-address") + 1]
        assert address == "https://127.0.0.1:21001"
    assert webui.argv[webui.argv.index("--gateway-url") + 1] == "https://127.0.0.1:8000"
