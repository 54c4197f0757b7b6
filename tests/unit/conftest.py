"""Unit tests see none of the caller's shared credentials: settings read them from the env."""

from __future__ import annotations

import pytest

SHARED_SETTINGS = ("FLEET_CLUSTER_TOKEN", "FLEET_CLUSTER_TOKEN_FILE", "FLEET_READ_TOKEN",
                   "FLEET_READ_TOKEN_FILE", "FLEET_SSL_CA_FILE")


@pytest.fixture(autouse=True)
def _no_shared_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SHARED_SETTINGS:
        monkeypatch.delenv(name, raising=False)
