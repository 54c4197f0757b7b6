"""Web UI settings: CLI flags over FLEET_WEBUI_* environment variables over defaults."""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from fleet.client.settings import GatewayAddress
from fleet.tls import (
    ClientTLSSettings,
    ServerTLSSettings,
    add_client_tls_flags,
    add_server_tls_flags,
)


class WebUISettings(ClientTLSSettings, ServerTLSSettings, GatewayAddress):
    model_config = SettingsConfigDict(env_prefix="FLEET_WEBUI_")

    host: str = "127.0.0.1"
    port: int = Field(7860, ge=0, le=65535)
    connect_timeout: float = Field(5.0, gt=0)
    # Longest silence from the gateway, in seconds: before the first token (queueing, prefill)
    # and between two tokens.
    timeout: float = Field(120.0, gt=0)
    max_retries: int = Field(0, ge=0, le=5)
    # Events Gradio runs at once per handler: each streaming chat is one.
    concurrency: int = Field(32, ge=1)
    log_dir: Path | None = None
    system_prompt: str = "You are a helpful assistant."
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_tokens: int = Field(512, ge=1)
    # The top of the max-tokens slider.
    max_tokens_limit: int = Field(4096, ge=1)
    title: str = "llm-fleet chat"
    log_level: str = "info"

    @property
    def api_base(self) -> str:
        """The OpenAI base URL: the gateway's URL ending in /v1, whichever way it was given."""
        return self.gateway_url if self.gateway_url.endswith("/v1") else f"{self.gateway_url}/v1"

    @classmethod
    def from_cli(cls, argv: Sequence[str] | None = None) -> WebUISettings:
        parser = argparse.ArgumentParser(
            prog="fleet webui", description="Run the Gradio chat UI in front of the gateway."
        )
        parser.add_argument("--host", help="Bind address (default 127.0.0.1).")
        parser.add_argument("--port", type=int, help="Port (default 7860).")
        parser.add_argument("--gateway-url",
                            help="The gateway's URL, with or without /v1 (default "
                            "http://127.0.0.1:8000).")
        parser.add_argument("--api-key", help="API key for the gateway (better: set "
                            "FLEET_WEBUI_API_KEY, which stays out of the process list).")
        parser.add_argument("--timeout", type=float,
                            help="Longest silence from the gateway in seconds (default 120).")
        parser.add_argument("--concurrency", type=int,
                            help="Chats streamed at once (Gradio queue concurrency, default 32).")
        parser.add_argument("--log-dir", help="Write finished turns and 👍/👎/flag feedback "
                            "as JSON lines into this folder (default: no log, no buttons).")
        parser.add_argument("--system-prompt", help="Default system prompt.")
        parser.add_argument("--max-tokens", type=int,
                            help="Default max output tokens (default 512).")
        parser.add_argument("--max-tokens-limit", type=int,
                            help="Top of the max-output-tokens slider (default 4096).")
        parser.add_argument("--title", help="Page title.")
        add_server_tls_flags(parser)
        add_client_tls_flags(parser)
        parser.add_argument("--log-level", help="debug, info, warning or error (default info).")
        args = parser.parse_args(argv)
        return cls(**{k: v for k, v in vars(args).items() if v is not None})
