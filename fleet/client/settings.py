"""Where the client commands (`fleet chat`, `fleet batch`) find the gateway.

CLI flags over FLEET_CLIENT_* environment variables over defaults. The key is better set as
FLEET_CLIENT_API_KEY: flags show in `ps`.
"""

from __future__ import annotations

from pydantic import Field
from pydantic_settings import SettingsConfigDict

from fleet.client.chat import api_base
from fleetcore.gateway_address import GatewayAddress
from fleetcore.settings_cli import CliSettings


class ClientSettings(CliSettings, GatewayAddress):
    """What `fleet chat` and `fleet batch` share."""

    model_config = SettingsConfigDict(env_prefix="FLEET_CLIENT_")

    timeout: float = Field(600.0, gt=0, description="Longest wait for the gateway, in seconds.")

    @property
    def api_base(self) -> str:
        return api_base(self.gateway_url)
