"""Fixtures that start the real stack once per test session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import pytest

from fleet.demo_model import ensure_demo_model
from tests.integration.harness import API_KEY, Stack


@pytest.fixture(scope="session")
def model_path() -> Path:
    return ensure_demo_model(progress=False)


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Stack]:
    stack = Stack(workdir=tmp_path_factory.mktemp("stack"), model_path=model_path)
    try:
        stack.start_serving()
        yield stack
    finally:
        stack.close()


@pytest.fixture
def client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key=API_KEY, timeout=120,
                         max_retries=0)
