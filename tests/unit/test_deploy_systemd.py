"""deploy/systemd: the units verify and keep their hardening and drain times.

`systemd-analyze verify` reads unit files without a running systemd.
"""

from __future__ import annotations

import inspect
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from controller.settings import ControllerSettings
from gateway.settings import GatewaySettings
from tests.unit.deploy_flags import flags as _flags
from worker.engine import EngineProcess
from worker.settings import WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
SYSTEMD = ROOT / "deploy" / "systemd"
# How long the worker gives its engine to exit after the drain, before SIGKILL.
ENGINE_STOP_TIMEOUT = inspect.signature(EngineProcess.stop).parameters["timeout"].default


# -- systemd ------------------------------------------------------------------------------------
UNITS = ["fleet-controller.service", "fleet-gateway.service", "fleet-webui.service",
         "fleet-worker@.service"]
FLEET_BIN = "/opt/llm-fleet/.venv/bin/fleet"
ENV_FILE = "/etc/llm-fleet/fleet.env"

Unit = dict[str, dict[str, list[str]]]


def _parse_unit(path: Path) -> Unit:
    """Sections of key -> every value, in order (systemd allows repeated keys)."""
    unit: Unit = {}
    section: dict[str, list[str]] | None = None
    pending = ""
    for raw in path.read_text().splitlines():
        line = pending + raw.strip()
        pending = ""
        if line.endswith("\\"):
            pending = line[:-1] + " "
            continue
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], {})
            continue
        assert section is not None, f"{path.name}: {line!r} outside a section"
        key, value = line.split("=", 1)
        section.setdefault(key.strip(), []).append(value.strip())
    return unit


def _service(name: str) -> dict[str, list[str]]:
    return _parse_unit(SYSTEMD / name)["Service"]


def _last(service: dict[str, list[str]], key: str) -> str:
    return service[key][-1]


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(s|sec|min|m)?", value)
    assert match, value
    number = float(match[1])
    return number * 60 if match[2] in ("min", "m") else number


def _env_file(path: Path) -> dict[str, str]:
    env = {}
    for line in path.read_text().splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            key, value = line.split("=", 1)
            env[key] = value
    return env


@pytest.mark.parametrize("name", UNITS)
def test_unit_restarts_on_failure_and_is_hardened(name: str) -> None:
    service = _service(name)
    assert _last(service, "Restart") == "on-failure"
    assert _seconds(_last(service, "RestartSec")) > 0
    assert _last(service, "User") == "fleet"
    assert _last(service, "NoNewPrivileges") == "yes"
    assert _last(service, "ProtectSystem") == "strict"
    assert _last(service, "ProtectHome") == "yes"
    assert _last(service, "PrivateTmp") == "yes"
    assert ENV_FILE in service["EnvironmentFile"]
    command = _last(service, "ExecStart").split()
    service_name = re.match(r"fleet-(\w+)", name)
    assert service_name and command[:2] == [FLEET_BIN, service_name[1]]


def test_worker_unit_runs_on_the_gpu_named_by_its_instance() -> None:
    service = _service("fleet-worker@.service")
    flags = _flags(_last(service, "ExecStart").split()[2:])
    # In the environment, not a flag (which would win over it): the instance's own file may
    # give it more GPUs (tensor parallel).
    assert _worker_instance_env(3)["FLEET_WORKER_GPUS"] == "3"
    assert "--gpus" not in flags
    assert "PrivateDevices" not in service  # it would hide /dev/nvidia*
    assert "/etc/llm-fleet/worker-%i.env" in [f.lstrip("-") for f in service["EnvironmentFile"]]


def test_worker_unit_stops_by_draining() -> None:
    service = _service("fleet-worker@.service")
    flags = _flags(_last(service, "ExecStart").split()[2:])
    assert _last(service, "KillSignal") == "SIGTERM"
    # SIGTERM to the worker alone: the default (control-group) would stop the engine at once
    # and cut the requests the drain is meant to finish.
    assert _last(service, "KillMode") == "mixed"
    drain = float(flags["--drain-timeout"])
    assert _seconds(_last(service, "TimeoutStopSec")) > drain + ENGINE_STOP_TIMEOUT


def _worker_instance_env(index: int) -> dict[str, str]:
    service = _service("fleet-worker@.service")
    env = dict(v.split("=", 1) for v in service["Environment"])
    return {k: v.replace("%i", str(index)).replace("%H", "host") for k, v in env.items()}


def test_worker_ports_and_ids_follow_from_the_gpu_index() -> None:
    seen: set[int] = set()
    for index in range(10):
        env = _worker_instance_env(index)
        settings = WorkerSettings(
            model="m",
            port=int(env["FLEET_WORKER_PORT"]),
            engine_port=int(env["FLEET_WORKER_ENGINE_PORT"]),
            worker_id=env["FLEET_WORKER_WORKER_ID"],
        )
        ports = {settings.port, settings.engine_port}
        assert len(ports) == 2 and not ports & seen
        assert not ports & {21001, 8000, 7860}
        assert settings.worker_id == f"host-gpu{index}"
        seen |= ports


def test_env_example_sets_only_settings_that_exist() -> None:
    from webui.settings import WebUISettings

    fields = {
        "FLEET_CONTROLLER_": ControllerSettings.model_fields,
        "FLEET_WORKER_": WorkerSettings.model_fields,
        "FLEET_GATEWAY_": GatewaySettings.model_fields,
        "FLEET_WEBUI_": WebUISettings.model_fields,
    }
    env = _env_file(SYSTEMD / "fleet.env.example")
    for key in env:
        prefix = next((p for p in fields if key.startswith(p)), None)
        if prefix is not None:
            assert key[len(prefix):].lower() in fields[prefix], f"{key} is no setting"
    # Per-worker values would give every worker the same port or id.
    assert not {"FLEET_WORKER_PORT", "FLEET_WORKER_ENGINE_PORT", "FLEET_WORKER_WORKER_ID",
                "FLEET_WORKER_GPUS"} & env.keys()
    assert "FLEET_CLUSTER_TOKEN" in env


def _setting_variables() -> set[str]:
    """Every FLEET_* variable a service reads: its prefix and field, or the field's alias (the
    shared ones: FLEET_CLUSTER_TOKEN, FLEET_SSL_CA_FILE, ...)."""
    from webui.settings import WebUISettings

    names = set()
    for settings in (ControllerSettings, WorkerSettings, GatewaySettings, WebUISettings):
        prefix = settings.model_config.get("env_prefix", "")
        for name, info in settings.model_fields.items():
            alias = info.validation_alias
            names.add(alias if isinstance(alias, str) else f"{prefix}{name}".upper())
    return names


def test_the_env_file_names_only_real_settings_commented_out_or_not() -> None:
    known = _setting_variables() | {"FLEET_MODELS_DIR", "FLEET_EXTRA_WORKER_ARGS"}
    assigned = re.findall(r"^#?\s*(FLEET_[A-Z0-9_]+)=", (SYSTEMD / "fleet.env.example").read_text(),
                          flags=re.MULTILINE)
    assert {"FLEET_CLUSTER_TOKEN", "FLEET_READ_TOKEN", "FLEET_SSL_CA_FILE"} <= set(assigned)
    assert not set(assigned) - known


def test_model_cache_is_writable_by_the_worker_unit() -> None:
    writable = [Path(p.lstrip("-")) for v in _service("fleet-worker@.service")["ReadWritePaths"]
                for p in v.split()]
    env = _env_file(SYSTEMD / "fleet.env.example")
    for key in ("FLEET_MODELS_DIR", "FLEET_WORKER_DOWNLOAD_DIR", "HF_HOME"):
        path = Path(env[key])
        assert any(path.is_relative_to(w) for w in writable), f"{key}={path} is read-only"


def test_units_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze = shutil.which("systemd-analyze")
    if analyze is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart's binary exists; this machine has no /opt/llm-fleet, so the
    # copies point at an executable that does. Everything else is verified as written.
    fleet = Path(sys.executable).with_name("fleet")
    stand_in = str(fleet) if fleet.exists() else shutil.which("true")
    assert stand_in
    for name in UNITS:
        text = (SYSTEMD / name).read_text()
        assert FLEET_BIN in text
        (tmp_path / name).write_text(text.replace(FLEET_BIN, stand_in))
    # A template is verified through an instance of it.
    targets = [str(tmp_path / n.replace("@.", "@0.")) for n in UNITS]
    result = subprocess.run([analyze, "verify", "--man=no", *targets],
                            capture_output=True, text=True, timeout=60)
    ours = [line for line in (result.stdout + result.stderr).splitlines()
            if str(tmp_path) in line or any(n.split("@")[0] in line for n in UNITS)]
    assert result.returncode == 0 and not ours, result.stdout + result.stderr


# -- several models on a host: one environment file per worker instance -------------------------
INSTANCE_FILES = sorted(SYSTEMD.glob("worker-*.env.example"))


def _instance_settings(index: int, monkeypatch: pytest.MonkeyPatch) -> WorkerSettings:
    """fleet-worker@N's settings as systemd hands them over: the unit's Environment=, then
    fleet.env, then worker-N.env (later wins), and ExecStart's flags."""
    env = {**_worker_instance_env(index), **_env_file(SYSTEMD / "fleet.env.example"),
           **_env_file(SYSTEMD / f"worker-{index}.env.example")}
    for key in [k for k in os.environ if k.startswith("FLEET_")]:
        monkeypatch.delenv(key)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    argv = _last(_service("fleet-worker@.service"), "ExecStart").split()[2:]
    argv = [a for a in argv if a != "$FLEET_EXTRA_WORKER_ARGS"]
    return WorkerSettings.from_cli([*argv, *env.get("FLEET_EXTRA_WORKER_ARGS", "").split()])


def test_the_example_fleet_has_one_file_per_worker_instance_per_model(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    indices = [int(re.fullmatch(r"worker-(\d+)\.env\.example", p.name)[1])  # type: ignore[index]
               for p in INSTANCE_FILES]
    assert len(indices) >= 2
    settings = {i: _instance_settings(i, monkeypatch) for i in indices}
    # Two models, each under its own name, each worker on GPUs of its own, its instance's first.
    assert len({s.model for s in settings.values()}) == len(settings)
    names = [s.model_names for s in settings.values()]
    assert all(len(n) == 1 for n in names) and len({n[0] for n in names}) == len(names)
    used: list[str] = []
    for index, worker in settings.items():
        assert worker.gpus is not None
        gpus = worker.gpus.split(",")
        assert gpus[0] == str(index)
        used += gpus
    assert len(set(used)) == len(used)
    (embedder,) = [s for s in settings.values() if "--runner" in s.engine_args]
    assert _flags(embedder.engine_args)["--runner"] == "pooling"
    tensor_parallel = [s for s in settings.values() if s.gpus and "," in s.gpus]
    assert tensor_parallel, "the example shows a worker on several GPUs"


@pytest.mark.parametrize("path", INSTANCE_FILES, ids=lambda p: p.name)
def test_instance_files_set_only_real_settings_and_no_port_or_id(path: Path) -> None:
    env = _env_file(path)
    assert not set(env) - (_setting_variables() | {"FLEET_EXTRA_WORKER_ARGS"})
    assert not set(env) & {"FLEET_CLUSTER_TOKEN", "FLEET_WORKER_PORT",
                           "FLEET_WORKER_ENGINE_PORT", "FLEET_WORKER_WORKER_ID"}
    assert "FLEET_WORKER_MODEL" in env


def test_the_controller_keeps_the_adapters_in_its_state_directory() -> None:
    """The fleet's declared LoRA adapters survive a restart, in the one place the hardened unit
    may write (issue 22)."""
    service = _service("fleet-controller.service")
    command = _last(service, "ExecStart").split()
    path = command[command.index("--adapters-file") + 1]
    assert path.startswith(f"/var/lib/{_last(service, 'StateDirectory')}/")
