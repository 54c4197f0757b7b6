"""TLS for every service: serving with a certificate, and verifying peers against a given CA.

Servers take `--ssl-certfile` and `--ssl-keyfile` (per service, `FLEET_<SERVICE>_SSL_*`);
clients verify against `FLEET_SSL_CA_FILE` (or `--ssl-ca-file`), else the system's CAs.
"""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

CA_FILE_ENV = "FLEET_SSL_CA_FILE"


def _readable(path: Path, what: str) -> None:
    if not path.is_file():
        raise ValueError(f"the {what} {path} does not exist or is not a file")


class ServerTLSSettings(BaseSettings):
    """A certificate and its key; both or neither."""

    ssl_certfile: Path | None = Field(None, description="Serve HTTPS with this certificate (PEM).")
    ssl_keyfile: Path | None = Field(None, description="The certificate's private key (PEM).")

    @model_validator(mode="after")
    def _cert_and_key(self) -> ServerTLSSettings:
        if (self.ssl_certfile is None) != (self.ssl_keyfile is None):
            raise ValueError("TLS needs both --ssl-certfile and --ssl-keyfile")
        if self.ssl_certfile is not None and self.ssl_keyfile is not None:
            _readable(self.ssl_certfile, "certificate file")
            _readable(self.ssl_keyfile, "key file")
        return self

    @property
    def tls(self) -> bool:
        return self.ssl_certfile is not None

    @property
    def scheme(self) -> str:
        return "https" if self.tls else "http"

    def uvicorn_ssl(self) -> dict[str, Any]:
        """uvicorn's keyword arguments for serving with the certificate (none without one)."""
        if self.ssl_certfile is None or self.ssl_keyfile is None:
            return {}
        return {"ssl_certfile": str(self.ssl_certfile), "ssl_keyfile": str(self.ssl_keyfile)}


class ClientTLSSettings(BaseSettings):
    """The CA that servers' certificates are verified against (`FLEET_SSL_CA_FILE`)."""

    model_config = SettingsConfigDict(populate_by_name=True)

    ssl_ca_file: Path | None = Field(
        None, validation_alias=CA_FILE_ENV,
        description="Verify the services' certificates against this CA (PEM); none: the "
        "system's CAs.")

    @model_validator(mode="after")
    def _ca_exists(self) -> ClientTLSSettings:
        if self.ssl_ca_file is not None:
            _readable(self.ssl_ca_file, "CA file")
        return self

    def ssl_context(self) -> ssl.SSLContext:
        return client_ssl_context(self.ssl_ca_file)


def client_ssl_context(ca_file: Path | None = None) -> ssl.SSLContext:
    """Verifies hostnames and certificates: against `ca_file`, or the system's CAs."""
    return ssl.create_default_context(cafile=str(ca_file) if ca_file else None)
