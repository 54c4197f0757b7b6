"""Gateway settings: CLI flags over FLEET_GATEWAY_* environment variables over defaults."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from fleetcore.cluster_auth import ControllerCredentials
from fleetcore.settings_cli import CliSettings
from fleetcore.tls import ClientTLSSettings, ServerTLSSettings
from gateway.validation import InputLimits


class GatewaySettings(CliSettings, ControllerCredentials, ClientTLSSettings, ServerTLSSettings):
    """The controller is read with the read token if given, else the cluster token; the CA
    (`FLEET_SSL_CA_FILE`) verifies the controller and the engines."""

    model_config = SettingsConfigDict(env_prefix="FLEET_GATEWAY_")
    cli_prog = "fleet gateway"
    cli_description = "Run the OpenAI-compatible llm-fleet gateway."

    host: str = Field("127.0.0.1", description="Bind address.")
    port: int = Field(8000, ge=0, le=65535, description="Port.")
    controller_address: str = Field("http://127.0.0.1:21001",
                                    description="Controller URL(s), comma-separated.")
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Comma-separated API keys clients must send (every model, no limits); none "
        "here, in --api-keys-file and in --keys-file: no auth.")
    api_keys_file: Path | None = Field(None, description="File with one API key per line.")
    # Checked for changes every keys_reload_interval seconds off the request path.
    keys_file: Path | None = Field(
        None, description="YAML or JSON keys file with names, models and limits ('fleet keys "
        "create'); reloaded when it changes.")
    keys_reload_interval: float = Field(
        1.0, gt=0, description="Seconds between checks of --keys-file for changes.")
    sync_interval: float = Field(
        1.0, gt=0, description="Seconds between routing-table syncs from the controller.")
    connect_timeout: float = Field(
        5.0, gt=0, description="Seconds to connect to an engine.")
    # Prefill of a long prompt on CPU can take a while before the first byte.
    read_timeout: float = Field(
        600.0, gt=0,
        description="Longest silence from an engine, in seconds, before giving up (504).")
    # What we sent left unacknowledged at the TCP level: a partitioned or dead host (see
    # gateway/engine_client.py).
    dead_peer_timeout: float = Field(
        10.0, ge=1, description="Seconds an engine host may leave the gateway's packets "
        "unanswered before its connections are dropped and their requests tried elsewhere.")
    # Mid-stream silence is not a prefill: once tokens flow, a long pause means a stuck engine.
    stall_timeout: float = Field(
        30.0, gt=0, description="Seconds a running stream may go silent before it is "
        "continued on another worker (streams that can be continued; the others wait for "
        "--read-timeout).")
    max_continuations: int = Field(
        2, ge=0, le=10, description="Times one stream may be continued on another worker "
        "after its worker failed mid-answer; 0: off.")
    max_attempts: int = Field(3, ge=1, le=10,
                              description="Workers tried per request before its first byte.")
    retry_backoff: float = Field(
        0.05, ge=0, description="Seconds before the first retry; doubled for each further one, "
        "with jitter.")
    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0,
                                description="Largest request body, in bytes.")
    max_messages: int = Field(1024, ge=1,
                              description="Most messages in a chat, or prompts in a completion.")
    max_n: int = Field(16, ge=1, description="Largest 'n'.")
    max_tokens_limit: int = Field(
        65536, ge=1, description="Largest 'max_tokens'; the model's context bounds it too.")
    prompt_chars_per_token: float = Field(
        10.0, gt=0, description="Characters per token assumed when a prompt's length is "
        "checked before the engine counts its tokens.")
    routing: str = Field("least-load",
                         description="least-load, round-robin, cache-aware or session.")
    routing_overrides: Annotated[dict[str, str], NoDecode] = Field(
        default_factory=dict, description="Per-model policies: MODEL=POLICY[,MODEL=POLICY...].")
    session_header: str = Field(
        "X-Session-Id",
        description="Header with the session key the session policy routes by (else the body's "
        "'user').")
    max_inflight_per_worker: int = Field(
        512, ge=0, description="Requests in flight to one worker before new ones queue; 0: no "
        "cap.")
    queue_size: int = Field(
        1024, ge=0, description="Requests that may wait for a worker; past it: 429.")
    queue_timeout: float = Field(
        30.0, ge=0, description="Seconds a request may wait in the queue; then 429.")
    breaker_threshold: int = Field(
        3, ge=1, description="Failures in a row that open a worker's breaker.")
    breaker_cooldown: float = Field(
        5.0, gt=0, description="Seconds before an open breaker lets one trial through.")
    shared_state: str | None = Field(
        None, description="redis://HOST:PORT[/DB] that several gateways share: key rate limits "
        "fleet-wide, each worker's in-flight requests and prefix placement; none: this gateway "
        "alone.")
    shared_state_interval: float = Field(
        0.1, gt=0, le=5, description="Seconds between exchanges of in-flight counts and "
        "placements through --shared-state.")
    shared_state_timeout: float = Field(
        0.25, gt=0, le=10, description="Seconds one call to --shared-state may take before the "
        "gateway goes on alone.")
    admin_api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Comma-separated admin keys: they may use every "
        "model and declare or remove LoRA adapters.")
    lora_placement: str = Field(
        "demand", description="Where LoRA adapters are loaded: demand (where they are held, "
        "else a free slot on the worker whose adapters draw the least demand, else in place of "
        "the coldest idle one; hot ones spread) or naive (on whichever worker least-load "
        "picks).")
    adapter_wait_timeout: float = Field(
        30.0, gt=0, description="Seconds a request may wait for its adapter to be loaded; "
        "then 503 with Retry-After.")
    adapter_spread_at: int = Field(
        4, ge=1, description="Requests in flight per copy of an adapter at which it is loaded "
        "on one more worker, in place of another adapter if need be.")
    adapter_spread_free_at: int = Field(
        2, ge=1, description="Requests in flight per copy of an adapter at which it is loaded "
        "on one more worker that has a free slot for it (no adapter unloaded for it).")
    adapter_batch_aware: bool = Field(
        False, description="Among the workers that hold an adapter, send its requests first to "
        "one whose engine has a batch slot (--max-loras) free for it; off: by load alone (on "
        "the CPU bench the two are even).")
    adapter_shrink_after: float = Field(
        30.0, gt=0, description="Seconds idle after which a second (third, ...) copy of an "
        "adapter is unloaded.")
    log_level: str = Field("info", description="debug, info, warning or error.")

    @field_validator("shared_state")
    @classmethod
    def _redis_url(cls, value: str | None) -> str | None:
        if value is not None and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError("expected redis://HOST:PORT[/DB], rediss://... or unix://PATH")
        return value or None

    @property
    def controller_addresses(self) -> list[str]:
        return [a.strip() for a in self.controller_address.split(",") if a.strip()]

    @field_validator("routing_overrides", mode="before")
    @classmethod
    def _split_overrides(cls, value: object) -> object:
        if isinstance(value, str):
            pairs = [p.strip() for p in value.split(",") if p.strip()]
            if any("=" not in p for p in pairs):
                raise ValueError("expected MODEL=POLICY[,MODEL=POLICY...]")
            return dict(p.split("=", 1) for p in pairs)
        return value

    @model_validator(mode="after")
    def _known_policies(self) -> GatewaySettings:
        from gateway.lora_placement import PLACEMENTS
        from gateway.routing import POLICIES

        for name in (self.routing, *self.routing_overrides.values()):
            if name not in POLICIES:
                raise ValueError(f"unknown routing policy {name!r}; one of {', '.join(POLICIES)}")
        if self.lora_placement not in PLACEMENTS:
            raise ValueError(f"unknown LoRA placement {self.lora_placement!r}; one of "
                             f"{', '.join(PLACEMENTS)}")
        return self

    @field_validator("api_keys", "admin_api_keys", mode="before")
    @classmethod
    def _split_keys(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    def load_keys(self) -> set[str]:
        keys = set(self.api_keys)
        if self.api_keys_file is not None:
            for line in self.api_keys_file.read_text().splitlines():
                line = line.strip()
                if line and not line.startswith("#"):
                    keys.add(line)
        return keys

    def input_limits(self) -> InputLimits:
        return InputLimits(
            max_body_bytes=self.max_body_bytes, max_messages=self.max_messages,
            max_n=self.max_n, max_tokens=self.max_tokens_limit,
            prompt_chars_per_token=self.prompt_chars_per_token,
        )
