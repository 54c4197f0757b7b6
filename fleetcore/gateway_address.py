"""Where a client finds the gateway: its URL and API key, as every client of it takes them.

`fleet chat`, `fleet batch` (`fleet.client.settings`) and the web UI (`webui.settings`) build
their settings on it, each with its own environment prefix.
"""

from __future__ import annotations

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings


class GatewayAddress(BaseSettings):
    """The gateway's URL and key, as every client of it (these commands, the web UI) takes them."""

    gateway_url: str = Field("http://127.0.0.1:8000",
                             description="The gateway's URL, with or without /v1.")
    # A SecretStr prints as '**********', so the key stays out of reprs, logs and pages.
    api_key: SecretStr | None = Field(
        None, description="API key for the gateway (better in the environment: flags show in "
        "`ps`).")

    @field_validator("gateway_url")
    @classmethod
    def _http_url(cls, value: str) -> str:
        if not value.startswith(("http://", "https://")):
            raise ValueError("expected an http:// or https:// URL")
        return value.rstrip("/")

    @field_validator("api_key", mode="before")
    @classmethod
    def _empty_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def key(self) -> str | None:
        return self.api_key.get_secret_value() if self.api_key else None
