"""The controller is soft state: after a restart it refills from heartbeats, and the gateway
keeps routing on its last table meanwhile."""

from __future__ import annotations

import signal

import httpx
import pytest

from tests.integration.harness import API_KEY, MODEL_NAME, Stack

pytestmark = pytest.mark.integration
AUTH = {"Authorization": f"Bearer {API_KEY}"}


def gateway_controller(stack: Stack) -> str:
    """What the gateway's /health says of the controller (shown only to a key)."""
    return str(httpx.get(f"{stack.gateway_url}/health", headers=AUTH, timeout=5)
               .json()["controller"])


def test_controller_killed_and_restarted_refills_while_the_gateway_serves(stack: Stack) -> None:
    stack.stop("controller", sig=signal.SIGKILL)
    stack.wait_for(lambda: gateway_controller(stack) == "stale",
                   "the gateway to notice", 10)
    reply = httpx.post(
        f"{stack.gateway_url}/v1/chat/completions", timeout=60,
        headers={"Authorization": f"Bearer {API_KEY}"},
        json={"model": MODEL_NAME, "max_tokens": 3,
              "messages": [{"role": "user", "content": "Hi"}]},
    )
    assert reply.status_code == 200, reply.text

    stack.start_controller()
    # One heartbeat (1 s here) is enough for the worker to register again.
    stack.wait_worker_state("worker", "ready", timeout=5)
    stack.wait_for(lambda: gateway_controller(stack) == "ok",
                   "the gateway to sync again", 5)
