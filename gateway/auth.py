"""Who is calling: the bearer key looked up among plain `--api-keys` and the keys file.

Plain keys (flag, env or `--api-keys-file`) may use every model without limits. Keys from the
keys file (`--keys-file`, see gateway/keys.py) carry a name, their models and their limits; the
file is watched and reloaded without a restart.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from fleetcore.errors import AuthenticationError
from gateway.keys import KeyEntry, KeysFile, hash_key

logger = logging.getLogger(__name__)

_PLAIN = KeyEntry(name="api-keys")
# Callers by the Authorization header they sent, so that a known key costs one dict lookup
# rather than a SHA-256 and a new Caller per request. Only valid keys are kept (a stranger's
# guesses cannot fill it), the whole cache goes on each reload of the keys, and it is
# emptied when full: clients hold few keys each, so it rarely is.
_CALLER_CACHE_SIZE = 4096


@dataclass(frozen=True)
class Caller:
    """An authenticated client. `key_id` (the key's hash) is what limits are kept under."""

    key_id: str
    entry: KeyEntry

    @property
    def name(self) -> str:
        return self.entry.name


ANONYMOUS = Caller(key_id="", entry=KeyEntry(name="anonymous"))


class Authenticator:
    def __init__(self, plain_keys: Iterable[str] = (), keys_file: Path | None = None) -> None:
        self._plain = {hash_key(k): _PLAIN for k in plain_keys}
        self.keys_file = KeysFile(keys_file) if keys_file is not None else None
        self._entries: dict[str, KeyEntry] = {}
        self._callers: dict[str, Caller] = {}
        self._merge()

    def _merge(self) -> None:
        from_file = self.keys_file.entries if self.keys_file is not None else {}
        # One assignment, so a request never sees a half-merged table.
        self._entries = {**self._plain, **from_file}
        self._callers = {}  # a revoked key must not stay valid here

    @property
    def enabled(self) -> bool:
        # A keys file with no entries yet still means "keys required".
        return bool(self._plain) or self.keys_file is not None

    def key_ids(self) -> set[str]:
        return set(self._entries)

    def authenticate(self, authorization: str | None) -> Caller:
        """The caller the header's bearer key belongs to; raises AuthenticationError (401)."""
        if not self.enabled:
            return ANONYMOUS
        # Python's string hash is keyed per process, so a caller cannot steer a lookup
        # towards another client's header; as below, timing tells nothing of stored keys.
        if authorization and (caller := self._callers.get(authorization)) is not None:
            return caller
        if not authorization:
            raise AuthenticationError(
                "No API key given. Send 'Authorization: Bearer <key>'.", code="missing_api_key"
            )
        scheme, _, token = authorization.partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token or len(token) > 512:
            raise AuthenticationError(
                "The Authorization header must be 'Bearer <key>'.", code="invalid_authorization"
            )
        # A dict lookup by the SHA-256 of the presented key: its timing can at most tell an
        # attacker something about the hash of a key they chose themselves, never about a
        # stored key, because SHA-256 cannot be steered towards a stored hash. So this is
        # as safe against timing as comparing with hmac.compare_digest, and O(1) in the keys.
        key_id = hash_key(token)
        entry = self._entries.get(key_id)
        if entry is None:
            raise AuthenticationError("The API key is not valid.")
        caller = Caller(key_id=key_id, entry=entry)
        callers = self._callers
        if len(callers) >= _CALLER_CACHE_SIZE:
            callers.clear()
        callers[authorization] = caller
        return caller

    def caller_or_none(self, authorization: str | None) -> Caller | None:
        """The caller, or None for a missing or invalid key: for pages that answer a stranger
        less (`/health`) rather than 401, since probes call them without a key."""
        try:
            return self.authenticate(authorization)
        except AuthenticationError:
            return None

    async def reload(self) -> bool:
        """Reload the keys file if it changed on disk; True when new entries took effect."""
        if self.keys_file is None:
            return False
        if not await asyncio.to_thread(self.keys_file.reload_if_changed):
            return False
        self._merge()
        return True

    async def watch_forever(self, interval: float,
                            on_change: Callable[[set[str]], None] | None = None) -> None:
        """Poll the keys file off the request path; `on_change` gets the live key ids."""
        while True:
            await asyncio.sleep(interval)
            try:
                changed = await self.reload()
            except Exception:  # noqa: BLE001 - the watcher must outlive any one bad read
                logger.exception("keys file check failed path=%s", self.keys_file and
                                 self.keys_file.path)
                continue
            if changed and on_change is not None:
                on_change(self.key_ids())
