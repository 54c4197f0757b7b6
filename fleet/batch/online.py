"""Running a batch through the gateway: bounded concurrency, retries with backoff, one record
written per line as soon as it completes.

`concurrency` requests are in flight at once, so the gateway spreads them over every worker of
the model. A retryable failure (429, 5xx, an unreachable gateway, a timeout) is tried again after
an exponential, jittered backoff (at least the gateway's Retry-After); after `retries` more tries
the line is written as failed. A wrong key or an unknown model would fail every line alike, so
they stop the whole run instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import openai
from openai import AsyncOpenAI

from fleet.batch.jobs import CHAT, EMBEDDINGS, BatchLine, ResultsFile, error_record, success_record
from fleet.batch.report import Progress, Tally
from fleetcore.errors import AuthenticationError, FleetError, NotFoundError, PermissionDeniedError
from fleetcore.openai_errors import from_openai

logger = logging.getLogger(__name__)

FATAL = (AuthenticationError, PermissionDeniedError, NotFoundError)


class BatchAborted(RuntimeError):
    """An error that every line would hit; the run stops."""


def backoff_delay(attempt: int, *, base: float, cap: float, retry_after: float | None = None,
                  rand: Callable[[], float] = random.random) -> float:
    """Seconds before try `attempt + 1` (attempt counts from 0): base * 2^attempt, capped, with
    jitter in [1/2, 1] of that, and never less than the server's Retry-After (itself capped)."""
    delay = min(cap, base * 2.0 ** attempt) * (0.5 + rand() / 2)
    return max(delay, min(retry_after or 0.0, cap))


class OnlineRunner:
    def __init__(self, client: AsyncOpenAI, results: ResultsFile, tally: Tally,
                 progress: Progress, *, concurrency: int, retries: int,
                 backoff_base: float = 1.0, backoff_cap: float = 30.0) -> None:
        self.client = client
        self.results = results
        self.tally = tally
        self.progress = progress
        self.concurrency = concurrency
        self.retries = retries
        self.backoff_base = backoff_base
        self.backoff_cap = backoff_cap
        self._write_lock = asyncio.Lock()

    async def _send(self, job: BatchLine) -> dict[str, Any]:
        """One try; the record on success, FleetError otherwise."""
        body = dict(job.body)
        model = body.pop("model")
        try:
            # The rest of the body goes as it is: vLLM's extra parameters included.
            if job.url == EMBEDDINGS:
                # The SDK asks for base64 unless told: the record keeps what the line asked
                # for, floats by default, as the API's own default.
                raw: Any = await self.client.embeddings.with_raw_response.create(
                    model=model, input=body.pop("input"),
                    encoding_format=body.pop("encoding_format", "float"), extra_body=body)
            elif job.url == CHAT:
                raw = await self.client.chat.completions.with_raw_response.create(
                    model=model, messages=body.pop("messages"), extra_body=body)
            else:
                raw = await self.client.completions.with_raw_response.create(
                    model=model, prompt=body.pop("prompt"), extra_body=body)
        except openai.OpenAIError as exc:
            raise from_openai(exc) from exc
        try:
            answer = json.loads(raw.text)
        except ValueError as exc:
            raise FleetError(f"The gateway's answer is not JSON: {exc}",
                             status_code=raw.status_code) from None
        return success_record(job, answer, request_id=raw.headers.get("x-request-id"),
                              worker=raw.headers.get("x-fleet-worker"))

    async def _run_one(self, job: BatchLine) -> dict[str, Any]:
        attempt = 0
        while True:
            try:
                return await self._send(job)
            except FATAL as exc:
                raise BatchAborted(f"{exc}; stopping the batch") from exc
            except FleetError as exc:
                if not exc.retryable or attempt >= self.retries:
                    return error_record(job, exc.message, code=exc.code or type(exc).__name__,
                                        status_code=exc.status_code, request_id=exc.request_id)
                delay = backoff_delay(attempt, base=self.backoff_base, cap=self.backoff_cap,
                                      retry_after=exc.retry_after)
                logger.info("retry custom_id=%s attempt=%d in=%.1fs error=%s", job.custom_id,
                            attempt + 1, delay, exc)
                self.tally.retries += 1
                attempt += 1
                await asyncio.sleep(delay)

    async def _write(self, record: dict[str, Any]) -> None:
        async with self._write_lock:
            await asyncio.to_thread(self.results.append, record)
            self.tally.add(record)
            self.progress.advance()

    async def _drain(self, todo: Iterator[BatchLine]) -> None:
        # The iterator is shared: each free slot takes the next line.
        for job in todo:
            await self._write(await self._run_one(job))

    async def run(self, jobs: Sequence[BatchLine]) -> None:
        todo = iter(jobs)
        slots = [asyncio.create_task(self._drain(todo))
                 for _ in range(min(self.concurrency, len(jobs)))]
        try:
            await asyncio.gather(*slots)
        finally:
            for slot in slots:
                slot.cancel()
            for slot in slots:
                with contextlib.suppress(asyncio.CancelledError, BatchAborted):
                    await slot


async def check_gateway(client: AsyncOpenAI, model: str) -> None:
    """Fail early on an unreachable gateway or a refused key; warn on a model not served now."""
    try:
        served = [m.id async for m in client.models.list()]
    except openai.OpenAIError as exc:
        raise BatchAborted(str(from_openai(exc))) from exc
    if model not in served:
        logger.warning("model %s is not served right now (served: %s); its lines will wait for "
                       "a worker", model, ", ".join(served) or "none")


async def run_online(jobs: Sequence[BatchLine], results: ResultsFile, tally: Tally,
                     progress: Progress, *, api_base: str, api_key: str | None, model: str,
                     timeout: float, concurrency: int, retries: int) -> None:
    async with AsyncOpenAI(base_url=api_base, api_key=api_key or "none", timeout=timeout,
                           max_retries=0) as client:
        await check_gateway(client, model)
        runner = OnlineRunner(client, results, tally, progress, concurrency=concurrency,
                              retries=retries)
        await runner.run(jobs)
