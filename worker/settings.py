"""Worker settings: CLI flags over FLEET_WORKER_* environment variables over defaults.

Flags the worker does not know are vLLM engine arguments and are passed through unchanged.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from enum import Enum
from pathlib import Path

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from fleet.cluster_auth import ClusterTokenSettings, add_token_flags
from fleet.tls import (
    ClientTLSSettings,
    ServerTLSSettings,
    add_client_tls_flags,
    add_server_tls_flags,
)


class ModelSource(str, Enum):
    AUTO = "auto"  # a local path if it exists, else a Hugging Face id that vLLM downloads
    LOCAL = "local"
    HF = "hf"
    MODELSCOPE = "modelscope"


class WorkerSettings(ClusterTokenSettings, ClientTLSSettings, ServerTLSSettings):
    """With a certificate (`ssl_certfile`), the worker's own /health and the engine both serve
    HTTPS; the CA (`FLEET_SSL_CA_FILE`) verifies the controller and the engine."""

    model_config = SettingsConfigDict(env_prefix="FLEET_WORKER_")

    model: str
    model_names: list[str] = Field(default_factory=list)
    source: ModelSource = ModelSource.AUTO
    download_dir: Path | None = None
    controller_address: str = "http://127.0.0.1:21001"
    host: str = "127.0.0.1"
    port: int = Field(0, ge=0, le=65535, description="The worker's own /health port; 0 = any.")
    engine_host: str = "127.0.0.1"
    engine_port: int = Field(0, ge=0, le=65535, description="0 = pick a free port.")
    advertise_url: str | None = None
    worker_id: str | None = None
    gpus: str | None = None
    cpus: str | None = None
    # vLLM reads VLLM_CPU_KVCACHE_SPACE as a whole number of GiB.
    cpu_kvcache_gib: int = Field(1, ge=1)
    drain_timeout: float = Field(30.0, ge=0)
    engine_start_timeout: float = Field(900.0, gt=0)
    restart_backoff_max: float = Field(30.0, gt=0)
    # A template file, or "chatml" for the built-in one; None: the tokenizer's own, else ChatML.
    chat_template: str | None = None
    log_level: str = "info"
    # Environment only (FLEET_WORKER_ENGINE_API_KEY), so it never shows in `ps`. Unset: a fresh
    # random key per start. Set it where something besides the gateway must reach the engine
    # with a known key, such as another router in a side-by-side benchmark.
    engine_api_key: str | None = Field(None, min_length=16)
    engine_args: list[str] = Field(default_factory=list)

    @field_validator("gpus", "cpus")
    @classmethod
    def _device_list(cls, value: str | None) -> str | None:
        if value is None:
            return None
        value = value.strip()
        allowed = set("0123456789,-")
        if not value or not set(value) <= allowed:
            raise ValueError(f"expected a list like '0' or '0,1' or '0-3', got {value!r}")
        return value

    @property
    def controller_addresses(self) -> list[str]:
        return [a.strip() for a in self.controller_address.split(",") if a.strip()]

    @property
    def device(self) -> str:
        if self.gpus is not None:
            return f"cuda:{self.gpus}"
        return f"cpu:{self.cpus}" if self.cpus is not None else "cpu"

    @classmethod
    def from_cli(cls, argv: Sequence[str] | None = None) -> WorkerSettings:
        parser = argparse.ArgumentParser(
            prog="fleet worker",
            allow_abbrev=False,
            description="Run one vLLM engine pinned to a device and register it with the "
            "controller. Unknown flags are passed to vLLM unchanged.",
        )
        parser.add_argument("--model", help="Local path, Hugging Face id or ModelScope id.")
        parser.add_argument(
            "--model-name", dest="model_names", action="append",
            help="Name the model is served as (repeatable). Default: the folder name or id.",
        )
        parser.add_argument(
            "--source", choices=[s.value for s in ModelSource],
            help="Where --model comes from (default auto; VLLM_USE_MODELSCOPE=True means "
            "modelscope).",
        )
        parser.add_argument("--download-dir", help="Where downloaded weights are kept.")
        parser.add_argument(
            "--controller-address",
            help="Controller URL(s), comma-separated: the worker registers with each "
            "(default http://127.0.0.1:21001).",
        )
        parser.add_argument("--host", help="Bind address of the worker's /health (127.0.0.1).")
        parser.add_argument("--port", type=int, help="Port of the worker's /health (0 = any).")
        parser.add_argument("--engine-host", help="Bind address of the engine (127.0.0.1).")
        parser.add_argument("--engine-port", type=int, help="Engine port (default: a free one).")
        parser.add_argument(
            "--advertise-url", help="Engine URL as other hosts reach it (multi-host setups)."
        )
        parser.add_argument("--worker-id", help="Stable id (default: host and engine port).")
        device = parser.add_mutually_exclusive_group()
        device.add_argument(
            "--gpus", help="GPU indices, e.g. 0 or 0,1 (several = tensor parallel)."
        )
        device.add_argument("--cpus", help="CPU cores the engine's threads bind to, e.g. 0 or 0-3.")
        parser.add_argument(
            "--cpu-kvcache-gib", type=int,
            help="KV-cache size on CPU in GiB, unless VLLM_CPU_KVCACHE_SPACE is set (default 1).",
        )
        parser.add_argument(
            "--drain-timeout", type=float,
            help="Seconds to let in-flight requests finish on SIGTERM (default 30).",
        )
        parser.add_argument(
            "--engine-start-timeout", type=float,
            help="Seconds the engine may take to become healthy (default 900).",
        )
        parser.add_argument(
            "--chat-template",
            help="Jinja chat template file, or 'chatml' for the built-in ChatML template "
            "(default: the tokenizer's own; ChatML with its stop tokens if it has none).",
        )
        add_token_flags(parser, read=False)
        add_server_tls_flags(parser)
        add_client_tls_flags(parser)
        parser.add_argument("--log-level", help="debug, info, warning or error (default info).")
        args, engine_args = parser.parse_known_args(argv)
        values = {k: v for k, v in vars(args).items() if v is not None}
        if engine_args:
            values["engine_args"] = engine_args
        return cls(**values)
