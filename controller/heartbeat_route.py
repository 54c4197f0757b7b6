"""The heartbeat route as plain ASGI, below FastAPI's routing: the call every worker makes
every two seconds, so at 10,000 workers the controller's main cost.

Through FastAPI a heartbeat took about 280 µs of CPU (routing, dependency solving, the body
read twice, the response model validated and serialised); here it is parsed once by its
pydantic model and answered with the record's JSON. Only a well-formed heartbeat of a known
worker is answered here: anything else (bad JSON, an unknown worker, a body too large) goes
on to FastAPI with its body replayed, so errors keep their one home and their exact shape.
It sits inside `ClusterAuthMiddleware`, which has checked the token before this reads a byte.
"""

from __future__ import annotations

from pydantic import ValidationError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from controller.protocol import Heartbeat
from controller.registry import Registry

_PREFIX, _SUFFIX = "/workers/", "/heartbeat"
# A heartbeat is a few hundred bytes; a larger body is left to FastAPI to read and judge.
_MAX_BODY = 64 * 1024
_HEADERS = [(b"content-type", b"application/json")]


class HeartbeatRoute:
    def __init__(self, app: ASGIApp, registry: Registry) -> None:
        self.app = app
        self.registry = registry

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope["path"] if scope["type"] == "http" else ""
        if scope.get("method") != "POST" or not path.startswith(_PREFIX) \
                or not path.endswith(_SUFFIX):
            await self.app(scope, receive, send)
            return
        worker_id = path[len(_PREFIX):-len(_SUFFIX)]
        chunks: list[bytes] = []
        size, more = 0, True
        while more and size <= _MAX_BODY:
            message = await receive()
            if message["type"] != "http.request":  # the client left
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
        body = b"".join(chunks)
        if not more and "/" not in worker_id and worker_id in self.registry.ids():
            try:
                beat = Heartbeat.model_validate_json(body)
            except ValidationError:
                pass
            else:
                record = self.registry.heartbeat(worker_id, beat)
                payload = record.model_dump_json().encode()
                await send({"type": "http.response.start", "status": 200,
                            "headers": [*_HEADERS,
                                        (b"content-length", str(len(payload)).encode())]})
                await send({"type": "http.response.body", "body": payload})
                return
        await self.app(scope, _replay(body, more, receive), send)


def _replay(body: bytes, more: bool, receive: Receive) -> Receive:
    """`receive` with the body read so far given back first."""
    given = False

    async def replayed() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": more}
        return await receive()

    return replayed
