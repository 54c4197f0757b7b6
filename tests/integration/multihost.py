"""The multi-host recipe of deploy/README.md ("Several hosts"), run on network namespaces.

Host `a` runs the controller and the gateway, hosts `b` and `c` one CPU worker each (cores 0
and 1). Every service gets the settings the recipe puts in its host's `fleet.env` (FLEET_*
variables, over this process's own environment, so a setting such as a cluster token reaches
every service) and the command line of its systemd unit, on the recipe's ports. The two worker
hosts take the recipe's two ways to be reached: `b` binds its engine to its own address (which
is then advertised), `c` binds to 0.0.0.0 and sets the advertised URL.

`ClientLoop` is a client sending requests one after another through the gateway, from the
client machine, and recording how each ended.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field

import httpx

from tests.integration.harness import API_KEY, MODEL_NAME, Service, Stack
from tests.integration.netns import Host, Network

HOSTS = ("a", "b", "c")
WORKER_CORES = {"b": "0", "c": "1"}
# The recipe's ports (deploy/README.md, "Firewall").
CONTROLLER_PORT = 21001
GATEWAY_PORT = 8000
ENGINE_PORT = 8100
WORKER_PORT = 21100
# The controller's defaults, which the recipe keeps.
HEARTBEAT_INTERVAL = 2.0
EXPIRY = 6.0
AUTH = {"Authorization": f"Bearer {API_KEY}"}


@dataclass
class MultiHostStack(Stack):
    net: Network | None = None

    def host(self, name: str) -> Host:
        assert self.net is not None
        return self.net.hosts[name]

    @property
    def controller_url(self) -> str:
        return f"http://{self.host('a').address}:{self.controller_port}"

    @property
    def gateway_url(self) -> str:
        return f"http://{self.host('a').address}:{self.gateway_port}"

    # -- each host's fleet.env, as the recipe writes it ---------------------------------------
    def controller_host_env(self) -> dict[str, str]:
        keys = self.workdir / "api-keys"
        keys.write_text(f"{API_KEY}\n")
        return {
            "FLEET_CONTROLLER_HOST": self.host("a").address,
            "FLEET_CONTROLLER_PORT": str(self.controller_port),
            "FLEET_GATEWAY_HOST": "0.0.0.0",
            "FLEET_GATEWAY_PORT": str(self.gateway_port),
            "FLEET_GATEWAY_CONTROLLER_ADDRESS": self.controller_url,
            "FLEET_GATEWAY_API_KEYS_FILE": str(keys),
            # Not the recipe's business, but the hard case for faults: round-robin keeps sending
            # every other request to a worker that went silent until the gateway gives up on
            # it, where least-load would mostly steer around it by its requests in flight.
            "FLEET_GATEWAY_ROUTING": "round-robin",
        }

    def worker_host_env(self, name: str) -> dict[str, str]:
        address = self.host(name).address
        env = {
            "FLEET_WORKER_CONTROLLER_ADDRESS": self.controller_url,
            "FLEET_WORKER_MODEL": str(self.model_path),
            "FLEET_WORKER_HOST": address,
            "FLEET_WORKER_ENGINE_HOST": address,
            # What fleet-worker@0.service sets.
            "FLEET_WORKER_PORT": str(WORKER_PORT),
            "FLEET_WORKER_ENGINE_PORT": str(ENGINE_PORT),
            "FLEET_WORKER_WORKER_ID": self.worker_id(name),
            "VLLM_CPU_KVCACHE_SPACE": "1",
        }
        if name == "c":
            env["FLEET_WORKER_ENGINE_HOST"] = "0.0.0.0"
            env["FLEET_WORKER_ADVERTISE_URL"] = f"http://{address}:{ENGINE_PORT}"
        return env

    @staticmethod
    def worker_id(name: str) -> str:
        return f"{name}-cpu{WORKER_CORES[name]}"

    # -- services --------------------------------------------------------------------------
    def _on(self, host: str, name: str, argv: list[str], env: dict[str, str]) -> Service:
        return self._spawn(name, argv, env=env, prefix=self.host(host).command([]))

    def start_controller(self) -> Service:
        service = self._on("a", "controller", ["-m", "fleet.cli", "controller"],
                           self.controller_host_env())
        self.wait_for(lambda: self.workers() is not None, "the controller", 30,
                      watch=["controller"])
        return service

    def start_gateway(self, name: str = "gateway", port: int | None = None,
                      extra: list[str] | None = None) -> Service:
        env = self.controller_host_env()
        if port is not None:
            env["FLEET_GATEWAY_PORT"] = str(port)
        return self._on("a", name, ["-m", "fleet.cli", "gateway", *(extra or [])], env)

    def start_recipe_worker(self, name: str) -> Service:
        # fleet-worker@.service's command, with --cpus for --gpus and FLEET_EXTRA_WORKER_ARGS.
        return self._on(name, self.worker_id(name), [
            "-m", "fleet.cli", "worker", "--cpus", WORKER_CORES[name], "--drain-timeout", "20",
            "--model-name", MODEL_NAME, "--enforce-eager", "--max-model-len", "4096",
        ], self.worker_host_env(name))

    def start_fake_engine_on(self, host: str, model: str, port: int,
                             interval_ms: float = 0.0) -> Service:
        """The fake engine (tests/integration/fake_engine.py) as a worker on `host`."""
        address = self.host(host).address
        return self._on(host, f"fake-{host}", [
            "-m", "tests.integration.fake_engine", "--host", address, "--port", str(port),
            "--controller-address", self.controller_url, "--model", model,
            "--worker-id", f"fake-{host}", "--interval-ms", str(interval_ms),
        ], {})

    def start_recipe(self) -> None:
        self.start_controller()
        self.start_gateway()
        for name in WORKER_CORES:
            self.start_recipe_worker(name)
        for name in WORKER_CORES:
            self.wait_worker_state(self.worker_id(name), "ready", timeout=400)
        self.wait_gateway_workers(len(WORKER_CORES))

    def gateway_retries(self) -> float:
        """Requests the gateway sent again to another worker, from its /metrics."""
        text = httpx.get(f"{self.gateway_url}/metrics", timeout=5).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("fleet_gateway_retries_total"))

    def gateway_health(self) -> dict:
        return httpx.get(f"{self.gateway_url}/health", headers=AUTH, timeout=5).json()

    def wait_gateway_workers(self, count: int, timeout: float = 30) -> None:
        self.wait_for(lambda: self.gateway_health()["routable_workers"] == count,
                      f"the gateway to route to {count} worker(s)", timeout)


@dataclass
class Outcome:
    started: float
    ended: float
    ok: bool
    detail: str  # "ok", or how it failed
    worker: str | None


def chat(url: str, stream: bool, timeout: float = 60) -> tuple[bool, str, str | None]:
    """One chat completion through the gateway: (ok, detail, X-Fleet-Worker)."""
    body = {"model": MODEL_NAME, "max_tokens": 8, "stream": stream,
            "messages": [{"role": "user", "content": "Count to ten."}]}
    try:
        if not stream:
            r = httpx.post(f"{url}/v1/chat/completions", json=body, headers=AUTH,
                           timeout=timeout)
            worker = r.headers.get("x-fleet-worker")
            if r.status_code != 200:
                return False, f"http {r.status_code}: {r.text[:200]}", worker
            return bool(r.json()["choices"][0]["message"]["content"]), "ok", worker
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, headers=AUTH,
                          timeout=timeout) as r:
            worker = r.headers.get("x-fleet-worker")
            if r.status_code != 200:
                return False, f"http {r.status_code}", worker
            events = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
        if not events or events[-1] != "[DONE]":
            return False, "no [DONE]", worker
        if any("choices" not in json.loads(e) for e in events[:-1]):
            return False, "error event", worker
        return True, "ok", worker
    except httpx.HTTPError as exc:
        return False, f"transport {type(exc).__name__}", None


@dataclass
class ClientLoop:
    """Threads sending chat completions one after another until stopped."""

    url: str
    plain: int = 2
    streaming: int = 1
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _pending: dict[int, float] = field(default_factory=dict)  # thread -> start of its request

    def _run(self, stream: bool) -> None:
        me = threading.get_ident()
        while not self._stop.is_set():
            started = time.monotonic()
            with self._lock:
                self._pending[me] = started
            ok, detail, worker = chat(self.url, stream)
            with self._lock:
                self.outcomes.append(Outcome(started, time.monotonic(), ok, detail, worker))
                del self._pending[me]

    def __enter__(self) -> ClientLoop:
        for stream in [False] * self.plain + [True] * self.streaming:
            thread = threading.Thread(target=self._run, args=(stream,), daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(timeout=90)

    def snapshot(self) -> list[Outcome]:
        with self._lock:
            return list(self.outcomes)

    def all_ended(self, started_before: float) -> bool:
        """Whether every request started before that time has ended, one way or another."""
        with self._lock:
            return all(started >= started_before for started in self._pending.values())

    def served_after(self, since: float, worker: str | None = None) -> int:
        """Requests started after `since` that succeeded (on `worker`, if given)."""
        return sum(1 for o in self.snapshot()
                   if o.started >= since and o.ok and worker in (None, o.worker))

    def failures(self) -> list[Outcome]:
        return [o for o in self.snapshot() if not o.ok]
