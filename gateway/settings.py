"""Gateway settings: CLI flags over FLEET_GATEWAY_* environment variables over defaults."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import NoDecode, SettingsConfigDict

from fleet.cluster_auth import ControllerCredentials, add_token_flags
from fleet.tls import (
    ClientTLSSettings,
    ServerTLSSettings,
    add_client_tls_flags,
    add_server_tls_flags,
)
from gateway.validation import InputLimits


class GatewaySettings(ControllerCredentials, ClientTLSSettings, ServerTLSSettings):
    """The controller is read with the read token if given, else the cluster token; the CA
    (`FLEET_SSL_CA_FILE`) verifies the controller and the engines."""

    model_config = SettingsConfigDict(env_prefix="FLEET_GATEWAY_")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    controller_address: str = "http://127.0.0.1:21001"
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    api_keys_file: Path | None = None
    # YAML/JSON keys with names, models and limits (gateway/keys.py), checked for changes
    # every keys_reload_interval seconds off the request path.
    keys_file: Path | None = None
    keys_reload_interval: float = Field(1.0, gt=0)
    sync_interval: float = Field(1.0, gt=0)
    connect_timeout: float = Field(5.0, gt=0)
    # Longest silence allowed between two bytes from an engine (prefill of a long prompt on CPU
    # can take a while before the first byte).
    read_timeout: float = Field(600.0, gt=0)
    # How long an engine host may leave what we sent unacknowledged at the TCP level before its
    # connection is dropped (a partitioned or dead host; see gateway/engine_client.py).
    dead_peer_timeout: float = Field(10.0, ge=1)
    max_attempts: int = Field(3, ge=1, le=10)
    retry_backoff: float = Field(0.05, ge=0)
    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0)
    max_messages: int = Field(1024, ge=1)
    max_n: int = Field(16, ge=1)
    max_tokens_limit: int = Field(65536, ge=1)
    prompt_chars_per_token: float = Field(10.0, gt=0)
    routing: str = "least-load"
    routing_overrides: Annotated[dict[str, str], NoDecode] = Field(default_factory=dict)
    session_header: str = "X-Session-Id"
    cache_match_threshold: float = Field(0.5, ge=0, le=1)
    # Measured (bench/RESULTS.md, routing): at 4, two H100 engines fed 32 streams balanced so
    # often that the prefix-cache hit rate fell from 0.91 to 0.70 and TTFT p50 doubled; 16 and
    # 64 kept 0.91. 16 still bounds the queue in front of a small (CPU) engine.
    balance_abs: float = Field(16.0, ge=0)
    balance_rel: float = Field(1.5, ge=1)
    max_inflight_per_worker: int = Field(512, ge=0)
    queue_size: int = Field(1024, ge=0)
    queue_timeout: float = Field(30.0, ge=0)
    breaker_threshold: int = Field(3, ge=1)
    breaker_cooldown: float = Field(5.0, gt=0)
    log_level: str = "info"

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
        from gateway.routing import POLICIES

        for name in (self.routing, *self.routing_overrides.values()):
            if name not in POLICIES:
                raise ValueError(f"unknown routing policy {name!r}; one of {', '.join(POLICIES)}")
        return self

    @field_validator("api_keys", mode="before")
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

    @classmethod
    def from_cli(cls, argv: Sequence[str] | None = None) -> GatewaySettings:
        parser = argparse.ArgumentParser(
            prog="fleet gateway", description="Run the OpenAI-compatible llm-fleet gateway."
        )
        parser.add_argument("--host", help="Bind address (default 127.0.0.1).")
        parser.add_argument("--port", type=int, help="Port (default 8000).")
        parser.add_argument(
            "--controller-address",
            help="Controller URL(s), comma-separated (default http://127.0.0.1:21001).",
        )
        parser.add_argument(
            "--api-keys", help="Comma-separated API keys clients must send. None: no auth."
        )
        parser.add_argument("--api-keys-file", help="File with one API key per line.")
        parser.add_argument(
            "--keys-file",
            help="YAML or JSON keys file with names, models and limits ('fleet keys create'); "
            "reloaded when it changes.",
        )
        parser.add_argument("--max-body-bytes", type=int,
                            help="Largest request body, in bytes (default 33554432).")
        parser.add_argument("--max-messages", type=int,
                            help="Most messages in a chat, or prompts in a completion (1024).")
        parser.add_argument("--max-n", type=int, help="Largest 'n' (default 16).")
        parser.add_argument("--max-tokens-limit", type=int,
                            help="Largest 'max_tokens' (default 65536); the model's context "
                            "bounds it too.")
        parser.add_argument(
            "--sync-interval", type=float,
            help="Seconds between routing-table syncs from the controller (default 1).",
        )
        parser.add_argument(
            "--routing", help="least-load (default), round-robin, cache-aware or session."
        )
        parser.add_argument(
            "--routing-overrides", help="Per-model policies: MODEL=POLICY[,MODEL=POLICY...]."
        )
        parser.add_argument(
            "--max-inflight-per-worker", type=int,
            help="Requests in flight to one worker before new ones queue (default 512; 0: no "
            "cap).",
        )
        parser.add_argument("--queue-size", type=int,
                            help="Requests that may wait for a worker; past it: 429 (1024).")
        parser.add_argument("--queue-timeout", type=float,
                            help="Seconds a request may wait in the queue; then 429 (30).")
        parser.add_argument("--breaker-threshold", type=int,
                            help="Failures in a row that open a worker's breaker (3).")
        parser.add_argument("--breaker-cooldown", type=float,
                            help="Seconds before an open breaker lets one trial through (5).")
        parser.add_argument(
            "--max-attempts", type=int,
            help="Workers tried per request before the first byte (default 3).",
        )
        parser.add_argument(
            "--read-timeout", type=float,
            help="Longest silence from an engine, in seconds, before giving up (default 600).",
        )
        parser.add_argument(
            "--dead-peer-timeout", type=float,
            help="Seconds an engine host may leave the gateway's packets unanswered before its "
            "connections are dropped and their requests tried elsewhere (default 10).",
        )
        add_token_flags(parser, read=True)
        add_server_tls_flags(parser)
        add_client_tls_flags(parser)
        parser.add_argument("--log-level", help="debug, info, warning or error (default info).")
        args = parser.parse_args(argv)
        return cls(**{k: v for k, v in vars(args).items() if v is not None})
