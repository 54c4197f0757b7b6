"""The fleet's LoRA adapter catalogue: declared state, kept in a JSON file so it outlives a restart.

The registry is soft state that workers rebuild by registering again; the catalogue is what an
operator declared, and nothing would declare it again, so it lives on disk (`--adapters-file`).
The controller owns it rather than a gateway because every gateway must see the same catalogue,
and gateways already read everything else from the controller's snapshot.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
from pathlib import Path

from pydantic import ValidationError

from controller.protocol import AdapterList, AdapterSpec

logger = logging.getLogger(__name__)


class CatalogueError(ValueError):
    """The adapters file cannot be read or does not follow the format."""


class AdapterCatalogue:
    """Adapters by name; every change is written through to `path` (if any) before it counts."""

    def __init__(self, path: Path | None = None) -> None:
        self.path = path
        self._adapters: dict[str, AdapterSpec] = {}
        if path is not None and path.exists():
            try:
                listed = AdapterList.model_validate_json(path.read_bytes())
            except (OSError, ValidationError) as exc:
                raise CatalogueError(f"adapters file {path}: {exc}") from None
            self._adapters = {a.name: a for a in listed.adapters}
            logger.info("adapters loaded path=%s count=%d", path, len(self._adapters))

    def list(self) -> list[AdapterSpec]:
        return [self._adapters[name] for name in sorted(self._adapters)]

    def get(self, name: str) -> AdapterSpec | None:
        return self._adapters.get(name)

    def put(self, spec: AdapterSpec) -> bool:
        """Declare or replace an adapter; True when it changed anything."""
        if self._adapters.get(spec.name) == spec:
            return False
        updated = {**self._adapters, spec.name: spec}
        self._write(updated)
        self._adapters = updated
        logger.info("adapter declared name=%s base=%s source=%s", spec.name, spec.base_model,
                    spec.source)
        return True

    def remove(self, name: str) -> AdapterSpec | None:
        spec = self._adapters.get(name)
        if spec is None:
            return None
        updated = {k: v for k, v in self._adapters.items() if k != name}
        self._write(updated)
        self._adapters = updated
        logger.info("adapter removed name=%s", name)
        return spec

    def _write(self, adapters: dict[str, AdapterSpec]) -> None:
        if self.path is None:
            return
        text = AdapterList(adapters=[adapters[n] for n in sorted(adapters)]).model_dump_json(
            indent=2)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Replaced atomically: a crash mid-write leaves the old catalogue, never half of one.
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.")
        try:
            with os.fdopen(fd, "w") as out:
                out.write(text + "\n")
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
