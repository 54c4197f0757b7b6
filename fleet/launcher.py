"""`fleet up`: the whole stack on one machine, supervised, stopped as one by Ctrl-C.

Starts the controller, the workers of each model of the fleet (a fleet file, one --model, or
the demo fleet: fleet/fleet_file.py), each on its share of the GPUs or pinned to its own CPU
cores (fleet/devices.py), the gateway and the chat web UI, as child processes
(fleet/supervisor.py). Once the stack is up, a service that dies is started again while the
others keep serving. Nothing it started outlives it.
They share one cluster token, handed to each in its environment (never its argv, which `ps`
shows): FLEET_CLUSTER_TOKEN if set, else the token in --cluster-token-file, generated there on
first use.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import httpx
from pydantic import Field, ValidationError, model_validator
from pydantic_settings import SettingsConfigDict

from fleet.devices import parse_cores, share_cores, share_gpus, visible_gpus
from fleet.fleet_file import (
    DEMO_PREFIX,
    SOURCE_PREFIXES,
    FleetFile,
    FleetModel,
    demo_fleet_path,
    load_fleet,
    resolve_demo_sources,
)
from fleet.supervisor import Service, Stack, wait_until
from fleetcore.cluster_auth import (
    CLUSTER_TOKEN_ENV,
    ClusterTokenSettings,
    bearer,
    default_token_file,
    load_or_create_token_file,
)
from fleetcore.logs import setup_logging
from fleetcore.settings_cli import CliSettings, Flag, Passthrough
from fleetcore.tls import CA_FILE_ENV, client_ssl_context

logger = logging.getLogger("fleet.up")


class UpSettings(CliSettings):
    """What `fleet up` starts: flags over FLEET_UP_* environment variables over defaults."""

    model_config = SettingsConfigDict(env_prefix="FLEET_UP_")
    cli_prog = "fleet up"
    cli_description = ("Run controller, workers and gateway on this machine. Unknown flags go "
                       "to every vLLM engine.")

    fleet: Annotated[Path | None, Flag(exclusive="models")] = Field(
        None, description="Fleet file (YAML): the models to serve, each with its source, "
        "names, workers or devices, engine arguments and chat template; none: --model, else "
        "the demo fleet (a chat and an embedding model).")
    model: Annotated[str | None, Flag(exclusive="models")] = Field(
        None, description="One model to serve instead of a fleet: path, Hugging Face id or "
        "demo:smollm2.")
    model_name: str | None = Field(
        None, description="Name to serve --model as; none: the folder name or id.")
    cpu_workers: int = Field(
        1, ge=1, description="CPU workers of --model when no GPU is visible; the cores are "
        "shared out among them.")
    cpus: str | None = Field(
        None, description="CPU cores to share out among CPU workers, e.g. 0 or 0-3; none: every "
        "core this process may use.")
    gpus_per_worker: int = Field(
        1, ge=1, description="GPUs per worker of --model, tensor parallel inside it, for a "
        "model too big for one GPU.")
    host: str = Field("127.0.0.1", description="Bind address of every service.")
    controller_port: int = Field(21001, ge=0, le=65535, description="Port of the controller.")
    gateway_port: int = Field(8000, ge=0, le=65535, description="Port of the gateway.")
    webui_port: int = Field(7860, ge=0, le=65535, description="Port of the chat web UI.")
    no_webui: bool = Field(False, description="Do not start the web UI.")
    webui_log_dir: Path | None = Field(
        None, description="The web UI logs finished chats and 👍/👎/flag feedback here, and "
        "shows feedback buttons (its --log-dir); none: no log, no buttons.")
    api_keys: str | None = Field(None, description="Comma-separated client API keys for the "
                                 "gateway; the web UI gets the first.")
    cluster_token_file: Path | None = Field(
        None, description="The cluster token the services share; created with a random token "
        "(mode 0600) if missing. None: FLEET_CLUSTER_TOKEN if set, else "
        "~/.cache/fleet/cluster-token.")
    ssl_certfile: Path | None = Field(
        None, description="Every service serves HTTPS with this certificate (it must name "
        "--host, and 127.0.0.1).")
    ssl_keyfile: Path | None = Field(None, description="The certificate's private key.")
    ssl_ca_file: Path | None = Field(None,
                                     description="The CA every service verifies the others with.")
    startup_timeout: float = Field(
        900.0, gt=0, description="Seconds to wait for every model to be served.")
    drain_timeout: float = Field(
        30.0, ge=0, description="Seconds workers get to finish requests on Ctrl-C.")
    adapters_file: Path | None = Field(
        None, description="The controller's --adapters-file (the declared LoRA adapters); "
        "none: ~/.cache/fleet/adapters-CONTROLLER_PORT.json.")
    engine_args: Annotated[list[str], Passthrough()] = Field(default_factory=list)

    @model_validator(mode="after")
    def _cert_and_key(self) -> UpSettings:
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("TLS needs both --ssl-certfile and --ssl-keyfile")
        return self


def _reachable(host: str) -> str:
    """The address to connect to a service bound to `host`."""
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host


def _scheme(args: UpSettings) -> str:
    return "https" if args.ssl_certfile else "http"


# Flags that describe the one model of --model; a fleet file says the same per model.
_ONE_MODEL_FLAGS = {"model_name": "--model-name", "cpu_workers": "--cpu-workers",
                    "gpus_per_worker": "--gpus-per-worker"}


def fleet_of(args: UpSettings, on_gpus: bool) -> FleetFile:
    """What to serve: the fleet file, else --model, else the demo fleet. Its `demo:` sources
    are not resolved yet (fleet_file.resolve_demo_sources)."""
    given = [flag for name, flag in _ONE_MODEL_FLAGS.items() if name in args.model_fields_set]
    if args.fleet is not None:
        if args.model is not None:  # the flags exclude each other; the variables may not
            raise ValueError("give --fleet or --model, not both")
        if given:
            verb = "describes" if len(given) == 1 else "describe"
            raise ValueError(f"{', '.join(given)} {verb} --model; with --fleet, give each "
                             "model's in the fleet file")
        return load_fleet(args.fleet)
    if args.model is None and not given:
        return load_fleet(demo_fleet_path())
    # --model, or a flag of it without one: the chat demo model alone, as before fleets.
    return FleetFile(models=[FleetModel(
        source=args.model or f"{DEMO_PREFIX}:smollm2",
        served_names=[args.model_name] if args.model_name else [],
        workers=None if on_gpus else args.cpu_workers,
        gpus_per_worker=args.gpus_per_worker,
    )])


def served_as(model: FleetModel) -> str:
    """The first name the model's workers serve it as, as the worker chooses it."""
    if model.served_names:
        return model.served_names[0]
    local = Path(model.location).expanduser()
    if model.prefix == "local" or (model.prefix is None and local.exists()):
        return local.resolve().name
    return model.location


def _worker_argv(args: UpSettings, model: FleetModel, controller_url: str,
                 tls: list[str]) -> list[str]:
    if model.prefix == DEMO_PREFIX:
        raise ValueError(f"model {model.label!r}: demo sources are resolved before planning")
    argv = [sys.executable, "-m", "worker", "--model", model.location,
            "--controller-address", controller_url, "--drain-timeout", str(args.drain_timeout),
            *tls]
    if model.prefix is not None:
        argv += ["--source", SOURCE_PREFIXES[model.prefix]]
    for name in model.served_names:
        argv += ["--model-name", name]
    if model.chat_template is not None:
        argv += ["--chat-template", model.chat_template]
    return argv


def place(args: UpSettings, fleet: FleetFile) -> tuple[bool, list[list[str]]]:
    """Whether the workers run on GPUs, and each model's workers as their devices (--gpus
    groups or --cpus sets)."""
    gpus = visible_gpus()
    if gpus:
        return True, share_gpus(fleet.models, gpus)
    cores = parse_cores(args.cpus) if args.cpus else sorted(os.sched_getaffinity(0))
    return False, share_cores(fleet.models, cores)


def adapters_file(args: UpSettings) -> Path:
    """Where the controller keeps the fleet's declared adapters across restarts: one file per
    controller port, so that two fleets on one machine keep theirs apart."""
    if args.adapters_file is not None:
        return args.adapters_file.expanduser().resolve()
    return Path.home() / ".cache" / "fleet" / f"adapters-{args.controller_port}.json"


def declare_fleet_adapters(path: Path, fleet: FleetFile) -> int:
    """Write the fleet file's adapters into the controller's adapters file before it starts
    (adapters declared at run time stay); returns how many the file lists."""
    from controller.adapters import AdapterCatalogue
    from controller.protocol import AdapterSpec

    catalogue = AdapterCatalogue(path)
    for model in fleet.models:
        for adapter in model.adapters:
            catalogue.put(AdapterSpec(name=adapter.name, source=adapter.source,
                                      base_model=served_as(model)))
    return sum(len(m.adapters) for m in fleet.models)


def plan(args: UpSettings, fleet: FleetFile, cluster_token: str) -> list[Service]:
    """The services of the stack, in start order: the controller, the workers of each model
    (engine arguments: the model's, then the command line's, which win), gateway, web UI."""
    py = sys.executable
    controller_url = f"{_scheme(args)}://{args.host}:{args.controller_port}"
    tls = ["--ssl-certfile", str(args.ssl_certfile), "--ssl-keyfile", str(args.ssl_keyfile)] \
        if args.ssl_certfile else []
    token = {CLUSTER_TOKEN_ENV: cluster_token}
    services = [Service("controller", [py, "-m", "controller", "--host", args.host,
                                       "--port", str(args.controller_port),
                                       "--adapters-file", str(adapters_file(args)), *tls],
                        env=token)]
    gpus, placements = place(args, fleet)
    number = 0
    for model, devices in zip(fleet.models, placements, strict=True):
        common = _worker_argv(args, model, controller_url, tls)
        engine_args = [*model.lora_args, *model.engine_args, *args.engine_args]
        for device in devices:
            if gpus:
                argv = [*common, "--gpus", device, *engine_args]
                env = {**token, "NCCL_NVLS_ENABLE": "0"}
            else:
                eager = [] if "--enforce-eager" in engine_args else ["--enforce-eager"]
                argv = [*common, "--cpus", device, *eager, *engine_args]
                env = dict(token)
            services.append(Service(f"worker-{number}", argv, env=env))
            number += 1
    gateway = [py, "-m", "gateway", "--host", args.host, "--port", str(args.gateway_port),
               "--controller-address", controller_url, *tls]
    if args.api_keys:
        gateway += ["--api-keys", args.api_keys]
    services.append(Service("gateway", gateway, env=dict(token)))
    if not args.no_webui:
        gateway_url = f"{_scheme(args)}://{_reachable(args.host)}:{args.gateway_port}"
        # The key travels in the environment, where `ps` does not show it.
        key = {"FLEET_WEBUI_API_KEY": args.api_keys.split(",")[0].strip()} \
            if args.api_keys else {}
        log = ["--log-dir", str(args.webui_log_dir.resolve())] if args.webui_log_dir else []
        services.append(Service("webui", [py, "-m", "webui", "--host", args.host, "--port",
                                          str(args.webui_port), "--gateway-url", gateway_url,
                                          *log, *tls], env=key))
    if args.ssl_ca_file:
        for service in services:
            service.env[CA_FILE_ENV] = str(args.ssl_ca_file.resolve())
    return services


def taken_ports(args: UpSettings) -> list[str]:
    """The services' ports that something else on this machine holds already, each described
    for the user with the flag that moves it."""
    ports = [("controller", "--controller-port", args.controller_port),
             ("gateway", "--gateway-port", args.gateway_port)]
    if not args.no_webui:
        ports.append(("web UI", "--webui-port", args.webui_port))
    taken = []
    for name, flag, port in ports:
        family = socket.AF_INET6 if ":" in args.host else socket.AF_INET
        with socket.socket(family, socket.SOCK_STREAM) as probe:
            # As uvicorn binds: a port in TIME_WAIT after our own last run is free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind((args.host, port))
            except OSError as exc:
                if exc.errno != errno.EADDRINUSE:
                    raise
                taken.append(f"port {port} on {args.host}, for the {name}, is in use by another "
                             f"program (another `fleet up`?); stop it or choose one with {flag}")
    return taken


def cluster_token(token_file: Path | None) -> tuple[str, str]:
    """The token for the services, and where it came from (for the user)."""
    configured = ClusterTokenSettings().cluster_token
    if configured is not None and token_file is None:
        return configured.get_secret_value(), CLUSTER_TOKEN_ENV
    if configured is not None:
        raise ValueError(f"give the cluster token in {CLUSTER_TOKEN_ENV} or --cluster-token-file,"
                         " not both")
    path = token_file or default_token_file()
    return load_or_create_token_file(path), str(path)


def main(argv: Sequence[str] | None = None) -> int:
    try:
        args = UpSettings.from_cli(argv)
    except ValidationError as exc:
        print(f"fleet up: invalid settings: {exc}", file=sys.stderr)
        return 2
    setup_logging("info", "up")
    try:
        taken = taken_ports(args)
        fleet = fleet_of(args, on_gpus=bool(visible_gpus()))
        counts = [len(devices) for devices in place(args, fleet)[1]]
        if any(m.prefix == DEMO_PREFIX for m in fleet.models):
            # Converting the chat demo model takes a while on first use: only once the file
            # and the devices are known to be right.
            from fleet.demo_model import resolve_demo_source

            fleet = resolve_demo_sources(fleet, resolve_demo_source)
        token, token_source = cluster_token(args.cluster_token_file)
        services = plan(args, fleet, token)
        if any(m.adapters for m in fleet.models):
            declare_fleet_adapters(adapters_file(args), fleet)
    except (ValueError, ValidationError, OSError) as exc:
        print(f"fleet up: {exc}", file=sys.stderr)
        return 2
    if taken:
        print("\n".join(f"fleet up: {line}" for line in taken), file=sys.stderr)
        return 2
    stack = Stack(services)

    def _on_signal(signum: int, _frame: object) -> None:
        raise KeyboardInterrupt

    # SIGHUP too: the terminal `fleet up` runs in went away. SIGINT also when started with it
    # ignored (a background job of a non-interactive shell).
    for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(signum, _on_signal)
    host, scheme = _reachable(args.host), _scheme(args)
    controller_url = f"{scheme}://{host}:{args.controller_port}"
    gateway_url = f"{scheme}://{host}:{args.gateway_port}"
    webui_url = None if args.no_webui else f"{scheme}://{host}:{args.webui_port}"
    verify = client_ssl_context(args.ssl_ca_file)
    try:
        with httpx.Client(timeout=3.0, verify=verify) as http:
            stack.start(services[0])
            deadline = time.monotonic() + 60
            wait_until(lambda: http.get(f"{controller_url}/health").is_success, deadline, stack,
                       "the controller")
            for service in services[1:]:
                stack.start(service)
            headers = {"Authorization": f"Bearer {args.api_keys.split(',')[0]}"} \
                if args.api_keys else {}
            names = [served_as(model) for model in fleet.models]
            wanted = list(zip(names, counts, strict=True))
            deadline = time.monotonic() + args.startup_timeout

            def _all_ready() -> bool:
                listed = http.get(f"{controller_url}/workers",
                                  headers=bearer(token)).json()["workers"]
                ready = [w["model_names"][:1] for w in listed if w["state"] == "ready"]
                served = {m["id"] for m in http.get(f"{gateway_url}/v1/models",
                                                    headers=headers).json()["data"]}
                return all(ready.count([name]) >= n for name, n in wanted) and (
                    set(names) <= served) and (
                    webui_url is None or http.get(f"{webui_url}/health").is_success)

            wait_until(_all_ready, deadline, stack,
                       f"{sum(counts)} worker(s) of {len(names)} model(s) to be ready")
        webui_line = f"  web UI:      {webui_url}\n" if webui_url else ""
        served_line = ", ".join(f"'{name}' on {n} worker(s)" for name, n in wanted)
        print(
            f"\nllm-fleet is up: {served_line}.\n"
            f"  OpenAI API:  {gateway_url}/v1\n"
            f"{webui_line}"
            f"  controller:  {controller_url} (cluster token: {token_source})\n"
            f"  try:  curl {gateway_url}/v1/models\n"
            f"Press Ctrl-C to stop.\n",
            flush=True,
        )
        while True:
            stack.supervise()
            time.sleep(0.5)
    except KeyboardInterrupt:
        logger.info("stopping the stack")
        return 0
    except RuntimeError as exc:
        logger.error("%s", exc)
        return 1
    finally:
        # Ignore further Ctrl-C while we stop what we started.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        stack.stop(timeout=args.drain_timeout + 30)


if __name__ == "__main__":
    raise SystemExit(main())
