"""Real processes for integration tests: controller, workers with the demo model, gateway.

Each service runs as `python -m <service>` on free loopback ports, logging to a file that is
shown when something fails. Waits poll with deadlines and check the processes are alive. Every
service gets the same cluster token in its environment; with `tls`, every service serves HTTPS
and verifies the others against the test CA.
"""

from __future__ import annotations

import contextlib
import os
import random
import signal
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from fleetcore.tls import client_ssl_context
from tests.certs import TLSFiles

MODEL_NAME = "SmolLM2-135M-Instruct"
API_KEY = "sk-fleet-test"
CLUSTER_TOKEN = "fleet-test-cluster-token-0123456789"
CLUSTER_AUTH = {"Authorization": f"Bearer {CLUSTER_TOKEN}"}
_CALLER_CREDENTIALS = ("FLEET_CLUSTER_TOKEN_FILE", "FLEET_READ_TOKEN", "FLEET_READ_TOKEN_FILE",
                       "FLEET_SSL_CA_FILE")


def prefix_counters(stack: Stack) -> tuple[float, float]:
    """The engines' own prefix-cache hits and queries (tokens), summed over the stack's workers."""
    hits = queries = 0.0
    for worker in stack.workers():
        text = httpx.get(f"{worker['engine_url'].rstrip('/')}/metrics", timeout=10).text
        for line in text.splitlines():
            if line.startswith("vllm:prefix_cache_hits_total"):
                hits += float(line.rsplit(" ", 1)[1])
            elif line.startswith("vllm:prefix_cache_queries_total"):
                queries += float(line.rsplit(" ", 1)[1])
    return hits, queries


_handed_out: set[int] = set()
_pick = random.Random()  # its own generator: nothing that seeds `random` repeats our ports


def _ephemeral_floor() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A loopback port nothing listens on, never the same one twice in this process.

    A port is only taken once its service binds it, which can be many seconds after it was
    picked (a stack picks its gateway's port before it starts the workers). Ports come from
    below the kernel's ephemeral range, so neither a port the kernel hands another process
    (a worker's engine binds port 0) nor an outgoing connection's source port can take one
    in that time: CI once gave a worker the gateway's port.
    """
    top = _ephemeral_floor()
    low = max(1024, top - 12000)
    while True:
        port = _pick.randrange(low, top)
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port


@dataclass
class Service:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path

    def tail(self, lines: int = 40) -> str:
        try:
            text = self.log.read_text(errors="replace").splitlines()
        except OSError:
            return ""
        return "\n".join(text[-lines:])

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


class ServiceDied(AssertionError):
    pass


@dataclass
class Stack:
    workdir: Path
    model_path: Path
    controller_port: int = field(default_factory=free_port)
    gateway_port: int = field(default_factory=free_port)
    services: dict[str, Service] = field(default_factory=dict)
    worker_ports: dict[str, int] = field(default_factory=dict)
    tls: TLSFiles | None = None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    @property
    def controller_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.controller_port}"

    @property
    def gateway_url(self) -> str:
        return f"{self.scheme}://127.0.0.1:{self.gateway_port}"

    @property
    def verify(self) -> ssl.SSLContext:
        """What test clients verify the services with: the test CA under TLS."""
        return client_ssl_context(self.tls.ca if self.tls else None)

    @property
    def tls_flags(self) -> list[str]:
        """A service's flags to serve HTTPS with the test certificate (none without TLS)."""
        if self.tls is None:
            return []
        return ["--ssl-certfile", str(self.tls.cert), "--ssl-keyfile", str(self.tls.key)]

    def _spawn(self, name: str, argv: list[str], env: Mapping[str, str | None] | None = None,
               prefix: Sequence[str] = ()) -> Service:
        """Start `python <argv>`, after `prefix` (such as `ip netns exec NS`) where one is given;
        `env` adds variables to the usual ones, None removes one."""
        log = self.workdir / f"{name}.log"
        handle = log.open("ab")
        common = {"PYTHONUNBUFFERED": "1", "FLEET_CLUSTER_TOKEN": CLUSTER_TOKEN}
        if self.tls is not None:
            common["FLEET_SSL_CA_FILE"] = str(self.tls.ca)
        # Credentials of the caller's own shell would mix with the test token.
        inherited = {k: v for k, v in os.environ.items() if k not in _CALLER_CREDENTIALS}
        merged = {**inherited, **common, **(env or {})}
        proc = subprocess.Popen(
            [*prefix, sys.executable, *argv], stdout=handle, stderr=subprocess.STDOUT,
            env={k: v for k, v in merged.items() if v is not None},
            start_new_session=True,
        )
        handle.close()
        service = Service(name, proc, log)
        self.services[name] = service
        return service

    def start_controller(self) -> Service:
        """Start the controller and wait until it answers."""
        service = self._spawn("controller", [
            "-m", "controller", "--port", str(self.controller_port),
            "--heartbeat-interval", "1", "--expiry", "3", *self.tls_flags,
        ])
        self.wait_for(lambda: self.workers() is not None, "the controller", 30,
                      watch=["controller"])
        return service

    def start_serving(self) -> None:
        """Controller, gateway and one worker ("worker", core 0), until the model is routable."""
        self.start_controller()
        self.start_gateway()
        self.start_worker("worker", cpus="0")
        self.wait_routable(timeout=300)

    def start_gateway(self, name: str = "gateway", port: int | None = None,
                      extra: list[str] | None = None) -> Service:
        return self._spawn(name, [
            "-m", "gateway", "--port", str(port or self.gateway_port),
            "--controller-address", self.controller_url, "--api-keys", API_KEY,
            "--sync-interval", "0.5", *self.tls_flags, *(extra or []),
        ])

    def start_fake_engine(self, name: str = "fake", model: str = MODEL_NAME,
                          extra: list[str] | None = None) -> Service:
        """A fake engine registered as a worker (tests/integration/fake_engine.py), for tests
        whose subject is the gateway."""
        self.worker_ports[name] = free_port()
        return self._spawn(name, [
            "-m", "tests.integration.fake_engine", "--port", str(self.worker_ports[name]),
            "--controller-address", self.controller_url, "--model", model, "--worker-id", name,
            *(extra or []),
        ])

    def start_worker(self, name: str = "worker", cpus: str = "0", model: Path | None = None,
                     extra: list[str] | None = None, model_name: str = MODEL_NAME,
                     env: Mapping[str, str | None] | None = None, gpus: str | None = None,
                     engine_args: Sequence[str] = ("--enforce-eager", "--max-model-len", "4096"),
                     ) -> Service:
        """A worker on CPU cores `cpus`, or on `gpus` where given (the benchmarks' GPU runs)."""
        self.worker_ports[name] = free_port()
        device = ["--gpus", gpus] if gpus is not None else ["--cpus", cpus]
        return self._spawn(name, [
            "-m", "worker", "--model", str(model or self.model_path),
            "--port", str(self.worker_ports[name]),
            "--model-name", model_name, "--controller-address", self.controller_url,
            *device, "--worker-id", name, "--drain-timeout", "20",
            *engine_args, *self.tls_flags, *(extra or []),
        ], env=env)

    def wait_for(self, check: Callable[[], bool], what: str, timeout: float,
                 watch: list[str] | None = None) -> None:
        deadline = time.monotonic() + timeout
        while True:
            for name in watch if watch is not None else list(self.services):
                service = self.services[name]
                if not service.alive:
                    raise ServiceDied(
                        f"{name} exited with {service.proc.returncode} while waiting for {what}:"
                        f"\n{service.tail()}"
                    )
            with contextlib.suppress(httpx.HTTPError, KeyError, ValueError):
                if check():
                    return
            if time.monotonic() > deadline:
                logs = "\n".join(f"--- {n} ---\n{s.tail(15)}" for n, s in self.services.items())
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}\n{logs}")
            time.sleep(0.2)

    def workers(self) -> list[dict]:
        return httpx.get(f"{self.controller_url}/workers", headers=CLUSTER_AUTH,
                         verify=self.verify, timeout=5).json()["workers"]

    def worker_record(self, worker_id: str) -> dict | None:
        return next((w for w in self.workers() if w["worker_id"] == worker_id), None)

    def engine_running(self, worker_id: str = "worker") -> int:
        """Requests the worker's engine is running now, from its own /metrics."""
        url = self.worker_record(worker_id)["engine_url"].rstrip("/")
        text = httpx.get(f"{url}/metrics", verify=self.verify, timeout=5).text
        return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                       if line.startswith("vllm:num_requests_running")))

    def wait_worker_state(self, worker_id: str, state: str, timeout: float = 300) -> None:
        def check() -> bool:
            record = self.worker_record(worker_id)
            return record is not None and record["state"] == state

        self.wait_for(check, f"{worker_id} to be {state}", timeout)

    def wait_routable(self, timeout: float = 300, gateway_url: str | None = None) -> None:
        headers = {"Authorization": f"Bearer {API_KEY}"}
        url = gateway_url or self.gateway_url

        def check() -> bool:
            data = httpx.get(f"{url}/v1/models", headers=headers, verify=self.verify,
                             timeout=5).json()
            return any(m["id"] == MODEL_NAME for m in data["data"])

        self.wait_for(check, "the gateway to route the demo model", timeout)

    def stop(self, name: str, sig: int = signal.SIGTERM, timeout: float = 60) -> int:
        service = self.services.pop(name)
        if service.alive:
            service.proc.send_signal(sig)
        try:
            return service.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(service.proc.pid, signal.SIGKILL)
            service.proc.wait()
            raise AssertionError(
                f"{name} did not stop within {timeout}s:\n{service.tail()}"
            ) from None

    def close(self) -> None:
        for name in list(self.services):
            with contextlib.suppress(AssertionError):
                self.stop(name, timeout=40)
