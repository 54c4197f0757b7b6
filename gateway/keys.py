"""The gateway's keys file: each client key's hash mapped to its name, models and limits.

The file is YAML (or JSON, by a `.json` suffix), one mapping from `sha256:<hex>` to an entry:

    "sha256:5e1f0a9c2b7d...": {name: alice, models: [SmolLM2-135M-Instruct], rpm: 60, tpm: 20000,
                               concurrency: 4}

Keys are never stored in clear. A key is 256 random bits made by `new_key`, so a plain SHA-256
of it cannot be reversed or guessed; a slow password hash (bcrypt, argon2) exists for
low-entropy human passwords and would only add milliseconds to every request here.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError

logger = logging.getLogger(__name__)

HASH_PREFIX = "sha256:"
KEY_PREFIX = "sk-fleet-"
ALL_MODELS = "*"
_HASH_LEN = len(HASH_PREFIX) + 64
_YAML_HEADER = (
    "# llm-fleet gateway keys (--keys-file): the SHA-256 of each key -> its name, the models\n"
    "# it may use (absent or \"*\": all), its requests (rpm) and tokens (tpm) per minute and\n"
    "# its requests in flight at once (concurrency); a limit left out is no limit. admin: true\n"
    "# lets a key declare and remove LoRA adapters.\n"
    "# Add keys with 'fleet keys create'; delete a line to revoke a key. Gateways reload it.\n"
)


class KeysFileError(ValueError):
    """The keys file cannot be read or does not follow the format."""


class KeyEntry(BaseModel):
    """What one key may do. `models` absent or containing "*" allows every model."""

    model_config = ConfigDict(extra="forbid", strict=True)

    name: str = Field(min_length=1, max_length=128)
    models: list[str] | None = Field(None, min_length=1)
    rpm: int | None = Field(None, ge=1, description="Requests per minute; none: no limit.")
    tpm: int | None = Field(None, ge=1, description="Tokens per minute; none: no limit.")
    concurrency: int | None = Field(
        None, ge=1, description="Requests in flight at once, streams or not; none: no limit.")
    admin: bool = Field(
        False, description="May declare and remove the fleet's LoRA adapters "
        "(/v1/load_lora_adapter, /v1/unload_lora_adapter).")

    @property
    def all_models(self) -> bool:
        return self.models is None or ALL_MODELS in self.models

    def allows(self, model: str) -> bool:
        return self.models is None or ALL_MODELS in self.models or model in self.models


def new_key() -> str:
    """A fresh client key: 256 bits from the OS's CSPRNG."""
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return HASH_PREFIX + hashlib.sha256(key.encode()).hexdigest()


def _is_hash(text: str) -> bool:
    hexpart = text[len(HASH_PREFIX):]
    return (len(text) == _HASH_LEN and text.startswith(HASH_PREFIX)
            and all(c in "0123456789abcdef" for c in hexpart))


def parse_keys(text: str, *, json_format: bool = False) -> dict[str, KeyEntry]:
    """The file's entries by hash; raises KeysFileError naming the first bad entry."""
    if not text.strip():
        return {}
    try:
        data = json.loads(text) if json_format else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise KeysFileError(f"not valid {'JSON' if json_format else 'YAML'}: {exc}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise KeysFileError(
            "expected a mapping from 'sha256:<hex>' to {name, models, rpm, tpm, concurrency}")
    entries = {}
    for digest, entry in data.items():
        if not isinstance(digest, str) or not _is_hash(digest):
            # Say nothing of the value: it may be a key someone pasted in clear.
            raise KeysFileError(
                "every key must be stored as 'sha256:' and 64 lowercase hex digits; "
                "make keys with 'fleet keys create'"
            )
        try:
            entries[digest] = KeyEntry.model_validate(entry)
        except ValidationError as exc:
            raise KeysFileError(f"entry {digest[:19]}...: {exc}") from None
    return entries


def _is_json(path: Path) -> bool:
    return path.suffix.lower() == ".json"


def load_keys_file(path: Path) -> dict[str, KeyEntry]:
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        raise KeysFileError(f"cannot read {path}: {exc}") from None
    try:
        return parse_keys(text, json_format=_is_json(path))
    except KeysFileError as exc:
        raise KeysFileError(f"{path}: {exc}") from None


def append_key(path: Path, digest: str, entry: KeyEntry) -> None:
    """Add one entry, replacing the file atomically so a gateway never reads half of it.

    YAML gets one line added at the end (its comments stay); JSON is written anew.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    # Fields left at their defaults stay out, so a file written here also reads in a gateway
    # older than a field (an `admin: false` line would fail there).
    fields = entry.model_dump(exclude_none=True, exclude_defaults=True)
    while True:
        with open(path, "a+") as handle:
            # Two `fleet keys create` at once must not lose one another's key.
            fcntl.flock(handle, fcntl.LOCK_EX)
            if os.fstat(handle.fileno()).st_ino != path.stat().st_ino:
                continue  # another writer replaced the file while we waited: lock the new one
            handle.seek(0)
            text = handle.read()
            json_format = _is_json(path)
            if digest in parse_keys(text, json_format=json_format):
                raise KeysFileError("this key is in the file already")
            if json_format:
                data = json.loads(text) if text.strip() else {}
                data[digest] = fields
                updated = json.dumps(data, indent=2) + "\n"
            else:
                line = json.dumps({digest: fields})[1:-1]  # a YAML flow mapping, on one line
                text = text if text.strip() else _YAML_HEADER
                updated = text + ("" if not text or text.endswith("\n") else "\n") + line + "\n"
                try:
                    appended = digest in parse_keys(updated)
                except KeysFileError:
                    appended = False
                if not appended:
                    # A file whose top level is not a block mapping cannot take a line.
                    data = yaml.safe_load(text) or {}
                    data[digest] = fields
                    updated = yaml.safe_dump(data, sort_keys=False)
            _replace(path, updated)
            return


def _replace(path: Path, text: str) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as out:
            out.write(text)
            out.flush()
            os.fsync(out.fileno())
        with contextlib.suppress(OSError):
            os.chmod(tmp, path.stat().st_mode & 0o777)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


@dataclass(frozen=True)
class _Signature:
    inode: int
    size: int
    mtime_ns: int


def _signature(path: Path) -> _Signature | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return _Signature(st.st_ino, st.st_size, st.st_mtime_ns)


class KeysFile:
    """The keys file as last loaded, reloaded when its inode, size or mtime changes.

    A file that turns unreadable or invalid leaves the last good entries in force and is logged:
    a typo must neither lock every client out nor let everyone in.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._signature = _signature(path)
        self.entries = load_keys_file(path)
        self.generation = 0

    def reload_if_changed(self) -> bool:
        """Load the file again if it changed on disk; True when new entries took effect."""
        signature = _signature(self.path)
        if signature == self._signature:
            return False
        self._signature = signature
        if signature is None:
            logger.error("keys file gone path=%s; keeping the %d keys last loaded",
                         self.path, len(self.entries))
            return False
        try:
            entries = load_keys_file(self.path)
        except KeysFileError as exc:
            logger.error("keys file not reloaded, keeping the %d keys last loaded: %s",
                         len(self.entries), exc)
            return False
        self.entries = entries
        self.generation += 1
        logger.info("keys file reloaded path=%s keys=%d", self.path, len(entries))
        return True
