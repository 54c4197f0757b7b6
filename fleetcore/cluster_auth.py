"""The cluster token: who may change the controller's registry, and who may only read it.

Two shared secrets, sent as `Authorization: Bearer <token>`:
- the cluster token (`FLEET_CLUSTER_TOKEN`, or a file): workers need it to register, heartbeat
  and deregister; it also reads everything;
- an optional read token (`FLEET_READ_TOKEN`, or a file): reads the registry (what gateways and
  `fleet test-message` need, engine keys included) but cannot change it.

The settings mixins here are shared by every service that holds a token; the controller's check
is `controller.auth`.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path
from typing import Annotated

from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from fleetcore.settings_cli import EnvOnly

CLUSTER_TOKEN_ENV = "FLEET_CLUSTER_TOKEN"
READ_TOKEN_ENV = "FLEET_READ_TOKEN"
# The secrets a process that runs foreign code (the engine) must not inherit.
TOKEN_ENV_VARS = (CLUSTER_TOKEN_ENV, READ_TOKEN_ENV)
MIN_TOKEN_LENGTH = 16
# The placeholder the deploy examples ship with.
PLACEHOLDER_PREFIX = "change-me"


def read_token_file(path: Path) -> str:
    """The token in `path`, without surrounding whitespace; ValueError if unusable."""
    try:
        token = path.expanduser().read_text().strip()
    except OSError as exc:
        raise ValueError(f"cannot read the token file {path}: {exc.strerror}") from None
    if not token:
        raise ValueError(f"the token file {path} is empty")
    return token


def check_token(token: str, what: str = "cluster token") -> str:
    if len(token) < MIN_TOKEN_LENGTH:
        raise ValueError(f"the {what} is shorter than {MIN_TOKEN_LENGTH} characters; make one "
                         "with: python3 -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return token


def default_token_file() -> Path:
    """Where `fleet up` keeps the token it generates."""
    return Path.home() / ".cache" / "fleet" / "cluster-token"


def load_or_create_token_file(path: Path) -> str:
    """The token in `path`; a new random one, written there readable by this user only, if the
    file does not exist yet."""
    path = path.expanduser()
    path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    try:
        # O_EXCL: two `fleet up` starting at once cannot both write it.
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        return check_token(read_token_file(path))
    token = secrets.token_urlsafe(32)
    with os.fdopen(fd, "w") as out:
        out.write(token + "\n")
    return token


def _resolve(value: SecretStr | None, path: Path | None, what: str) -> SecretStr | None:
    if value is not None and not value.get_secret_value():
        value = None  # an empty variable means "not set"
    if path is not None:
        if value is not None:
            raise ValueError(f"give the {what} either in the environment or as a file, not both")
        value = SecretStr(read_token_file(path))
    if value is not None:
        check_token(value.get_secret_value(), what)
    return value


class ClusterTokenSettings(BaseSettings):
    """`FLEET_CLUSTER_TOKEN` or `FLEET_CLUSTER_TOKEN_FILE` (the same for every service)."""

    model_config = SettingsConfigDict(populate_by_name=True)

    cluster_token: Annotated[SecretStr | None, EnvOnly()] = Field(
        None, validation_alias=CLUSTER_TOKEN_ENV,
        description="The cluster token (at least 16 characters); none: no token.")
    cluster_token_file: Path | None = Field(
        None, validation_alias="FLEET_CLUSTER_TOKEN_FILE",
        description="File holding the cluster token, instead of FLEET_CLUSTER_TOKEN.")

    @model_validator(mode="after")
    def _load_cluster_token(self) -> ClusterTokenSettings:
        self.cluster_token = _resolve(self.cluster_token, self.cluster_token_file,
                                      "cluster token")
        return self


class ReadTokenSettings(BaseSettings):
    """`FLEET_READ_TOKEN` or `FLEET_READ_TOKEN_FILE`: reads the registry, changes nothing."""

    model_config = SettingsConfigDict(populate_by_name=True)

    read_token: Annotated[SecretStr | None, EnvOnly()] = Field(
        None, validation_alias=READ_TOKEN_ENV,
        description="A second token that reads the registry but cannot change it.")
    read_token_file: Path | None = Field(
        None, validation_alias="FLEET_READ_TOKEN_FILE",
        description="File holding the read token, instead of FLEET_READ_TOKEN.")

    @model_validator(mode="after")
    def _load_read_token(self) -> ReadTokenSettings:
        self.read_token = _resolve(self.read_token, self.read_token_file, "read token")
        return self


class ControllerCredentials(ClusterTokenSettings, ReadTokenSettings):
    """What a reader of the registry sends: its read token if it has one, else the cluster token."""

    def controller_token(self) -> str | None:
        token = self.read_token or self.cluster_token
        return token.get_secret_value() if token else None


def bearer(token: str | None) -> dict[str, str]:
    """The Authorization header for `token`; no header without one."""
    return {"Authorization": f"Bearer {token}"} if token else {}
