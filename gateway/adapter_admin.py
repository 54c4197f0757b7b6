"""The operator's side of LoRA: `/v1/load_lora_adapter` and `/v1/unload_lora_adapter`, with an
admin key, declare or remove an adapter for the whole fleet.

The gateway writes the declaration to every controller (`PUT /adapters/{name}`, which keeps it
in its adapters file), then knows it at once, without waiting for the next sync; workers load
it when a request first names it (gateway/adapters.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence

import aiohttp
from pydantic import ValidationError

from controller.protocol import AdapterSpec
from fleetcore.errors import (
    BadGatewayError,
    ConflictError,
    FleetError,
    InvalidRequestError,
    NotFoundError,
    ServiceUnavailableError,
)
from gateway.adapters import AdapterFleet
from gateway.protocol import LoadLoraAdapterRequest
from gateway.routing_table import RoutingTable

logger = logging.getLogger(__name__)

_TIMEOUT = aiohttp.ClientTimeout(total=5.0)


class AdapterAdmin:
    def __init__(self, table: RoutingTable, fleet: AdapterFleet,
                 session: Callable[[], aiohttp.ClientSession | None],
                 controllers: Sequence[str], headers: Mapping[str, str]) -> None:
        self._table = table
        self._fleet = fleet
        self._session = session
        self._controllers = [c.rstrip("/") for c in controllers]
        self._headers = dict(headers)

    def _base_model(self, body: LoadLoraAdapterRequest) -> str:
        snapshot = self._table.snapshot
        workers = snapshot.workers if snapshot is not None else []
        lora_bases = sorted({w.model_names[0] for w in workers if w.lora_slots})
        if body.base_model_name is not None:
            names = {n: w.model_names[0] for w in workers for n in w.model_names}
            base = names.get(body.base_model_name)
            if base is None and body.base_model_name not in (snapshot.models if snapshot
                                                             else []):
                raise NotFoundError(f"The base model '{body.base_model_name}' does not exist.",
                                    param="base_model_name", code="model_not_found")
            return base or body.base_model_name
        if len(lora_bases) == 1:
            return lora_bases[0]
        raise InvalidRequestError(
            "Say which base model the adapter is for ('base_model_name'); LoRA-enabled base "
            f"models: {', '.join(lora_bases) or 'none'}.", param="base_model_name")

    async def declare(self, body: LoadLoraAdapterRequest) -> AdapterSpec:
        name = body.lora_name
        if self._table.snapshot is not None and name in self._table.snapshot.models:
            raise ConflictError(f"'{name}' is the name of a base model.", param="lora_name",
                                code="name_taken")
        try:
            spec = AdapterSpec(name=name, source=body.lora_path,
                               base_model=self._base_model(body))
        except ValidationError as exc:
            raise InvalidRequestError(f"Not a valid adapter: {exc.errors()[0]['msg']}",
                                      param="lora_name") from None
        await self._each_controller("PUT", f"/adapters/{name}",
                                    spec.model_dump(mode="json", exclude={"name"}))
        self._fleet.declare(spec)
        logger.info("adapter declared adapter=%s base=%s source=%s", name, spec.base_model,
                    spec.source)
        return spec

    async def remove(self, name: str) -> None:
        if name not in self._fleet.catalogue:
            raise NotFoundError(f"No adapter '{name}' is declared.", param="lora_name",
                                code="adapter_not_found")
        await self._each_controller("DELETE", f"/adapters/{name}", None, missing_ok=True)
        self._fleet.forget(name)
        logger.info("adapter removed adapter=%s", name)

    async def _each_controller(self, method: str, path: str, body: object, *,
                               missing_ok: bool = False) -> None:
        """Every controller holds its own catalogue: write to all; fail if none took it."""
        session = self._session()
        if session is None:
            raise ServiceUnavailableError("The gateway is starting.")
        results = await asyncio.gather(*(self._call(session, method, c + path, body, missing_ok)
                                         for c in self._controllers), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        for error in errors:
            if isinstance(error, FleetError) and error.status_code in (400, 403, 409):
                raise error
        if len(errors) == len(results):
            raise BadGatewayError(f"No controller took the change: {errors[0]}")
        for error in errors:
            logger.warning("controller missed an adapter change path=%s error=%s", path, error)

    async def _call(self, session: aiohttp.ClientSession, method: str, url: str, body: object,
                    missing_ok: bool) -> None:
        async with session.request(method, url, json=body, headers=self._headers,
                                   timeout=_TIMEOUT) as response:
            if response.status == 200 or (missing_ok and response.status == 404):
                return
            text = (await response.text())[:300]
            if response.status in (401, 403):
                raise BadGatewayError(
                    f"The controller refused the gateway's token ({response.status}): declaring "
                    "adapters needs the cluster token, not the read token.")
            if response.status in (400, 409, 422):
                raise InvalidRequestError(f"The controller refused the adapter: {text}")
            raise BadGatewayError(f"The controller answered {response.status}: {text}")
