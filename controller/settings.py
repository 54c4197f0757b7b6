"""Controller settings: CLI flags over FLEET_CONTROLLER_* environment variables over defaults.

The tokens are shared with the other services, so their variables have no service prefix:
`FLEET_CLUSTER_TOKEN`, `FLEET_READ_TOKEN` (or `..._FILE`).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from pydantic import Field, model_validator
from pydantic_settings import SettingsConfigDict

from fleet.cluster_auth import ClusterTokenSettings, ReadTokenSettings, add_token_flags
from fleet.tls import ServerTLSSettings, add_server_tls_flags


class ControllerSettings(ClusterTokenSettings, ReadTokenSettings, ServerTLSSettings):
    model_config = SettingsConfigDict(env_prefix="FLEET_CONTROLLER_", populate_by_name=True)

    host: str = "127.0.0.1"
    port: int = Field(21001, ge=0, le=65535)
    heartbeat_interval: float = Field(2.0, gt=0)
    expiry: float = Field(6.0, gt=0)
    log_level: str = "info"

    @model_validator(mode="after")
    def _expiry_outlasts_heartbeats(self) -> ControllerSettings:
        if self.expiry <= self.heartbeat_interval:
            raise ValueError("expiry must be longer than the heartbeat interval")
        if self.read_token is not None and self.cluster_token is None:
            raise ValueError("a read token needs a cluster token beside it")
        return self

    @classmethod
    def from_cli(cls, argv: Sequence[str] | None = None) -> ControllerSettings:
        parser = argparse.ArgumentParser(
            prog="fleet controller", description="Run the llm-fleet controller (worker registry)."
        )
        parser.add_argument("--host", help="Bind address (default 127.0.0.1).")
        parser.add_argument("--port", type=int, help="Port (default 21001).")
        parser.add_argument(
            "--heartbeat-interval", type=float,
            help="Seconds between worker heartbeats, told to workers at registration (default 2).",
        )
        parser.add_argument(
            "--expiry", type=float,
            help="Seconds of silence after which a worker is dropped (default 6).",
        )
        add_token_flags(parser, read=True)
        add_server_tls_flags(parser)
        parser.add_argument("--log-level", help="debug, info, warning or error (default info).")
        args = parser.parse_args(argv)
        return cls(**{k: v for k, v in vars(args).items() if v is not None})

