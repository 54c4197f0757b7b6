"""The web UI's settings, turn registry, chat log and its place in `fleet up` and `fleet`."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from fleet import cli
from fleet.fleet_file import FleetFile, FleetModel
from fleet.launcher import UpSettings, plan
from webui.chat import Params, assistant, user
from webui.feedback import FeedbackLog
from webui.settings import WebUISettings
from webui.turns import Turns

ONE_MODEL = FleetFile(models=[FleetModel(source="/models/m")])


def test_settings_come_from_flags_over_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FLEET_WEBUI_GATEWAY_URL", "http://gw:9000/")
    monkeypatch.setenv("FLEET_WEBUI_API_KEY", "sk-from-env")
    monkeypatch.setenv("FLEET_WEBUI_PORT", "7000")
    settings = WebUISettings.from_cli(["--port", "7001", "--log-dir", "/tmp/x"])
    assert settings.port == 7001
    assert settings.gateway_url == "http://gw:9000"
    assert settings.api_base == "http://gw:9000/v1"
    assert settings.api_key is not None
    assert settings.api_key.get_secret_value() == "sk-from-env"
    assert "sk-from-env" not in repr(settings)
    assert settings.log_dir == Path("/tmp/x")


def test_defaults_and_an_explicit_v1() -> None:
    settings = WebUISettings.from_cli(["--gateway-url", "https://gw.example/v1"])
    assert (settings.host, settings.port) == ("127.0.0.1", 7860)
    assert settings.api_base == "https://gw.example/v1"
    assert settings.api_key is None


def test_a_gateway_url_without_scheme_is_refused() -> None:
    with pytest.raises(ValueError, match="http"):
        WebUISettings(gateway_url="gw:8000")


def test_one_turn_at_a_time_per_session_and_stop_reaches_it() -> None:
    async def scenario() -> None:
        turns = Turns()
        turn = turns.begin("s1")
        assert turn is not None
        assert turns.begin("s1") is None
        assert turns.begin("s2") is not None
        asyncio.get_running_loop().call_later(0.05, turns.end, "s1", turn)
        await turns.stop("s1", discard=True, wait=2)
        assert turn.stop.is_set() and turn.discard and turn.done.is_set()
        assert turns.begin("s1") is not None
        await turns.stop("nobody")  # nothing running: nothing to do

    asyncio.run(scenario())


def test_turns_and_feedback_are_appended_as_json_lines(tmp_path: Path) -> None:
    log = FeedbackLog(tmp_path / "log")
    conversation = [user("What is the capital of France?"), assistant("Paris.")]
    params = Params(temperature=0.0, top_p=1.0, max_tokens=64)

    async def scenario() -> None:
        await log.turn(conversation_id="c1", model="m", params=params, system_prompt="Be brief.",
                       conversation=conversation, outcome="complete")
        await log.feedback(conversation_id="c1", model="m", params=params, system_prompt="",
                           conversation=conversation, index=1, rating="like")

    asyncio.run(scenario())
    (path,) = (tmp_path / "log").glob("webui-*.jsonl")
    turn, feedback = (json.loads(line) for line in path.read_text().splitlines())
    assert turn["type"] == "turn" and turn["outcome"] == "complete"
    assert turn["parameters"] == {"temperature": 0.0, "top_p": 1.0, "max_tokens": 64}
    assert turn["conversation"] == conversation and turn["model"] == "m"
    assert isinstance(turn["time"], float)
    assert (feedback["type"], feedback["rating"], feedback["message_index"]) == \
        ("feedback", "like", 1)


def test_fleet_up_starts_the_web_ui_after_the_gateway_with_the_first_key() -> None:
    args = UpSettings.from_cli(
        ["--api-keys", "k1,k2", "--webui-port", "7999", "--host", "0.0.0.0"])
    services = plan(args, ONE_MODEL, "t" * 32)
    assert [s.name for s in services][-2:] == ["gateway", "webui"]
    webui = services[-1]
    assert webui.argv[1:3] == ["-m", "webui"]
    assert webui.argv[webui.argv.index("--port") + 1] == "7999"
    assert webui.argv[webui.argv.index("--gateway-url") + 1] == "http://127.0.0.1:8000"
    # The key is handed over in the environment, out of sight of `ps`.
    assert webui.env == {"FLEET_WEBUI_API_KEY": "k1"}
    assert "k1" not in " ".join(webui.argv)


def test_fleet_up_keeps_no_chat_log_unless_told_where() -> None:
    args = UpSettings.from_cli([])
    assert "--log-dir" not in plan(args, ONE_MODEL, "t" * 32)[-1].argv
    args = UpSettings.from_cli(["--webui-log-dir", "chat-log"])
    webui = plan(args, ONE_MODEL, "t" * 32)[-1]
    assert webui.argv[webui.argv.index("--log-dir") + 1] == str(Path("chat-log").resolve())


def test_fleet_up_without_the_web_ui() -> None:
    args = UpSettings.from_cli(["--no-webui"])
    assert "webui" not in [s.name for s in plan(args, ONE_MODEL, "t" * 32)]


def test_fleet_webui_is_a_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([]) == 2
    assert "webui" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        cli.main(["webui", "--help"])
    assert info.value.code == 0
    assert "--gateway-url" in capsys.readouterr().out


def test_the_page_never_carries_the_api_key() -> None:
    from webui.app import create_app

    demo = create_app(WebUISettings(api_key="sk-very-secret", log_dir=None))
    config = json.dumps(demo.get_config_file(), default=str)
    assert "sk-very-secret" not in config
    assert "http://127.0.0.1:8000" in config  # the config is the page's: the URL is shown
