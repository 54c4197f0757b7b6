"""`fleet batch --offline`: the seed's offline mode, vLLM's `LLM` class on this machine, with no
services, reading and writing the same files as a batch through the gateway.

Lines go to the engine in chunks; each chunk's records are written when it finishes, so an
interrupted run keeps every finished chunk. The chat template is chosen as the worker chooses it
(the tokenizer's own, else ChatML with its stop tokens, or --chat-template).
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fleet.batch.jobs import CHAT, EMBEDDINGS, BatchLine, ResultsFile, error_record, success_record
from fleet.batch.report import Progress, Tally
from fleet.devices import visible_gpus
from fleetcore.chat_template import plan_template, write_engine_files

if TYPE_CHECKING:
    from vllm import LLM, RequestOutput, SamplingParams

logger = logging.getLogger(__name__)

# OpenAI body fields and the SamplingParams fields they become.
_SAMPLING_FIELDS = {
    "temperature": "temperature", "top_p": "top_p", "top_k": "top_k", "min_p": "min_p",
    "max_tokens": "max_tokens", "max_completion_tokens": "max_tokens", "stop": "stop",
    "stop_token_ids": "stop_token_ids", "seed": "seed", "n": "n",
    "presence_penalty": "presence_penalty", "frequency_penalty": "frequency_penalty",
    "repetition_penalty": "repetition_penalty", "ignore_eos": "ignore_eos",
    "min_tokens": "min_tokens", "skip_special_tokens": "skip_special_tokens",
    "include_stop_str_in_output": "include_stop_str_in_output",
}
# Fields that mean nothing without a server.
_IGNORED = {"model", "messages", "prompt", "user", "stream", "stream_options"}


class UnsupportedParameter(ValueError):
    pass


def sampling_kwargs(body: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """The SamplingParams arguments of one body, over the model's defaults."""
    unknown = sorted(set(body) - set(_SAMPLING_FIELDS) - _IGNORED)
    if unknown:
        raise UnsupportedParameter(f"not supported offline: {', '.join(unknown)}")
    kwargs = {**defaults, "max_tokens": defaults.get("max_tokens")}
    kwargs.update({_SAMPLING_FIELDS[k]: v for k, v in body.items()
                   if k in _SAMPLING_FIELDS and v is not None})
    return kwargs


def response_body(job: BatchLine, output: RequestOutput, model_name: str) -> dict[str, Any]:
    """An OpenAI-shaped response for one finished request."""
    completion_tokens = sum(len(c.token_ids) for c in output.outputs)
    prompt_tokens = len(output.prompt_token_ids or [])
    if job.url == CHAT:
        kind, prefix = "chat.completion", "chatcmpl"
        choices: list[dict[str, Any]] = [
            {"index": i, "message": {"role": "assistant", "content": c.text},
             "finish_reason": c.finish_reason, "stop_reason": c.stop_reason}
            for i, c in enumerate(output.outputs)
        ]
    else:
        kind, prefix = "text_completion", "cmpl"
        choices = [{"index": i, "text": c.text, "finish_reason": c.finish_reason,
                    "stop_reason": c.stop_reason} for i, c in enumerate(output.outputs)]
    return {"id": f"{prefix}-offline-{uuid.uuid4().hex}", "object": kind,
            "created": int(time.time()), "model": model_name, "choices": choices,
            "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
                      "total_tokens": prompt_tokens + completion_tokens}}


def engine_kwargs(model: str, engine_args: Sequence[str]) -> dict[str, Any]:
    """vLLM engine flags (`--max-model-len 4096`, ...) as `LLM(...)` keywords: only those that
    differ from vLLM's defaults, parsed by vLLM's own parser."""
    from vllm.engine.arg_utils import EngineArgs
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = EngineArgs.add_cli_args(FlexibleArgumentParser(prog="fleet batch --offline"))
    base = vars(parser.parse_args(["--model", model]))
    given = vars(parser.parse_args(["--model", model, *engine_args]))
    return {k: v for k, v in given.items() if k != "model" and base.get(k) != v}


def _chunks(jobs: Sequence[BatchLine], size: int) -> Iterator[Sequence[BatchLine]]:
    for start in range(0, len(jobs), size):
        yield jobs[start:start + size]


class OfflineRunner:
    def __init__(self, llm: LLM, model_name: str, results: ResultsFile, tally: Tally,
                 progress: Progress) -> None:
        self.llm = llm
        self.model_name = model_name
        self.results = results
        self.tally = tally
        self.progress = progress
        self.defaults = dict(llm.model_config.get_diff_sampling_param())
        from vllm.exceptions import VLLMClientError

        # What vLLM raises for a request it refuses (say, a prompt longer than the context).
        self._refused: tuple[type[Exception], ...] = (ValueError, TypeError, VLLMClientError)

    def _generate(self, jobs: Sequence[BatchLine], params: Sequence[SamplingParams]
                  ) -> list[RequestOutput]:
        """One engine call per kind of line (chat or completion), outputs in `jobs` order."""
        outputs: dict[int, RequestOutput] = {}
        chat = [i for i, j in enumerate(jobs) if j.url == CHAT]
        text = [i for i, j in enumerate(jobs) if j.url != CHAT]
        if chat:
            done = self.llm.chat([jobs[i].body["messages"] for i in chat],
                                 sampling_params=[params[i] for i in chat], use_tqdm=False)
            outputs.update(zip(chat, done, strict=True))
        if text:
            done = self.llm.generate([jobs[i].body["prompt"] for i in text],
                                     sampling_params=[params[i] for i in text], use_tqdm=False)
            outputs.update(zip(text, done, strict=True))
        return [outputs[i] for i in range(len(jobs))]

    def _record(self, record: dict[str, Any]) -> None:
        self.results.append(record)
        self.tally.add(record)
        self.progress.advance()

    def run_chunk(self, chunk: Sequence[BatchLine]) -> None:
        from vllm import SamplingParams

        ready: list[BatchLine] = []
        params: list[SamplingParams] = []
        for job in chunk:
            try:
                if job.url == EMBEDDINGS:
                    raise UnsupportedParameter(
                        "not supported offline: /v1/embeddings (run it through the gateway)")
                params.append(SamplingParams(**sampling_kwargs(job.body, self.defaults)))
                ready.append(job)
            except self._refused as exc:
                self._record(error_record(job, str(exc), code="invalid_request", status_code=400))
        if not ready:
            return
        try:
            outputs = self._generate(ready, params)
        except self._refused as exc:
            if len(ready) == 1:
                self._record(error_record(ready[0], str(exc), code="invalid_request",
                                          status_code=400))
                return
            # One bad line (say, longer than the context) fails the whole call: find it.
            logger.info("a chunk failed (%s); running its lines one by one", exc)
            for job in ready:
                self.run_chunk([job])
            return
        for job, output in zip(ready, outputs, strict=True):
            self._record(success_record(job, response_body(job, output, self.model_name)))

    def run(self, jobs: Sequence[BatchLine], chunk_size: int) -> None:
        for chunk in _chunks(jobs, chunk_size):
            self.run_chunk(chunk)


def run_offline(jobs: Sequence[BatchLine], results: ResultsFile, tally: Tally,
                progress: Progress, *, model: str, model_name: str, chat_template: str | None,
                engine_args: Sequence[str], chunk_size: int) -> None:
    extra = list(engine_args)
    if not visible_gpus():
        # vLLM's CPU backend reads these at import; without them it reserves too much memory.
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if "--enforce-eager" not in extra:
            extra.append("--enforce-eager")
    kwargs = engine_kwargs(model, extra)
    with tempfile.TemporaryDirectory(prefix="fleet-batch-") as workdir:
        plan = plan_template(model, chat_template, extra)
        files = write_engine_files(plan, model, Path(workdir), extra)
        logger.info("chat template %s stop_token_ids=%s", plan.label, list(plan.stop_token_ids))
        from vllm import LLM

        llm = LLM(model=model, **kwargs, **files.llm_kwargs())
        progress.restart_clock()
        try:
            OfflineRunner(llm, model_name, results, tally, progress).run(jobs, chunk_size)
        finally:
            llm.llm_engine.engine_core.shutdown()
