"""Each service's command line is generated from its settings: every setting has a variable
and (secrets aside) a flag, `--help` shows defaults from the declaration, flags win over the
environment, and the worker and `fleet up` hand unknown flags to vLLM."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest

from controller.settings import ControllerSettings
from fleet.batch.cli import BatchSettings
from fleet.chat_cli import ChatSettings
from fleet.launcher import UpSettings
from fleetcore.settings_cli import CliSettings, settings_of
from gateway.app import build_table
from gateway.breaker import Breakers
from gateway.proxy import Proxy
from gateway.settings import GatewaySettings
from gateway.validation import InputLimits
from webui.settings import WebUISettings
from worker.settings import WorkerSettings
from worker.test_message import MessageSettings

SERVICES: list[type[CliSettings]] = [ControllerSettings, WorkerSettings, GatewaySettings,
                                     WebUISettings, UpSettings, MessageSettings, ChatSettings,
                                     BatchSettings]
SECRETS = {"FLEET_CLUSTER_TOKEN", "FLEET_READ_TOKEN", "FLEET_WORKER_ENGINE_API_KEY"}


@pytest.mark.parametrize("cls", SERVICES, ids=lambda c: c.cli_prog)
def test_every_setting_has_a_flag_and_a_variable_and_help_with_its_default(
        cls: type[CliSettings]) -> None:
    parser = cls.cli_parser()
    flags = {o for a in parser._actions for o in a.option_strings} - {"-h", "--help"}
    declared = settings_of(cls)
    assert flags == {s.flag for s in declared if s.flag is not None}
    assert {s.env for s in declared if s.flag is None} <= SECRETS
    help_ = " ".join(parser.format_help().split())
    for setting in declared:
        assert setting.env in help_ and setting.description
        if setting.flag is not None and setting.default != "required":
            assert f"default: {setting.default}; env {setting.env}" in help_


def test_secrets_are_never_flags(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--cluster-token", "x" * 32], ["--read-token", "x" * 32]):
        with pytest.raises(SystemExit):
            GatewaySettings.from_cli(argv)  # nor taken for an abbreviation of --*-token-file
    with pytest.raises(SystemExit):
        ControllerSettings.from_cli(["--cluster-token", "x" * 32])
    capsys.readouterr()


def test_a_flag_wins_over_its_variable_which_wins_over_the_default(
        monkeypatch: pytest.MonkeyPatch) -> None:
    assert GatewaySettings.from_cli([]).session_header == "X-Session-Id"
    monkeypatch.setenv("FLEET_GATEWAY_SESSION_HEADER", "X-From-Env")
    assert GatewaySettings.from_cli([]).session_header == "X-From-Env"
    flagged = GatewaySettings.from_cli(["--session-header", "X-From-Flag"])
    assert flagged.session_header == "X-From-Flag"


def test_flags_that_had_none_before(tmp_path: Path) -> None:
    gateway = GatewaySettings.from_cli([
        "--keys-reload-interval", "2", "--connect-timeout", "3", "--retry-backoff", "0.5",
        "--prompt-chars-per-token", "4", "--api-keys", "k1,k2", "--routing-overrides",
        "m=session"])
    assert (gateway.keys_reload_interval, gateway.connect_timeout, gateway.retry_backoff,
            gateway.prompt_chars_per_token) == (2, 3, 0.5, 4)
    assert gateway.api_keys == ["k1", "k2"] and gateway.routing_overrides == {"m": "session"}
    worker = WorkerSettings.from_cli(["--model", "m", "--restart-backoff-max", "5"])
    assert worker.restart_backoff_max == 5
    webui = WebUISettings.from_cli(["--temperature", "0.2", "--top-p", "0.9",
                                    "--max-retries", "2", "--connect-timeout", "1"])
    assert (webui.temperature, webui.top_p, webui.max_retries, webui.connect_timeout) == \
        (0.2, 0.9, 2, 1)


def test_worker_flags_repeat_exclude_and_pass_the_rest_to_vllm(
        capsys: pytest.CaptureFixture[str]) -> None:
    worker = WorkerSettings.from_cli(["--model", "m", "--model-name", "a", "--max-model-len",
                                      "2048", "--model-name", "b", "--enforce-eager"])
    assert worker.model_names == ["a", "b"]
    assert worker.engine_args == ["--max-model-len", "2048", "--enforce-eager"]
    # Not an abbreviation of --model-name: vLLM's own flag.
    assert WorkerSettings.from_cli(["--model", "m", "--model-n", "x"]).engine_args == \
        ["--model-n", "x"]
    with pytest.raises(SystemExit):
        WorkerSettings.from_cli(["--model", "m", "--gpus", "0", "--cpus", "0"])
    assert "not allowed with" in capsys.readouterr().err


def test_fleet_up_passes_engine_flags_whole() -> None:
    up = UpSettings.from_cli(["--gpus", "2", "--no-webui"])
    assert up.engine_args == ["--gpus", "2"] and up.gpus_per_worker == 1 and up.no_webui


def test_variables_with_a_shared_name_are_read(tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    token = tmp_path / "token"
    token.write_text("t" * 32)
    monkeypatch.setenv("FLEET_CLUSTER_TOKEN_FILE", str(token))
    settings = ControllerSettings.from_cli([])
    assert settings.cluster_token is not None
    assert settings.cluster_token.get_secret_value() == "t" * 32


def test_the_gateway_as_started_caps_in_flight_requests_at_its_declared_default() -> None:
    table = build_table(GatewaySettings())
    declared = GatewaySettings.model_fields["max_inflight_per_worker"].default
    assert table.limits.max_inflight_per_worker == declared == 512


def test_the_gateway_parts_defaults_are_the_settings_defaults() -> None:
    """The policies keep defaults of their own, for tests that build them bare; they must be the
    declared ones, or a part built without settings behaves unlike the gateway users start."""
    declared = {n: f.get_default(call_default_factory=True)
                for n, f in GatewaySettings.model_fields.items()}
    breakers, limits = Breakers(), InputLimits()
    assert (breakers.threshold, breakers.cooldown) == \
        (declared["breaker_threshold"], declared["breaker_cooldown"])
    assert limits == GatewaySettings().input_limits()
    retry_backoff = inspect.signature(Proxy).parameters["retry_backoff"].default
    assert retry_backoff == declared["retry_backoff"]
