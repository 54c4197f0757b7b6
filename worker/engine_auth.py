"""The engine's door: every request to the engine needs its key, except health and metrics.

vLLM's own `--api-key` guards only the paths under a few prefixes (`/v1`, `/v2`, `/inference`,
and `/cohere` in 0.32) and lets OPTIONS through; the rest of what it serves answers anyone:
`/invocations` runs chat and completion requests, `/tokenize`, `/pooling` and `/score` compute,
and `/pause`, `/sleep`, `/collective_rpc` or weight updates change the engine where a version or
`VLLM_SERVER_DEV_MODE` adds them. The worker hands this class to vLLM as
`--middleware worker.engine_auth.EngineKeyMiddleware`; vLLM adds it after its own, so it wraps
every route vLLM, its plugins or a later version register. It knows no path but the two open
ones, so a path added later is closed.

Open without a key: `GET` and `HEAD` of exactly `/health` (what the worker polls while the
engine starts, and what probes read) and `/metrics` (the worker's load reports, Prometheus).
Not `/ping` (SageMaker's health check, which nothing here uses) nor `/version`, `/load` or
`/server_info`: they tell a stranger more than whether the engine is up. Everything else, every
method (OPTIONS too) and websockets, needs `Authorization: Bearer <key>`, the key the worker
puts in the engine's environment (`VLLM_API_KEY`); otherwise 401 with the OpenAI error body,
before the request reaches vLLM, so its body is never read.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
from collections.abc import Awaitable

from starlette.types import ASGIApp, Receive, Scope, Send

from fleetcore.errors import AuthenticationError, error_response

logger = logging.getLogger(__name__)

KEY_ENV = "VLLM_API_KEY"
OPEN_PATHS = frozenset({"/health", "/metrics"})
OPEN_METHODS = frozenset({"GET", "HEAD"})
_HEADER = b"authorization"
_MESSAGES = {
    "missing_api_key": "The engine needs its key: send 'Authorization: Bearer <key>'.",
    "invalid_authorization": "The Authorization header must be 'Bearer <key>'.",
    "invalid_api_key": "The engine's key is not valid.",
}


def _digest(key: bytes) -> bytes:
    # Equal-length digests: compare_digest then takes the same time whatever the key's length.
    return hashlib.sha256(key).digest()


class EngineKeyMiddleware:
    """Pure ASGI; vLLM builds it with the app alone, so the key comes from the environment.

    No key there is a set-up error, and the engine must not start open: construction fails,
    and vLLM with it.
    """

    def __init__(self, app: ASGIApp, key: str | None = None) -> None:
        key = os.environ.get(KEY_ENV) if key is None else key
        if not key:
            raise RuntimeError(f"{KEY_ENV} is not set: the engine would answer anyone; the "
                               "worker sets it for the engines it starts")
        self.app = app
        self._digest = _digest(key.encode())

    def _authorized(self, scope: Scope) -> str | None:
        """None for the engine's key; else the refusal's code."""
        for name, value in scope["headers"]:
            if name == _HEADER:
                scheme, _, token = value.partition(b" ")
                if scheme.lower() != b"bearer" or not token:
                    return "invalid_authorization"
                # As vLLM's own check reads the header: latin-1 on the wire, the key in UTF-8.
                given = _digest(token.decode("latin-1").encode())
                return None if hmac.compare_digest(given, self._digest) else "invalid_api_key"
        return "missing_api_key"

    def __call__(self, scope: Scope, receive: Receive, send: Send) -> Awaitable[None]:
        # Not a coroutine itself: it hands back the app's, so the request's coroutine chain is
        # no deeper than without the door, and every resumption of a stream costs the same.
        kind = scope["type"]
        if kind not in ("http", "websocket") or (
            kind == "http" and scope["method"] in OPEN_METHODS and scope["path"] in OPEN_PATHS
        ):
            return self.app(scope, receive, send)
        refusal = self._authorized(scope)
        if refusal is None:
            return self.app(scope, receive, send)
        return self._refuse(scope, receive, send, refusal)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, code: str) -> None:
        client = scope.get("client") or ("-",)
        logger.warning("engine refused method=%s path=%s client=%s code=%s",
                       scope.get("method", "WEBSOCKET"), scope["path"], client[0], code)
        error = AuthenticationError(_MESSAGES[code], code=code,
                                    headers={"WWW-Authenticate": "Bearer"})
        # On a websocket this is the handshake's HTTP denial (ASGI's websocket.http.response).
        await error_response(error)(scope, receive, send)
