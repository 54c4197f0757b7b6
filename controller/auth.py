"""Who may call the controller: the cluster token writes and reads, the read token only reads.

`ClusterAuthMiddleware` checks every request before routing, so nothing is read from an
unauthenticated client (not even a body), and a route added later is closed by default: only
`OPEN_PATHS` (health, metrics, the API docs) answer without a token.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterable
from enum import Enum
from typing import Any

from fastapi import FastAPI
from fastapi.security.utils import get_authorization_scheme_param
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from fleetcore.cluster_auth import PLACEHOLDER_PREFIX
from fleetcore.errors import (
    AuthenticationError,
    ErrorResponse,
    FleetError,
    PermissionDeniedError,
    error_response,
)

logger = logging.getLogger(__name__)

OPEN_PATHS = frozenset({"/health", "/metrics", "/docs", "/docs/oauth2-redirect", "/redoc",
                        "/openapi.json"})
_READ_METHODS = frozenset({"GET", "HEAD"})
SECURITY_SCHEME = "ClusterToken"


class Access(str, Enum):
    READ = "read"
    WRITE = "write"


def _digest(token: str) -> bytes:
    # Equal-length digests: compare_digest then takes the same time whatever the token's length.
    return hashlib.sha256(token.encode()).digest()


class ClusterAuth:
    """Checks a bearer token against the cluster token and the optional read token."""

    def __init__(self, cluster_token: str | None, read_token: str | None = None) -> None:
        if read_token and not cluster_token:
            raise ValueError("a read token needs a cluster token beside it")
        self._cluster = _digest(cluster_token) if cluster_token else None
        self._read = _digest(read_token) if read_token else None
        if cluster_token is None:
            logger.warning(
                "no cluster token (FLEET_CLUSTER_TOKEN or --cluster-token-file): anyone who can "
                "reach the controller can register workers and read the engines' API keys; use "
                "this for local development only"
            )
        elif any(t and t.startswith(PLACEHOLDER_PREFIX) for t in (cluster_token, read_token)):
            logger.warning("the cluster or read token is the placeholder '%s...': replace it",
                           PLACEHOLDER_PREFIX)

    @property
    def enabled(self) -> bool:
        return self._cluster is not None

    def check(self, token: str | None, access: Access) -> None:
        """Raise 401 for a missing or unknown token, 403 for the read token asked to write."""
        if self._cluster is None:
            return
        if not token:
            raise AuthenticationError(
                "This controller call needs the cluster token: send "
                "'Authorization: Bearer <token>'.",
                code="missing_cluster_token", headers={"WWW-Authenticate": "Bearer"},
            )
        given = _digest(token)
        # Both comparisons always run, so timing does not tell which token was near.
        is_cluster = hmac.compare_digest(given, self._cluster)
        is_read = self._read is not None and hmac.compare_digest(given, self._read)
        if is_cluster:
            return
        if not is_read:
            raise AuthenticationError(
                "The cluster token is not valid.", code="invalid_cluster_token",
                headers={"WWW-Authenticate": "Bearer"},
            )
        if access is Access.WRITE:
            raise PermissionDeniedError(
                "The read token cannot change the registry; this call needs the cluster token.",
                code="read_only_token",
            )


def access_for(method: str) -> Access:
    return Access.READ if method in _READ_METHODS else Access.WRITE


class ClusterAuthMiddleware:
    """Pure ASGI, so a refused request is answered before its body is read."""

    def __init__(self, app: ASGIApp, auth: ClusterAuth) -> None:
        self.app = app
        self.auth = auth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not self.auth.enabled or scope["path"] in OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        scheme, token = get_authorization_scheme_param(Headers(scope=scope).get("authorization"))
        try:
            self.auth.check(token if scheme.lower() == "bearer" else None,
                            access_for(scope["method"]))
        except FleetError as exc:
            client = scope.get("client") or ("-",)
            logger.warning("refused method=%s path=%s client=%s code=%s", scope["method"],
                           scope["path"], client[0], exc.code)
            await error_response(exc)(scope, receive, send)
            return
        await self.app(scope, receive, send)


def document_security(app: FastAPI, open_paths: Iterable[str] = OPEN_PATHS) -> None:
    """Declare the bearer token in the OpenAPI spec for every operation that needs it."""
    build = app.openapi
    errors = {
        "401": ("Missing or invalid cluster token", ErrorResponse),
        "403": ("The read token on a call that changes the registry", ErrorResponse),
    }

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            spec = build()
            spec.setdefault("components", {}).setdefault("securitySchemes", {})[
                SECURITY_SCHEME] = {
                "type": "http", "scheme": "bearer",
                "description": "The cluster token; for reads (GET), the read token also does.",
            }
            ref = {"$ref": f"#/components/schemas/{ErrorResponse.__name__}"}
            for path, operations in spec.get("paths", {}).items():
                if path in open_paths:
                    continue
                for method, operation in operations.items():
                    operation["security"] = [{SECURITY_SCHEME: []}]
                    codes = ["401"] if access_for(method.upper()) is Access.READ else ["401", "403"]
                    for code in codes:
                        operation.setdefault("responses", {})[code] = {
                            "description": errors[code][0],
                            "content": {"application/json": {"schema": ref}},
                        }
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
