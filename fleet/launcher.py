"""`fleet up`: the whole stack on one machine, supervised, stopped as one by Ctrl-C.

Starts the controller, one worker per visible GPU (or N CPU workers, each pinned to its own
cores), the gateway and the chat web UI, as child processes (fleet/supervisor.py). Once the stack
is up, a service that dies is started again while the others keep serving. Nothing it started
outlives it.
They share one cluster token, handed to each in its environment (never its argv, which `ps`
shows): FLEET_CLUSTER_TOKEN if set, else the token in --cluster-token-file, generated there on
first use.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

import httpx
from pydantic import Field, ValidationError, model_validator
from pydantic_settings import SettingsConfigDict

from fleet.supervisor import Service, Stack, wait_until
from fleetcore.cluster_auth import (
    CLUSTER_TOKEN_ENV,
    ClusterTokenSettings,
    bearer,
    default_token_file,
    load_or_create_token_file,
)
from fleetcore.logs import setup_logging
from fleetcore.settings_cli import CliSettings, Passthrough
from fleetcore.tls import CA_FILE_ENV, client_ssl_context

logger = logging.getLogger("fleet.up")


def visible_gpus(env: dict[str, str] | None = None) -> list[str]:
    """GPU indices this process may use: CUDA_VISIBLE_DEVICES if set, else what nvidia-smi lists."""
    env = dict(os.environ if env is None else env)
    if "CUDA_VISIBLE_DEVICES" in env:
        return [d.strip() for d in env["CUDA_VISIBLE_DEVICES"].split(",") if d.strip()]
    if shutil.which("nvidia-smi") is None:
        return []
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=index", "--format=csv,noheader"],
            capture_output=True, text=True, timeout=20, check=True,
        ).stdout
    except (subprocess.SubprocessError, OSError):
        return []
    return [line.strip() for line in out.splitlines() if line.strip()]


def group_gpus(gpus: Sequence[str], per_worker: int) -> list[str]:
    """['0','1','2','3'], 2 -> ['0,1', '2,3']; leftover GPUs that cannot fill a group are unused."""
    if per_worker < 1:
        raise ValueError("--gpus-per-worker must be at least 1")
    usable = len(gpus) - len(gpus) % per_worker
    return [",".join(gpus[i:i + per_worker]) for i in range(0, usable, per_worker)]


def _core_range(cores: Sequence[int]) -> str:
    if list(cores) == list(range(cores[0], cores[-1] + 1)):
        return str(cores[0]) if len(cores) == 1 else f"{cores[0]}-{cores[-1]}"
    return ",".join(map(str, cores))


def parse_cores(spec: str) -> list[int]:
    """'0-2,5' -> [0, 1, 2, 5]."""
    cores: set[int] = set()
    for part in spec.split(","):
        first, _, last = part.strip().partition("-")
        if not first.isdigit() or (last and not last.isdigit()):
            raise ValueError(f"bad core list {spec!r}; expected e.g. 0-3 or 0,2")
        cores.update(range(int(first), int(last or first) + 1))
    return sorted(cores)


def split_cores(cores: Sequence[int], workers: int) -> list[str]:
    """Share the cores out among CPU workers, as contiguous sets: [0,1,2,3], 2 -> ['0-1', '2-3']."""
    cores = sorted(cores)
    if workers < 1:
        raise ValueError("--cpu-workers must be at least 1")
    if workers > len(cores):
        raise ValueError(f"{workers} CPU workers need at least {workers} cores; "
                         f"this machine lets us use {len(cores)}")
    size, extra = divmod(len(cores), workers)
    out, start = [], 0
    for i in range(workers):
        n = size + (1 if i < extra else 0)
        out.append(_core_range(cores[start:start + n]))
        start += n
    return out


class UpSettings(CliSettings):
    """What `fleet up` starts: flags over FLEET_UP_* environment variables over defaults."""

    model_config = SettingsConfigDict(env_prefix="FLEET_UP_")
    cli_prog = "fleet up"
    cli_description = ("Run controller, workers and gateway on this machine. Unknown flags go "
                       "to every vLLM engine.")

    model: str | None = Field(
        None, description="Model path or id for every worker; none: the demo model, prepared "
        "on first use.")
    model_name: str | None = Field(
        None, description="Name to serve the model as; none: the folder name or id.")
    cpu_workers: int = Field(
        1, ge=1, description="CPU workers when no GPU is visible; the cores are shared out "
        "among them.")
    cpus: str | None = Field(
        None, description="CPU cores to share out among CPU workers, e.g. 0 or 0-3; none: every "
        "core this process may use.")
    gpus_per_worker: int = Field(
        1, ge=1, description="GPUs per worker, tensor parallel inside it, for a model too big "
        "for one GPU.")
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
        900.0, gt=0, description="Seconds to wait for the model to be served.")
    drain_timeout: float = Field(
        30.0, ge=0, description="Seconds workers get to finish requests on Ctrl-C.")
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


def plan(args: UpSettings, model: str, cluster_token: str) -> list[Service]:
    py = sys.executable
    engine_args = args.engine_args
    controller_url = f"{_scheme(args)}://{args.host}:{args.controller_port}"
    tls = ["--ssl-certfile", str(args.ssl_certfile), "--ssl-keyfile", str(args.ssl_keyfile)] \
        if args.ssl_certfile else []
    token = {CLUSTER_TOKEN_ENV: cluster_token}
    services = [Service("controller", [py, "-m", "controller", "--host", args.host,
                                       "--port", str(args.controller_port), *tls], env=token)]
    worker_common = [py, "-m", "worker", "--model", model, "--controller-address", controller_url,
                     "--drain-timeout", str(args.drain_timeout), *tls]
    if args.model_name:
        worker_common += ["--model-name", args.model_name]
    gpus = visible_gpus()
    if gpus:
        for i, group in enumerate(group_gpus(gpus, args.gpus_per_worker)):
            services.append(Service(f"worker-{i}", [*worker_common, "--gpus", group, *engine_args],
                                    env={**token, "NCCL_NVLS_ENABLE": "0"}))
    else:
        cores = parse_cores(args.cpus) if args.cpus else sorted(os.sched_getaffinity(0))
        extra = [] if "--enforce-eager" in engine_args else ["--enforce-eager"]
        for i, cpus in enumerate(split_cores(cores, args.cpu_workers)):
            services.append(Service(f"worker-{i}",
                                    [*worker_common, "--cpus", cpus, *extra, *engine_args],
                                    env=dict(token)))
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
    model, model_name = args.model, args.model_name
    if model is None:
        from fleet.demo_model import DEMO_MODEL_NAME, ensure_demo_model

        model = str(ensure_demo_model())
        model_name = model_name or DEMO_MODEL_NAME
        args.model_name = model_name
    try:
        taken = taken_ports(args)
        token, token_source = cluster_token(args.cluster_token_file)
        services = plan(args, model, token)
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
            workers = sum(s.name.startswith("worker-") for s in services)
            deadline = time.monotonic() + args.startup_timeout

            def _all_ready() -> bool:
                listed = http.get(f"{controller_url}/workers",
                                  headers=bearer(token)).json()["workers"]
                return sum(w["state"] == "ready" for w in listed) >= workers and http.get(
                    f"{gateway_url}/v1/models", headers=headers).json()["data"] != [] and (
                    webui_url is None or http.get(f"{webui_url}/health").is_success)

            wait_until(_all_ready, deadline, stack, f"{workers} worker(s) to be ready")
        webui_line = f"  web UI:      {webui_url}\n" if webui_url else ""
        print(
            f"\nllm-fleet is up: model '{model_name or model}' on {workers} worker(s).\n"
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
