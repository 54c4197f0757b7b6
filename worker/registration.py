"""The worker's side of the controller protocol: register, heartbeat, deregister."""

from __future__ import annotations

import logging

import httpx
from opentelemetry.trace import Tracer

from controller.protocol import Heartbeat, RegisterResponse, Registration
from fleetcore.cluster_auth import bearer
from fleetcore.tracing import client_span

logger = logging.getLogger(__name__)


class ControllerRefused(httpx.HTTPError):
    """The controller refused this worker's cluster token (401) or its permissions (403)."""

    def __init__(self, address: str, response: httpx.Response) -> None:
        try:
            detail = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            detail = response.text[:200]
        super().__init__(
            f"the controller at {address} refused this worker ({response.status_code}): {detail} "
            "Give the worker the controller's cluster token (FLEET_CLUSTER_TOKEN or "
            "--cluster-token-file)."
        )


class ControllerClient:
    """Talks to one controller. A 404 `unknown_worker` on heartbeat means: register again.
    With a tracer, each call is a span whose `traceparent` the controller joins."""

    def __init__(self, address: str, client: httpx.AsyncClient, timeout: float = 5.0,
                 token: str | None = None, tracer: Tracer | None = None) -> None:
        self.address = address.rstrip("/")
        self._client = client
        self._timeout = timeout
        self._auth = bearer(token)
        self._tracer = tracer
        self.registered = False

    def _check(self, response: httpx.Response) -> None:
        if response.status_code in (401, 403):
            self.registered = False
            raise ControllerRefused(self.address, response)
        response.raise_for_status()

    async def register(self, registration: Registration) -> RegisterResponse:
        headers = {"content-type": "application/json", **self._auth}
        with client_span(self._tracer, "register", headers, {
                "fleet.worker_id": registration.worker_id, "server.address": self.address}):
            response = await self._client.post(
                f"{self.address}/workers/register",
                # Defaults left out: a worker without LoRA then sends what controllers from
                # before the LoRA fields accept (their models forbid unknown fields).
                content=registration.model_dump_json(exclude_defaults=True),
                headers=headers, timeout=self._timeout)
        self._check(response)
        self.registered = True
        return RegisterResponse.model_validate_json(response.content)

    async def heartbeat(self, worker_id: str, beat: Heartbeat) -> bool:
        """Send a heartbeat; False when the controller does not know this worker."""
        headers = {"content-type": "application/json", **self._auth}
        with client_span(self._tracer, "heartbeat", headers, {
                "fleet.worker_id": worker_id, "server.address": self.address}) as span:
            response = await self._client.post(
                f"{self.address}/workers/{worker_id}/heartbeat",
                content=beat.model_dump_json(exclude_defaults=True),
                headers=headers, timeout=self._timeout)
            if span is not None:
                span.set_attribute("http.response.status_code", response.status_code)
        if response.status_code == 404:
            self.registered = False
            return False
        self._check(response)
        return True

    async def deregister(self, worker_id: str) -> None:
        response = await self._client.delete(
            f"{self.address}/workers/{worker_id}", headers=self._auth, timeout=self._timeout
        )
        if response.status_code not in (200, 404):
            self._check(response)
        self.registered = False
