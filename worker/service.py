"""The worker's life cycle: start the engine, register, heartbeat, restart on crash, drain."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import socket
import tempfile
from pathlib import Path

import httpx
import uvicorn
from pydantic import HttpUrl, TypeAdapter

from controller.protocol import EnginePaths, Heartbeat, Registration, WorkerLoad, WorkerState
from fleetcore.chat_template import (
    CHATML,
    EngineTemplateFiles,
    flag_value,
    plan_template,
    write_engine_files,
)
from fleetcore.tracing import Tracing, engine_tracing_args
from worker.app import EmbeddedServer, WorkerMetrics, create_app
from worker.engine import EngineFailed, EngineProcess, build_engine_command, free_port
from worker.kv_events import KV_EVENTS_FLAG, KvBlockIndex, KvEventRelay, kv_events_args
from worker.load import PrefillMeter, parse_load
from worker.lora import LoraArgs, adapters_in, parse_lora_args
from worker.model_source import resolve_model, served_names
from worker.protocol import TokenizerFiles
from worker.registration import ControllerClient, ControllerRefused
from worker.settings import WorkerSettings
from worker.tokenizer_files import read_tokenizer_files

logger = logging.getLogger(__name__)
_ENGINE_PATHS: TypeAdapter[list[str] | None] = TypeAdapter(EnginePaths)


class Worker:
    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.state = WorkerState.STARTING
        self.load = WorkerLoad()
        self.max_model_len: int | None = None
        self.engine_paths: list[str] | None = None
        self.lora = LoraArgs()
        self.adapters: list[str] = []
        self.metrics = WorkerMetrics()
        self.model_names = served_names(settings)
        self.engine_port = settings.engine_port or free_port(settings.engine_host)
        # A fresh key per start: the engine is useless to anyone who bypasses the gateway.
        self.engine_api_key = settings.engine_api_key or secrets.token_urlsafe(32)
        self.worker_id = settings.worker_id or f"{socket.gethostname()}-{self.engine_port}"
        self.engine_url = ""
        self.chat_template: str | None = None
        # The worker's own /health, /metrics and /kv-cache: a port fixed before it serves, so
        # that the first registration can name it.
        self.port = settings.port or free_port(
            "127.0.0.1" if ":" in settings.host else settings.host)  # IPv6: probed on IPv4
        self.kv_index: KvBlockIndex | None = None
        self._kv_relay: KvEventRelay | None = None
        self.tokenizer_files: TokenizerFiles | None = None
        self._prefill = PrefillMeter()
        self.heartbeat_interval = 2.0
        self._stop = asyncio.Event()
        self._force = False
        self._state_changed = asyncio.Event()
        # The engine's /health, /metrics, /v1/models and /openapi.json, always with its key:
        # the engine answers only /health and /metrics without it (worker.engine_auth).
        self._engine_http: httpx.AsyncClient | None = None
        self._controllers: list[ControllerClient] = []
        self._refused_by: set[str] = set()  # controllers whose refusal was logged already
        self._engine: EngineProcess | None = None
        self._heartbeats: asyncio.Task[None] | None = None
        # Off unless the OTEL_* variables configure an exporter (fleetcore/tracing.py).
        self.tracing = Tracing.from_env("llm-fleet-worker")

    # -- signals ---------------------------------------------------------------------------
    def request_stop(self) -> None:
        if self._stop.is_set():
            logger.warning("second stop signal: skipping the drain")
            self._force = True
        self._stop.set()

    def _set_state(self, state: WorkerState) -> None:
        if state != self.state:
            logger.info("state worker_id=%s %s->%s", self.worker_id, self.state.value, state.value)
            self.state = state
            self.metrics.engine_up.set(1 if state in (WorkerState.READY, WorkerState.DRAINING)
                                       else 0)
            self._state_changed.set()

    # -- controller ------------------------------------------------------------------------
    def _registration(self) -> Registration:
        return Registration(
            worker_id=self.worker_id,
            engine_url=HttpUrl(self.engine_url),
            engine_api_key=self.engine_api_key,
            model_names=self.model_names,
            max_model_len=self.max_model_len,
            engine_paths=self.engine_paths,
            device=self.settings.device,
            chat_template=self.chat_template,
            kv_cache_url=HttpUrl(self.kv_cache_url) if self.kv_index is not None else None,
            lora_slots=self.lora.slots,
            lora_batch_slots=self.lora.batch_slots,
            static_adapters=self.lora.static,
            adapters=self.adapters,
            state=self.state,
            load=self.load,
        )

    @property
    def kv_cache_url(self) -> str:
        """Where gateways read /kv-cache: this worker's host as the engine's advertised URL
        names it, else as it binds (loopback for a wildcard)."""
        scheme = "https" if self.settings.uvicorn_ssl() else "http"
        host = httpx.URL(self.engine_url).host if self.settings.advertise_url else \
            self.settings.host
        if host in ("0.0.0.0", "", "::"):
            host = "127.0.0.1"
        if ":" in host:
            host = f"[{host}]"
        return f"{scheme}://{host}:{self.port}"

    async def _report_to(self, controller: ControllerClient) -> None:
        try:
            if controller.registered:
                beat = Heartbeat(state=self.state, load=self.load,
                                 max_model_len=self.max_model_len,
                                 engine_paths=self.engine_paths,
                                 adapters=self.adapters if self.lora.slots else None)
                if await controller.heartbeat(self.worker_id, beat):
                    return
                logger.info("controller forgot worker_id=%s address=%s; registering again",
                            self.worker_id, controller.address)
            answer = await controller.register(self._registration())
            self.heartbeat_interval = answer.heartbeat_interval
            self._refused_by.discard(controller.address)
        except ControllerRefused as exc:
            # A wrong token is a set-up error: say so once, loudly, and keep trying (the
            # controller may be restarted with the right token).
            if controller.address not in self._refused_by:
                self._refused_by.add(controller.address)
                logger.error("%s", exc)
        except httpx.HTTPError as exc:
            logger.warning("controller unreachable address=%s error=%r", controller.address, exc)

    async def _report(self) -> None:
        # Every controller holds the whole registry; one being down must not delay the others.
        await asyncio.gather(*(self._report_to(c) for c in self._controllers))

    async def _read_load(self) -> None:
        assert self._engine_http is not None
        if self.state not in (WorkerState.READY, WorkerState.DRAINING):
            return
        try:
            response = await self._engine_http.get(f"{self._engine_base}/metrics", timeout=2.0)
            response.raise_for_status()
            self.load = self._prefill.update(parse_load(response.text), response.text)
        except (httpx.HTTPError, ValueError) as exc:
            logger.warning("could not read engine metrics error=%r", exc)

    async def _read_adapters(self) -> None:
        """The adapters the engine holds now, from its /v1/models (adapters name a parent)."""
        assert self._engine_http is not None
        if self.lora.slots is None or self.state not in (WorkerState.READY,
                                                         WorkerState.DRAINING):
            return
        try:
            response = await self._engine_http.get(
                f"{self._engine_base}/v1/models", timeout=2.0,
                headers={"Authorization": f"Bearer {self.engine_api_key}"})
            response.raise_for_status()
            self.adapters = adapters_in(response.json())
        except (httpx.HTTPError, ValueError) as exc:
            logger.warning("could not read the engine's adapters error=%r", exc)

    async def _heartbeat_forever(self) -> None:
        while True:
            await self._read_load()
            await self._read_adapters()
            await self._report()
            # A state change is reported at once, not at the next tick.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._state_changed.wait(), self.heartbeat_interval)
            self._state_changed.clear()

    # -- engine ----------------------------------------------------------------------------
    @property
    def _engine_base(self) -> str:
        assert self._engine is not None
        return self._engine.command.base_url

    async def _read_max_model_len(self) -> None:
        assert self._engine_http is not None
        try:
            response = await self._engine_http.get(f"{self._engine_base}/v1/models", timeout=5.0)
            response.raise_for_status()
            data = response.json().get("data") or [{}]
            self.max_model_len = data[0].get("max_model_len")
        except (httpx.HTTPError, ValueError) as exc:
            logger.warning("could not read max_model_len error=%r", exc)

    async def _read_engine_paths(self) -> None:
        """What the engine serves, as its own OpenAPI spec lists it: the gateway routes each
        endpoint only to workers whose engine has it (an embedding model has no chat)."""
        assert self._engine_http is not None
        try:
            response = await self._engine_http.get(f"{self._engine_base}/openapi.json",
                                                   timeout=5.0)
            response.raise_for_status()
            paths = sorted(response.json()["paths"])
            self.engine_paths = _ENGINE_PATHS.validate_python(paths)
        except (httpx.HTTPError, ValueError, KeyError, TypeError) as exc:
            # --disable-fastapi-docs, or a spec we cannot read: the gateway then assumes chat
            # and completions, as for workers from before this was reported.
            logger.warning("could not read the engine's paths error=%r", exc)

    async def _start_engine(self) -> None:
        assert self._engine is not None and self._engine_http is not None
        if self._kv_relay is not None:
            self._kv_relay.engine_started()
        self._prefill = PrefillMeter()
        for moved in (False, True):
            try:
                await self._engine.start()
                await self._engine.wait_healthy(self._engine_http,
                                                self.settings.engine_start_timeout)
                break
            except EngineFailed as exc:
                if moved or not exc.port_taken or not self._move_engine():
                    raise
        await self._read_max_model_len()
        await self._read_engine_paths()
        self.adapters = list(self.lora.static)  # a restarted engine holds only these
        self._set_state(WorkerState.READY)

    async def _supervise(self) -> None:
        """Restart the engine with backoff whenever it dies, until asked to stop."""
        assert self._engine is not None
        backoff = 1.0
        while True:
            code = await self._engine.wait()
            self._set_state(WorkerState.UNHEALTHY)
            self.metrics.engine_restarts.inc()
            logger.error("engine died code=%s; restarting in %.0fs", code, backoff)
            await asyncio.sleep(backoff)
            try:
                await self._start_engine()
                backoff = 1.0
            except EngineFailed as exc:
                logger.error("engine restart failed: %s", exc)
                backoff = min(backoff * 2, self.settings.restart_backoff_max)

    def _move_engine(self) -> bool:
        """The engine's port was taken before it could bind it: picked free when the worker
        started (or before the engine died), it may since have gone to any process (another
        worker's engine picking a free port at the same time, an outgoing connection's source
        port). With a port of our own choosing, move to another and let the controllers learn
        the new address; False for the operator's port, which is kept."""
        if self.settings.engine_port or self.settings.advertise_url is not None:
            return False
        assert self._engine is not None
        old, self.engine_port = self.engine_port, free_port(self.settings.engine_host)
        self._engine.command = self._engine.command.on_port(self.engine_port)
        self.engine_url = self._engine.command.base_url.rstrip("/")
        for controller in self._controllers:
            controller.registered = False  # the next report registers the new address
        logger.warning("engine port %d was taken before the engine could bind it; moving to %d",
                       old, self.engine_port)
        return True

    async def _drain(self) -> None:
        assert self._engine is not None
        self._set_state(WorkerState.DRAINING)
        if self._force:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.settings.drain_timeout
        # Gateways route on a table that is up to a sync period old: give them that long to see
        # the draining state before judging the engine idle.
        grace = loop.time() + min(self.heartbeat_interval, self.settings.drain_timeout)
        while loop.time() < deadline and not self._force and self._engine.running:
            await self._read_load()
            if loop.time() >= grace and self.load.running + self.load.waiting == 0:
                return
            await asyncio.sleep(0.2)
        logger.warning("drain ended with requests in flight running=%d waiting=%d",
                       self.load.running, self.load.waiting)

    # -- main ------------------------------------------------------------------------------
    async def _template_files(self, model_path: str, workdir: Path) -> EngineTemplateFiles:
        """Choose the chat template (the tokenizer's, ChatML or --chat-template) and write the
        files that give it and its stop tokens to the engine."""
        override, engine_args = self.settings.chat_template, self.settings.engine_args
        try:
            plan = await asyncio.to_thread(plan_template, model_path, override, engine_args)
        except Exception as exc:
            if override not in (None, CHATML):
                raise  # a --chat-template file that is not there: the worker exits
            # A tokenizer that cannot be loaded: the engine will say why, more clearly.
            logger.warning("could not inspect the tokenizer model=%s error=%r", model_path, exc)
            return EngineTemplateFiles()
        self.chat_template = plan.label
        logger.info("chat template model=%s template=%s stop_token_ids=%s", model_path,
                    plan.label, list(plan.stop_token_ids))
        files = await asyncio.to_thread(write_engine_files, plan, model_path, workdir,
                                        engine_args)
        folder = Path(flag_value(engine_args, "--tokenizer") or model_path)
        try:
            self.tokenizer_files = await asyncio.to_thread(read_tokenizer_files, folder,
                                                           files.chat_template)
        except OSError as exc:
            logger.warning("could not read the tokenizer files folder=%s error=%r", folder, exc)
        return files

    def _kv_events(self, workdir: Path) -> list[str]:
        """The engine's KV events on an IPC socket in the worker's private folder (0700): no
        port to guard. A --kv-events-config of the user's own is left alone, and not relayed."""
        if flag_value(self.settings.engine_args, KV_EVENTS_FLAG) is not None:
            logger.info("--kv-events-config given: the worker does not relay KV events")
            return []
        self.kv_index = KvBlockIndex()
        endpoint = self.settings.kv_events_endpoint or f"ipc://{workdir / 'kv-events'}"
        self._kv_relay = KvEventRelay(endpoint, self.kv_index)
        return kv_events_args(self._kv_relay.endpoint)

    async def run(self) -> int:
        model_path, extra_args = await resolve_model(self.settings)
        workdir = Path(tempfile.mkdtemp(prefix="fleet-worker-"))
        try:
            template = await self._template_files(model_path, workdir)
            return await self._run(model_path, [*extra_args, *template.engine_args(),
                                                *self._kv_events(workdir)])
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    async def _run(self, model_path: str, extra_args: list[str]) -> int:
        self.lora = parse_lora_args(self.settings.engine_args)
        # The engine's spans go where ours do, unless its own arguments say otherwise.
        trace_args, trace_env = engine_tracing_args() if self.tracing else ([], {})
        if any(a.startswith("--otlp-traces-endpoint") for a in self.settings.engine_args):
            trace_args = []
        command = build_engine_command(
            model_path=model_path,
            served_names=self.model_names,
            host=self.settings.engine_host,
            port=self.engine_port,
            api_key=self.engine_api_key,
            gpus=self.settings.gpus,
            cpus=self.settings.cpus,
            cpu_kvcache_gib=self.settings.cpu_kvcache_gib,
            extra_args=[*extra_args, *trace_args, *self.settings.engine_args],
            base_env={**os.environ, **trace_env},
            **self.settings.uvicorn_ssl(),
        )
        self.engine_url = (self.settings.advertise_url or command.base_url).rstrip("/")
        self._engine = EngineProcess(command)
        server = EmbeddedServer(uvicorn.Config(
            create_app(self), host=self.settings.host, port=self.port,
            log_level="warning", access_log=False, **self.settings.uvicorn_ssl(),
        ))
        token = self.settings.cluster_token
        verify = self.settings.ssl_context()  # the given CA, for the controllers and the engine
        async with httpx.AsyncClient(verify=verify) as controller_http, \
                httpx.AsyncClient(verify=verify, headers={
                    "Authorization": f"Bearer {self.engine_api_key}"}) as engine_http:
            self._engine_http = engine_http
            self._controllers = [
                ControllerClient(address, controller_http,
                                 token=token.get_secret_value() if token else None,
                                 tracer=self.tracing.tracer if self.tracing else None)
                for address in self.settings.controller_addresses
            ]
            serving = asyncio.create_task(server.serve())
            self._heartbeats = asyncio.create_task(self._heartbeat_forever())
            relay = asyncio.create_task(self._kv_relay.run()) if self._kv_relay else None
            try:
                return await self._serve_until_stopped()
            finally:
                server.should_exit = True
                self._heartbeats.cancel()
                if relay is not None:
                    relay.cancel()
                await asyncio.gather(serving, self._heartbeats, *filter(None, [relay]),
                                     return_exceptions=True)

    async def _serve_until_stopped(self) -> int:
        assert self._engine is not None
        starting = asyncio.create_task(self._start_engine())
        stopping = asyncio.create_task(self._stop.wait())
        await asyncio.wait({starting, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if not starting.done():
            starting.cancel()
            with contextlib.suppress(asyncio.CancelledError, EngineFailed):
                await starting
            await self._shutdown()
            return 0
        stopping.cancel()
        if (exc := starting.exception()) is not None:
            logger.error("%s", exc)
            await self._shutdown()
            return 1
        logger.info("ready worker_id=%s engine=%s models=%s max_model_len=%s",
                    self.worker_id, self.engine_url, ",".join(self.model_names),
                    self.max_model_len)
        supervisor = asyncio.create_task(self._supervise())
        await self._stop.wait()
        await self._drain()
        supervisor.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await supervisor
        await self._shutdown()
        return 0

    async def _shutdown(self) -> None:
        assert self._engine is not None
        # A heartbeat after the deregistration would register the worker again.
        if self._heartbeats is not None:
            self._heartbeats.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._heartbeats
        for controller in self._controllers:
            with contextlib.suppress(httpx.HTTPError):
                await controller.deregister(self.worker_id)
        # An idle keep-alive connection would hold a TLS engine's shutdown: the server waits for
        # the client's close_notify, which httpx sends only when it next uses the connection.
        if self._engine_http is not None:
            await self._engine_http.aclose()
        await self._engine.stop()
        if self.tracing is not None:
            await asyncio.to_thread(self.tracing.shutdown)  # exports what is left
        logger.info("stopped worker_id=%s", self.worker_id)
