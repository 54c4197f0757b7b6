"""Gateway settings: CLI flags over FLEET_GATEWAY_* environment variables over defaults."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class GatewaySettings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="FLEET_GATEWAY_")

    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    controller_address: str = "http://127.0.0.1:21001"
    api_keys: Annotated[list[str], NoDecode] = Field(default_factory=list)
    api_keys_file: Path | None = None
    sync_interval: float = Field(1.0, gt=0)
    connect_timeout: float = Field(5.0, gt=0)
    # Longest silence allowed between two bytes from an engine (prefill of a long prompt on CPU
    # can take a while before the first byte).
    read_timeout: float = Field(600.0, gt=0)
    max_attempts: int = Field(3, ge=1, le=10)
    max_body_bytes: int = Field(32 * 1024 * 1024, gt=0)
    log_level: str = "info"

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

    @classmethod
    def from_cli(cls, argv: Sequence[str] | None = None) -> GatewaySettings:
        parser = argparse.ArgumentParser(
            prog="fleet gateway", description="Run the OpenAI-compatible llm-fleet gateway."
        )
        parser.add_argument("--host", help="Bind address (default 127.0.0.1).")
        parser.add_argument("--port", type=int, help="Port (default 8000).")
        parser.add_argument(
            "--controller-address", help="Controller URL (default http://127.0.0.1:21001)."
        )
        parser.add_argument(
            "--api-keys", help="Comma-separated API keys clients must send. None: no auth."
        )
        parser.add_argument("--api-keys-file", help="File with one API key per line.")
        parser.add_argument(
            "--sync-interval", type=float,
            help="Seconds between routing-table syncs from the controller (default 1).",
        )
        parser.add_argument(
            "--max-attempts", type=int,
            help="Workers tried per request before the first byte (default 3).",
        )
        parser.add_argument(
            "--read-timeout", type=float,
            help="Longest silence from an engine, in seconds, before giving up (default 600).",
        )
        parser.add_argument("--log-level", help="debug, info, warning or error (default info).")
        args = parser.parse_args(argv)
        return cls(**{k: v for k, v in vars(args).items() if v is not None})
