"""The worker's side of the controller protocol: register, heartbeat, deregister."""

from __future__ import annotations

import logging

import httpx

from controller.protocol import Heartbeat, RegisterResponse, Registration

logger = logging.getLogger(__name__)


class ControllerClient:
    """Talks to one controller. A 404 `unknown_worker` on heartbeat means: register again."""

    def __init__(self, address: str, client: httpx.AsyncClient, timeout: float = 5.0) -> None:
        self.address = address.rstrip("/")
        self._client = client
        self._timeout = timeout
        self.registered = False

    async def register(self, registration: Registration) -> RegisterResponse:
        response = await self._client.post(
            f"{self.address}/workers/register",
            content=registration.model_dump_json(),
            headers={"content-type": "application/json"},
            timeout=self._timeout,
        )
        response.raise_for_status()
        self.registered = True
        return RegisterResponse.model_validate_json(response.content)

    async def heartbeat(self, worker_id: str, beat: Heartbeat) -> bool:
        """Send a heartbeat; False when the controller does not know this worker."""
        response = await self._client.post(
            f"{self.address}/workers/{worker_id}/heartbeat",
            content=beat.model_dump_json(),
            headers={"content-type": "application/json"},
            timeout=self._timeout,
        )
        if response.status_code == 404:
            self.registered = False
            return False
        response.raise_for_status()
        return True

    async def deregister(self, worker_id: str) -> None:
        response = await self._client.delete(
            f"{self.address}/workers/{worker_id}", timeout=self._timeout
        )
        if response.status_code not in (200, 404):
            response.raise_for_status()
        self.registered = False
