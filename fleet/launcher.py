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

import argparse
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

import httpx
from pydantic import ValidationError

from fleet.cluster_auth import (
    CLUSTER_TOKEN_ENV,
    ClusterTokenSettings,
    bearer,
    default_token_file,
    load_or_create_token_file,
)
from fleet.logs import setup_logging
from fleet.supervisor import Service, Stack, wait_until
from fleet.tls import CA_FILE_ENV, client_ssl_context

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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fleet up",
        description="Run controller, workers and gateway on this machine. Unknown flags go to "
        "every vLLM engine.",
    )
    parser.add_argument("--model", help="Model path or id (default: the demo model, prepared "
                        "on first use).")
    parser.add_argument("--model-name", help="Name to serve the model as.")
    parser.add_argument("--cpu-workers", type=int, default=1,
                        help="CPU workers when no GPU is visible (default 1).")
    parser.add_argument("--cpus", help="CPU cores to share out among CPU workers, e.g. 0 or 0-3 "
                        "(default: every core this process may use).")
    parser.add_argument("--gpus-per-worker", type=int, default=1,
                        help="GPUs per worker, tensor parallel inside it (default 1).")
    parser.add_argument("--host", default="127.0.0.1", help="Bind address of every service.")
    parser.add_argument("--controller-port", type=int, default=21001)
    parser.add_argument("--gateway-port", type=int, default=8000)
    parser.add_argument("--webui-port", type=int, default=7860,
                        help="Port of the chat web UI (default 7860).")
    parser.add_argument("--no-webui", action="store_true", help="Do not start the web UI.")
    parser.add_argument("--webui-log-dir", type=Path,
                        help="The web UI logs finished chats and 👍/👎/flag feedback here, and "
                        "shows feedback buttons (default: no log, no buttons).")
    parser.add_argument("--api-keys", help="Comma-separated client API keys for the gateway.")
    parser.add_argument(
        "--cluster-token-file", type=Path,
        help="The cluster token the services share; created with a random token (mode 0600) if "
        f"missing (default: FLEET_CLUSTER_TOKEN if set, else {default_token_file()}).",
    )
    parser.add_argument("--ssl-certfile", help="Every service serves HTTPS with this certificate "
                        "(it must name --host, and 127.0.0.1).")
    parser.add_argument("--ssl-keyfile", help="The certificate's private key.")
    parser.add_argument("--ssl-ca-file", help="The CA every service verifies the others with.")
    parser.add_argument("--startup-timeout", type=float, default=900.0,
                        help="Seconds to wait for the model to be served (default 900).")
    parser.add_argument("--drain-timeout", type=float, default=30.0,
                        help="Seconds workers get to finish requests on Ctrl-C (default 30).")
    return parser


def _reachable(host: str) -> str:
    """The address to connect to a service bound to `host`."""
    return "127.0.0.1" if host in ("0.0.0.0", "::") else host


def _scheme(args: argparse.Namespace) -> str:
    return "https" if args.ssl_certfile else "http"


def plan(args: argparse.Namespace, engine_args: list[str], model: str,
         cluster_token: str) -> list[Service]:
    py = sys.executable
    controller_url = f"{_scheme(args)}://{args.host}:{args.controller_port}"
    tls = ["--ssl-certfile", args.ssl_certfile, "--ssl-keyfile", args.ssl_keyfile] \
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
            service.env[CA_FILE_ENV] = str(Path(args.ssl_ca_file).resolve())
    return services


def taken_ports(args: argparse.Namespace) -> list[str]:
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
    args, engine_args = _parser().parse_known_args(argv)
    setup_logging("info", "up")
    model, model_name = args.model, args.model_name
    if model is None:
        from fleet.demo_model import DEMO_MODEL_NAME, ensure_demo_model

        model = str(ensure_demo_model())
        model_name = model_name or DEMO_MODEL_NAME
        args.model_name = model_name
    if bool(args.ssl_certfile) != bool(args.ssl_keyfile):
        print("fleet up: TLS needs both --ssl-certfile and --ssl-keyfile", file=sys.stderr)
        return 2
    try:
        taken = taken_ports(args)
        token, token_source = cluster_token(args.cluster_token_file)
        services = plan(args, engine_args, model, token)
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
    verify = client_ssl_context(Path(args.ssl_ca_file) if args.ssl_ca_file else None)
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
