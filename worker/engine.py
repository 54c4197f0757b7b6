"""The engine: vLLM's own OpenAI-compatible server, run as a child process pinned to a device."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import httpx

from fleetcore.cluster_auth import TOKEN_ENV_VARS
from worker.engine_auth import KEY_ENV, EngineKeyMiddleware
from worker.engine_guard import PARENT_ENV

logger = logging.getLogger(__name__)

ENGINE_MODULE = "vllm.entrypoints.openai.api_server"
GUARD_MODULE = "worker.engine_guard"
# vLLM imports it by this path, in the engine's process: the same interpreter, environment and
# working directory as the guard, which imported `worker` to start at all.
AUTH_MIDDLEWARE = f"{EngineKeyMiddleware.__module__}.{EngineKeyMiddleware.__qualname__}"


# What the engine prints when its --host/--port is taken: vLLM binds the socket itself
# (Python's OSError), older releases left it to uvicorn. (ZeroMQ's own "Address already in
# use", for a KV-events endpoint, is neither: another API port would not help it.)
_PORT_TAKEN = ("[Errno 98] Address already in use", "error while attempting to bind on address")


class EngineFailed(RuntimeError):
    """The engine exited or never became healthy; carries the end of its output."""

    def __init__(self, message: str, output_tail: Sequence[str] = ()) -> None:
        tail = "\n".join(output_tail)
        super().__init__(f"{message}\n--- last engine output ---\n{tail}" if tail else message)
        self.output_tail = list(output_tail)

    @property
    def port_taken(self) -> bool:
        """Whether it failed because another process held its API port."""
        output = "\n".join(self.output_tail)
        return any(marker in output for marker in _PORT_TAKEN)


@dataclass
class EngineCommand:
    argv: list[str]
    env: dict[str, str]
    base_url: str  # where this host reaches the engine

    def on_port(self, port: int) -> EngineCommand:
        """The same engine, serving on `port`."""
        argv = list(self.argv)
        argv[argv.index("--port", argv.index(ENGINE_MODULE)) + 1] = str(port)
        return EngineCommand(argv, self.env, f"{self.base_url.rsplit(':', 1)[0]}:{port}")


def _has_flag(args: Sequence[str], flag: str) -> bool:
    return any(a == flag or a.startswith(flag + "=") for a in args)


def build_engine_command(
    *,
    model_path: str,
    served_names: Sequence[str],
    host: str,
    port: int,
    api_key: str,
    gpus: str | None,
    cpus: str | None,
    cpu_kvcache_gib: int,
    extra_args: Sequence[str],
    base_env: Mapping[str, str],
    python: str = sys.executable,
    ssl_certfile: str | None = None,
    ssl_keyfile: str | None = None,
) -> EngineCommand:
    """The engine's argv and environment, with the device pinning applied.

    The API key goes in the environment (`VLLM_API_KEY`), not the argv: any local user can read
    a command line, and vLLM logs its non-default arguments. vLLM's own check reads it there and
    guards its API prefixes; `worker.engine_auth` reads it too and guards every other path. Its
    `--middleware` comes after the extra arguments: vLLM adds middleware in the order given,
    the last outermost, so a middleware of the user's runs only for requests with the key. The
    cluster tokens stay out of the engine's environment: it runs model code and needs none.
    """
    argv = [
        python, "-m", GUARD_MODULE, "--",
        python, "-m", ENGINE_MODULE,
        "--model", model_path,
        "--served-model-name", *served_names,
        "--host", host,
        "--port", str(port),
        # Heartbeats read /metrics every second or two; that is not worth a log line each.
        "--disable-uvicorn-access-log",
    ]
    if ssl_certfile and ssl_keyfile:
        argv += ["--ssl-certfile", ssl_certfile, "--ssl-keyfile", ssl_keyfile]
    env = {k: v for k, v in base_env.items() if k not in TOKEN_ENV_VARS}
    env[KEY_ENV] = api_key
    if gpus is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpus
        count = len(gpus.split(","))
        if count > 1 and not _has_flag(extra_args, "--tensor-parallel-size") and not _has_flag(
            extra_args, "-tp"
        ):
            argv += ["--tensor-parallel-size", str(count)]
    else:
        if cpus is not None:
            env["VLLM_CPU_OMP_THREADS_BIND"] = cpus
        # vLLM's CPU backend otherwise tries to reserve more memory than most machines have.
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(cpu_kvcache_gib))
    argv += [*extra_args, "--middleware", AUTH_MIDDLEWARE]
    if "--enable-lora" in argv:
        # The gateway places adapters at run time through vLLM's load/unload endpoints, which
        # exist only with this set; they sit behind the engine's API key like the rest.
        env.setdefault("VLLM_ALLOW_RUNTIME_LORA_UPDATING", "True")
    connect_host = "127.0.0.1" if host in ("0.0.0.0", "") else host
    if ":" in connect_host and not connect_host.startswith("["):
        connect_host = f"[{connect_host}]"
    scheme = "https" if ssl_certfile and ssl_keyfile else "http"
    return EngineCommand(argv=argv, env=env, base_url=f"{scheme}://{connect_host}:{port}")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host if host not in ("0.0.0.0", "") else "", 0))
        return int(s.getsockname()[1])


@dataclass
class EngineProcess:
    command: EngineCommand
    _proc: asyncio.subprocess.Process | None = None
    _pump: asyncio.Task[None] | None = None
    tail: collections.deque[str] = field(default_factory=lambda: collections.deque(maxlen=60))

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.returncode is None

    async def start(self) -> None:
        self.tail.clear()
        logger.info("starting engine argv=%s", " ".join(self.command.argv))
        self._proc = await asyncio.create_subprocess_exec(
            *self.command.argv,
            # The guard's parent is this process, which in a container is PID 1.
            env={**self.command.env, PARENT_ENV: str(os.getpid())},
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            # Its own process group, so stop() reaches vLLM's engine-core children too; the
            # guard kills that group if the worker dies.
            start_new_session=True,
        )
        self._pump = asyncio.create_task(self._pump_output())

    async def _pump_output(self) -> None:
        assert self._proc is not None and self._proc.stdout is not None
        out = sys.stderr
        while True:
            line = await self._proc.stdout.readline()
            if not line:
                return
            text = line.decode(errors="replace").rstrip()
            self.tail.append(text)
            out.write(f"[engine] {text}\n")
            out.flush()

    async def _main_exited(self) -> int:
        # Not Process.wait(): asyncio's wait also waits for the output pipe to close, and vLLM's
        # engine-core processes hold it open after the API server dies. The child watcher sets
        # returncode without an awaitable of its own, hence the poll.
        assert self._proc is not None
        while self._proc.returncode is None:  # noqa: ASYNC110
            await asyncio.sleep(0.2)
        return self._proc.returncode

    async def wait(self) -> int:
        """Wait for the engine's main process to exit; its process group goes with it."""
        assert self._proc is not None
        code = await self._main_exited()
        self._signal_group(signal.SIGKILL)
        for waitable in (self._proc.wait(), self._pump):
            if waitable is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(waitable, timeout=5)
        return code

    async def wait_healthy(self, client: httpx.AsyncClient, timeout: float) -> None:
        """Poll /health until 200; raise EngineFailed if the engine exits or the time runs out."""
        assert self._proc is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        url = f"{self.command.base_url}/health"
        while True:
            if self._proc.returncode is not None:
                code = await self.wait()
                raise EngineFailed(f"engine exited with code {code} before it was ready",
                                   list(self.tail))
            with contextlib.suppress(httpx.HTTPError):
                response = await client.get(url, timeout=2.0)
                if response.status_code == 200:
                    return
            if loop.time() > deadline:
                await self.stop()
                raise EngineFailed(f"engine not healthy after {timeout:.0f}s", list(self.tail))
            await asyncio.sleep(0.5)

    async def stop(self, timeout: float = 20.0) -> int | None:
        """SIGTERM the engine's process group; SIGKILL what is left after `timeout`."""
        if self._proc is None:
            return None
        if self._proc.returncode is None:
            self._signal_group(signal.SIGTERM)
            try:
                await asyncio.wait_for(self._main_exited(), timeout=timeout)
            except asyncio.TimeoutError:
                logger.warning("engine ignored SIGTERM for %.0fs; killing it", timeout)
        return await self.wait()

    def _signal_group(self, sig: int) -> None:
        assert self._proc is not None
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self._proc.pid, sig)
