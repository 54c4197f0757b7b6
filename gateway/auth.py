"""Client API keys: a bearer token checked against the configured keys in constant time."""

from __future__ import annotations

import hashlib
import hmac
from collections.abc import Iterable

from fleet.errors import AuthenticationError


def _digest(key: str) -> bytes:
    return hashlib.sha256(key.encode()).digest()


class ApiKeys:
    def __init__(self, keys: Iterable[str]) -> None:
        self._digests = [_digest(k) for k in keys]

    @property
    def enabled(self) -> bool:
        return bool(self._digests)

    def check(self, authorization: str | None) -> None:
        """Raise AuthenticationError unless the header carries a known key (or auth is off)."""
        if not self._digests:
            return
        if not authorization:
            raise AuthenticationError(
                "No API key given. Send 'Authorization: Bearer <key>'.", code="missing_api_key"
            )
        scheme, _, token = authorization.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise AuthenticationError(
                "The Authorization header must be 'Bearer <key>'.", code="invalid_authorization"
            )
        given = _digest(token.strip())
        # Compare with every key, so timing does not tell how many matched or where.
        matched = False
        for digest in self._digests:
            matched |= hmac.compare_digest(given, digest)
        if not matched:
            raise AuthenticationError("The API key is not valid.")
