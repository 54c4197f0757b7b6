"""Worker settings: CLI flags over FLEET_WORKER_* environment variables over defaults.

Flags the worker does not know are vLLM engine arguments and are passed through unchanged.
"""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import SettingsConfigDict

from fleetcore.cluster_auth import ClusterTokenSettings
from fleetcore.settings_cli import CliSettings, EnvOnly, Flag, Passthrough
from fleetcore.tls import ClientTLSSettings, ServerTLSSettings


class ModelSource(str, Enum):
    AUTO = "auto"  # a local path if it exists, else a Hugging Face id that vLLM downloads
    LOCAL = "local"
    HF = "hf"
    MODELSCOPE = "modelscope"


class WorkerSettings(CliSettings, ClusterTokenSettings, ClientTLSSettings, ServerTLSSettings):
    """With a certificate (`ssl_certfile`), the worker's own /health and the engine both serve
    HTTPS; the CA (`FLEET_SSL_CA_FILE`) verifies the controller and the engine."""

    model_config = SettingsConfigDict(env_prefix="FLEET_WORKER_")
    cli_prog = "fleet worker"
    cli_description = ("Run one vLLM engine pinned to a device and register it with the "
                       "controller. Unknown flags are passed to vLLM unchanged.")

    model: str = Field(description="Local path, Hugging Face id or ModelScope id.")
    model_names: Annotated[list[str], Flag("--model-name", repeat=True)] = Field(
        default_factory=list,
        description="Name the model is served as (repeatable; in the environment a JSON list). "
        "None: the folder name or id.")
    source: ModelSource = Field(
        ModelSource.AUTO,
        description="Where --model comes from; auto: a local path if it exists, else a Hugging "
        "Face id (VLLM_USE_MODELSCOPE=True means modelscope).")
    download_dir: Path | None = Field(
        None, description="Where downloaded weights are kept; none: vLLM's default.")
    controller_address: str = Field(
        "http://127.0.0.1:21001",
        description="Controller URL(s), comma-separated: the worker registers with each.")
    host: str = Field("127.0.0.1", description="Bind address of the worker's /health.")
    port: int = Field(0, ge=0, le=65535,
                      description="Port of the worker's /health and /metrics; 0: any free one.")
    engine_host: str = Field("127.0.0.1", description="Bind address of the engine.")
    engine_port: int = Field(0, ge=0, le=65535, description="Engine port; 0: a free one.")
    advertise_url: str | None = Field(
        None, description="Engine URL as other hosts reach it (multi-host setups); none: the "
        "engine's own URL.")
    worker_id: str | None = Field(None, description="Stable id; none: host and engine port.")
    gpus: Annotated[str | None, Flag(exclusive="device")] = Field(
        None, description="GPU indices, e.g. 0 or 0,1 (several: tensor parallel); sets "
        "CUDA_VISIBLE_DEVICES.")
    cpus: Annotated[str | None, Flag(exclusive="device")] = Field(
        None, description="CPU cores the engine's threads bind to, e.g. 0 or 0-3.")
    # vLLM reads VLLM_CPU_KVCACHE_SPACE as a whole number of GiB.
    cpu_kvcache_gib: int = Field(
        1, ge=1, description="KV-cache size on CPU in GiB, unless VLLM_CPU_KVCACHE_SPACE is set.")
    drain_timeout: float = Field(
        30.0, ge=0, description="Seconds to let in-flight requests finish on SIGTERM.")
    engine_start_timeout: float = Field(
        900.0, gt=0, description="Seconds the engine may take to become healthy.")
    restart_backoff_max: float = Field(
        30.0, gt=0, description="Longest wait, in seconds, before restarting a dead engine.")
    chat_template: str | None = Field(
        None, description="Jinja chat template file, or 'chatml' for the built-in ChatML "
        "template; none: the tokenizer's own, else ChatML with its stop tokens.")
    kv_events_endpoint: str | None = Field(
        None, description="Where the engine publishes its KV-cache events (a ZMQ endpoint, "
        "e.g. ipc:///run/fleet/kv-w0) for another subscriber besides the worker; none: an IPC "
        "socket in the worker's private folder.")
    log_level: str = Field("info", description="debug, info, warning or error.")
    # Set it where something besides the gateway must reach the engine with a known key, such
    # as another router in a side-by-side benchmark.
    engine_api_key: Annotated[str | None, EnvOnly()] = Field(
        None, min_length=16,
        description="The engine's API key (at least 16 characters); none: a fresh random key "
        "per start.")
    engine_args: Annotated[list[str], Passthrough()] = Field(default_factory=list)

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
