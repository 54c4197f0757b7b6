"""Web UI settings: CLI flags over FLEET_WEBUI_* environment variables over defaults."""

from __future__ import annotations

from pathlib import Path

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from fleetcore.gateway_address import GatewayAddress
from fleetcore.settings_cli import CliSettings
from fleetcore.tls import ClientTLSSettings, ServerTLSSettings


class WebUISettings(CliSettings, ClientTLSSettings, ServerTLSSettings, GatewayAddress):
    model_config = SettingsConfigDict(env_prefix="FLEET_WEBUI_")
    cli_prog = "fleet webui"
    cli_description = "Run the Gradio chat UI in front of the gateway."

    host: str = Field("127.0.0.1", description="Bind address.")
    port: int = Field(7860, ge=0, le=65535, description="Port.")
    connect_timeout: float = Field(5.0, gt=0, description="Seconds to connect to the gateway.")
    timeout: float = Field(
        120.0, gt=0, description="Longest silence from the gateway, in seconds: before the "
        "first token (queueing, prefill) and between two tokens.")
    max_retries: int = Field(
        0, ge=0, le=5, description="Retries of a failed request to the gateway (the OpenAI "
        "client's).")
    concurrency: int = Field(
        32, ge=1, description="Chats streamed at once (Gradio's queue concurrency: events run "
        "at once per handler).")
    log_dir: Path | None = Field(
        None, description="Write finished turns and 👍/👎/flag feedback as JSON lines into "
        "this folder; none: no log, no buttons.")
    system_prompt: str = Field("You are a helpful assistant.",
                               description="The page's default system prompt.")
    temperature: float = Field(0.7, ge=0, le=2, description="The page's default temperature.")
    top_p: float = Field(1.0, gt=0, le=1, description="The page's default top p.")
    max_tokens: int = Field(512, ge=1, description="The page's default max output tokens.")
    max_tokens_limit: int = Field(4096, ge=1,
                                  description="The top of the max-output-tokens slider.")
    title: str = Field("llm-fleet chat", description="Page title.")
    log_level: str = Field("info", description="debug, info, warning or error.")

    @property
    def api_base(self) -> str:
        """The OpenAI base URL: the gateway's URL ending in /v1, whichever way it was given."""
        return self.gateway_url if self.gateway_url.endswith("/v1") else f"{self.gateway_url}/v1"
