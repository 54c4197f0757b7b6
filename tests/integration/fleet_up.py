"""`fleet up` as a user runs it, for tests: one process that starts and supervises the stack.

The services are `fleet up`'s own children, found by their command lines; nothing here starts
one of them another way.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import httpx
import psutil

from tests.integration.harness import free_port


class FleetUp:
    def __init__(self, workdir: Path, flags: Sequence[str] = (), *,
                 env: dict[str, str] | None = None) -> None:
        self.workdir = workdir
        self.controller_port, self.gateway_port, self.webui_port = (
            free_port(), free_port(), free_port())
        self.token_file = workdir / "state" / "cluster-token"
        self.log = workdir / "fleet-up.log"
        self.argv = [sys.executable, "-m", "fleet.cli", "up",
                     "--controller-port", str(self.controller_port),
                     "--gateway-port", str(self.gateway_port),
                     "--webui-port", str(self.webui_port),
                     "--cluster-token-file", str(self.token_file), *flags]
        # No cluster token from the caller's shell: `fleet up` makes its own.
        inherited = {k: v for k, v in os.environ.items()
                     if not k.startswith("FLEET_CLUSTER_TOKEN")}
        self.env = {**inherited, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.up_after = 0.0  # seconds from start to "llm-fleet is up"

    @property
    def gateway_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway_port}"

    @property
    def webui_url(self) -> str:
        return f"http://127.0.0.1:{self.webui_port}"

    @property
    def controller_url(self) -> str:
        return f"http://127.0.0.1:{self.controller_port}"

    def text(self) -> str:
        return self.log.read_text(errors="replace")

    def tail(self, lines: int = 60) -> str:
        return "\n".join(self.text().splitlines()[-lines:])

    def start(self) -> subprocess.Popen[bytes]:
        with self.log.open("ab") as out:
            self.proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT,
                                         env=self.env)
        return self.proc

    def wait_for(self, check: Callable[[], bool], what: str, timeout: float) -> None:
        """Poll `check` until it holds; fail at once if `fleet up` itself exits."""
        assert self.proc is not None
        deadline = time.monotonic() + timeout
        last: Exception | None = None  # what the check last raised, for the failure's message
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"fleet up exited with {self.proc.returncode} while "
                                     f"waiting for {what}:\n{self.tail()}")
            try:
                if check():
                    return
            except (httpx.HTTPError, psutil.Error, KeyError, ValueError) as exc:
                last = exc
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what} "
                                     f"(the check last raised {last!r}):\n{self.tail()}")
            time.sleep(0.2)

    def start_and_wait(self, timeout: float = 600) -> None:
        started = time.monotonic()
        self.start()
        self.wait_for(lambda: "llm-fleet is up" in self.text(), "fleet up", timeout)
        self.up_after = time.monotonic() - started

    def token(self) -> str:
        return self.token_file.read_text().strip()

    def workers(self) -> list[dict]:
        return httpx.get(f"{self.controller_url}/workers", timeout=5,
                         headers={"Authorization": f"Bearer {self.token()}"}).json()["workers"]

    def services(self) -> dict[str, psutil.Process]:
        """`fleet up`'s service processes by name: controller, gateway, webui, worker-0, ...
        (workers by the order of their --cpus or --gpus, as `fleet up` numbers them)."""
        assert self.proc is not None
        found: dict[str, psutil.Process] = {}
        workers = []
        for child in psutil.Process(self.proc.pid).children():
            argv = child.cmdline()
            module = argv[argv.index("-m") + 1] if "-m" in argv else ""
            if module == "worker":
                device = "--cpus" if "--cpus" in argv else "--gpus"
                workers.append((argv[argv.index(device) + 1], child))
            elif module in ("controller", "gateway", "webui"):
                found[module] = child
        for i, (_, child) in enumerate(sorted(workers, key=lambda w: w[0])):
            found[f"worker-{i}"] = child
        return found

    def stop(self, timeout: float = 120, signum: int = signal.SIGINT) -> int:
        """Ctrl-C (or another signal), as a user stops it; its exit code. Every service it
        started must be gone."""
        if self.proc is None:
            return 0
        started = []
        with contextlib.suppress(psutil.Error):
            started = psutil.Process(self.proc.pid).children(recursive=True)
        if self.proc.poll() is None:
            self.proc.send_signal(signum)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        _, alive = psutil.wait_procs(started, timeout=15)
        for process in alive:
            with contextlib.suppress(psutil.Error):
                process.kill()
        assert not alive, f"left behind: {[p.cmdline() for p in alive]}"
        return code


def kill_tree(process: psutil.Process) -> list[int]:
    """kill -9 a process and everything under it, at once; their pids."""
    tree = [process, *process.children(recursive=True)]
    for member in tree:
        with contextlib.suppress(psutil.NoSuchProcess):
            member.send_signal(signal.SIGKILL)
    psutil.wait_procs(tree, timeout=30)
    return [p.pid for p in tree]
