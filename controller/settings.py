"""Controller settings: CLI flags over FLEET_CONTROLLER_* environment variables over defaults.

The tokens are shared with the other services, so their variables have no service prefix:
`FLEET_CLUSTER_TOKEN`, `FLEET_READ_TOKEN` (or `..._FILE`).
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from fleetcore.cluster_auth import ClusterTokenSettings, ReadTokenSettings
from fleetcore.settings_cli import CliSettings
from fleetcore.tls import ServerTLSSettings


class ControllerSettings(CliSettings, ClusterTokenSettings, ReadTokenSettings, ServerTLSSettings):
    model_config = SettingsConfigDict(env_prefix="FLEET_CONTROLLER_", populate_by_name=True)
    cli_prog = "fleet controller"
    cli_description = "Run the llm-fleet controller (worker registry)."

    host: str = Field("127.0.0.1", description="Bind address.")
    port: int = Field(21001, ge=0, le=65535, description="Port.")
    heartbeat_interval: float = Field(
        2.0, gt=0,
        description="Seconds between worker heartbeats, told to workers at registration.")
    expiry: float = Field(6.0, gt=0,
                          description="Seconds of silence after which a worker is dropped.")
    adapters_file: Path | None = Field(
        None, description="JSON file that keeps the fleet's declared LoRA adapters across "
        "restarts; none: kept in memory only.")
    log_level: str = Field("info", description="debug, info, warning or error.")

    @model_validator(mode="after")
    def _expiry_outlasts_heartbeats(self) -> ControllerSettings:
        if self.expiry <= self.heartbeat_interval:
            raise ValueError("expiry must be longer than the heartbeat interval")
        if self.read_token is not None and self.cluster_token is None:
            raise ValueError("a read token needs a cluster token beside it")
        return self
