"""The gateway's view of what each engine's prefix cache holds, from its worker's /kv-cache.

Per worker, the set of block keys (`fleetcore.kv_blocks`) its engine holds, kept current by a
long poll: the worker answers as soon as its engine stores or drops blocks, so the view trails
the engine by about one network round trip. Per model, the tokenizer its engines use, fetched
once from one of them. A worker whose /kv-cache cannot be read has no view (its policy falls
back to its own estimate) until it can be read again: a stale view would send prompts to
blocks that are gone.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

import aiohttp

from controller.protocol import WorkerRecord
from gateway.prompt_tokens import PromptTokenizer
from worker.protocol import KvCacheChanges, TokenizerFiles

logger = logging.getLogger(__name__)

_POLL_WAIT = 10.0  # seconds the worker may hold a poll open
_TIMEOUT = aiohttp.ClientTimeout(total=_POLL_WAIT + 5.0, connect=5.0)
_TOKENIZER_TIMEOUT = aiohttp.ClientTimeout(total=60.0, connect=5.0)


class KvView:
    """One engine's cached blocks, as its worker last said."""

    def __init__(self) -> None:
        self.clear()

    def clear(self) -> None:
        """Know nothing (until the worker is read again)."""
        self.epoch: str | None = None
        self.seq = 0
        self.block_size: int | None = None
        self.keys: set[int] = set()
        self.updated_at = 0.0

    def apply(self, changes: KvCacheChanges) -> None:
        if changes.reset:
            self.keys = set(changes.added)
        else:
            self.keys.difference_update(changes.removed)
            self.keys.update(changes.added)
        self.epoch, self.seq, self.block_size = changes.epoch, changes.seq, changes.block_size
        self.updated_at = time.monotonic()

    def match(self, keys: Sequence[int]) -> int:
        """How many leading blocks of a prompt (by its keys) the engine holds."""
        matched = 0
        for key in keys:
            if key not in self.keys:
                break
            matched += 1
        return matched


class KvViews:
    """Every worker's view and every model's tokenizer: what routing policies read."""

    def __init__(self) -> None:
        self.views: dict[str, KvView] = {}
        self.tokenizers: dict[str, PromptTokenizer] = {}

    def view(self, worker_id: str) -> KvView | None:
        view = self.views.get(worker_id)
        return view if view is not None and view.epoch is not None else None

    def tokenizer(self, model: str) -> PromptTokenizer | None:
        return self.tokenizers.get(model)


def _reach(worker: WorkerRecord) -> tuple[str, str | None]:
    return str(worker.kv_cache_url), worker.engine_api_key


class KvSync:
    """Keeps `views` current for the workers in the routing table's snapshot."""

    def __init__(self, views: KvViews, session: aiohttp.ClientSession) -> None:
        self._views = views
        self._session = session
        self._polls: dict[str, tuple[tuple[str, str | None], asyncio.Task[None]]] = {}
        self._fetching: dict[str, asyncio.Task[None]] = {}  # model: its tokenizer's fetch

    def reconcile(self, workers: Sequence[WorkerRecord]) -> None:
        """Poll every worker that publishes its cache; stop polling the ones that left."""
        wanted = {w.worker_id: w for w in workers if w.kv_cache_url is not None}
        for wid in list(self._polls):
            reached, task = self._polls[wid]
            worker = wanted.get(wid)
            # A worker started again (a new URL or a new engine key) is read afresh.
            if worker is None or _reach(worker) != reached:
                task.cancel()
                del self._polls[wid]
                self._views.views.pop(wid, None)
        for wid, worker in wanted.items():
            if wid not in self._polls:
                self._polls[wid] = (_reach(worker),
                                    asyncio.create_task(self._poll_forever(worker)))
            for model in worker.model_names:
                if model not in self._views.tokenizers and model not in self._fetching:
                    self._fetching[model] = asyncio.create_task(self._fetch_tokenizer(
                        model, worker))

    def _headers(self, worker: WorkerRecord) -> dict[str, str]:
        key = worker.engine_api_key
        return {"Authorization": f"Bearer {key}"} if key else {}

    async def _fetch_tokenizer(self, model: str, worker: WorkerRecord) -> None:
        url = f"{str(worker.kv_cache_url).rstrip('/')}/kv-cache/tokenizer"
        try:
            async with self._session.get(url, headers=self._headers(worker),
                                         timeout=_TOKENIZER_TIMEOUT) as response:
                response.raise_for_status()
                files = TokenizerFiles.model_validate_json(await response.read())
            self._views.tokenizers[model] = await asyncio.to_thread(PromptTokenizer, files)
            logger.info("tokenizer loaded model=%s from worker=%s", model, worker.worker_id)
        except Exception as exc:  # a bad tokenizer file must not end the gateway
            # Tried again at the next reconcile; meanwhile the model routes on estimates.
            logger.warning("no tokenizer for model=%s from worker=%s error=%r", model,
                           worker.worker_id, exc)
        finally:
            self._fetching.pop(model, None)

    async def _poll_forever(self, worker: WorkerRecord) -> None:
        wid = worker.worker_id
        url = f"{str(worker.kv_cache_url).rstrip('/')}/kv-cache"
        view = self._views.views.setdefault(wid, KvView())
        failures = 0
        while True:
            params: dict[str, str] = {"after": str(view.seq), "wait": str(_POLL_WAIT)}
            if view.epoch is not None:
                params["epoch"] = view.epoch
            try:
                async with self._session.get(url, params=params, headers=self._headers(worker),
                                             timeout=_TIMEOUT) as response:
                    response.raise_for_status()
                    changes = KvCacheChanges.model_validate_json(await response.read())
                view.apply(changes)
                failures = 0
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError) as exc:
                if view.epoch is not None:
                    logger.warning("kv cache view lost worker=%s error=%r", wid, exc)
                view.clear()
                failures += 1
                await asyncio.sleep(min(0.5 * 2 ** failures, 10.0))

    async def close(self) -> None:
        tasks = [t for _, t in self._polls.values()] + list(self._fetching.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        self._polls.clear()
        self._fetching.clear()
