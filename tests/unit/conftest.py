"""Unit tests see none of the caller's shared credentials (settings read them from the env)
or OTEL_* variables, and each gets 60 s."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_SETTINGS = ("FLEET_CLUSTER_TOKEN", "FLEET_CLUSTER_TOKEN_FILE", "FLEET_READ_TOKEN",
                   "FLEET_READ_TOKEN_FILE", "FLEET_SSL_CA_FILE")


@pytest.fixture(autouse=True)
def _no_shared_credentials(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in SHARED_SETTINGS:
        monkeypatch.delenv(name, raising=False)
    # Nor its OpenTelemetry set-up: services trace when OTEL_* variables ask them to.
    for name in [n for n in os.environ if n.startswith("OTEL_")]:
        monkeypatch.delenv(name)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Unit tests get 60 s, not the default 600 (the slowest takes about 3 s): a hang in pure
    logic shows in a minute. This hook sees the whole session's items, hence the path test."""
    here = Path(__file__).parent
    for item in items:
        if item.path.is_relative_to(here) and item.get_closest_marker("timeout") is None:
            item.add_marker(pytest.mark.timeout(60))
