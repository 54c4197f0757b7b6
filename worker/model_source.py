"""Where the engine's weights come from: a local path, a Hugging Face id or a ModelScope id."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Mapping
from pathlib import Path

from worker.settings import ModelSource, WorkerSettings

logger = logging.getLogger(__name__)

_TRUE = {"1", "true", "yes", "on"}


def _local_path(model: str) -> Path:
    return Path(model).expanduser()


def effective_source(settings: WorkerSettings, env: Mapping[str, str] = os.environ) -> ModelSource:
    if settings.source is not ModelSource.AUTO:
        return settings.source
    if _local_path(settings.model).exists():
        return ModelSource.LOCAL
    if env.get("VLLM_USE_MODELSCOPE", "").strip().lower() in _TRUE:
        return ModelSource.MODELSCOPE
    return ModelSource.HF


def served_names(settings: WorkerSettings) -> list[str]:
    if settings.model_names:
        return list(settings.model_names)
    if effective_source(settings) is ModelSource.LOCAL:
        return [Path(settings.model).expanduser().resolve().name]
    return [settings.model]


def _modelscope_download(model_id: str, cache_dir: Path | None) -> str:
    from modelscope.hub.snapshot_download import snapshot_download

    return str(snapshot_download(model_id, cache_dir=str(cache_dir) if cache_dir else None))


async def resolve_model(settings: WorkerSettings) -> tuple[str, list[str]]:
    """The path or id to hand to vLLM, and extra engine arguments that go with it."""
    source = effective_source(settings)
    if source is ModelSource.LOCAL:
        path = _local_path(settings.model)
        if not await asyncio.to_thread(path.exists):
            raise FileNotFoundError(f"model folder {path} does not exist")
        return str(path.resolve()), []
    if source is ModelSource.MODELSCOPE:
        logger.info("downloading from ModelScope model=%s dir=%s", settings.model,
                    settings.download_dir)
        # snapshot_download blocks on network and disk.
        downloaded = await asyncio.to_thread(_modelscope_download, settings.model,
                                             settings.download_dir)
        return downloaded, []
    extra = ["--download-dir", str(settings.download_dir)] if settings.download_dir else []
    return settings.model, extra
