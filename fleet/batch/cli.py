"""`fleet batch`: run a file of requests through the gateway (or offline, with vLLM's `LLM`).

    fleet batch --input prompts.jsonl --output results.jsonl --model M
    fleet batch --offline --input prompts.txt --output results.jsonl --model /models/M

Running the same command again skips the lines already done (failed ones are tried again).
"""

from __future__ import annotations

import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated

from pydantic import Field, ValidationError

from fleet.batch.jobs import BatchLine, Defaults, InputError, ResultsFile, read_input
from fleet.batch.online import BatchAborted, run_online
from fleet.batch.report import Progress, Tally
from fleet.client.settings import ClientSettings
from fleetcore.logs import setup_logging
from fleetcore.settings_cli import Flag, Passthrough

logger = logging.getLogger(__name__)


class BatchSettings(ClientSettings):
    cli_prog = "fleet batch"
    cli_description = __doc__.split("\n")[0]

    input: Path = Field(description="JSONL in the OpenAI batch format, or plain text, one "
                        "request per line.")
    output: Path = Field(description="Results, JSONL (appended to).")
    model: str = Field(description="Model name at the gateway; with --offline, its path or id.")
    model_name: str | None = Field(
        None, description="Offline: the model name in the results; none: the folder name or id.")
    offline: bool = Field(False, description="Run vLLM here, no services. Unknown flags go to "
                          "vLLM.")
    concurrency: int = Field(32, ge=1, le=4096, description="Requests in flight.")
    retries: int = Field(5, ge=0, le=100,
                         description="More tries for a failed request, with backoff.")
    system: str | None = Field(None, description="System prompt for plain-text lines.")
    max_tokens: int | None = Field(None, ge=1, description="For lines that do not set it.")
    temperature: float | None = Field(None, ge=0, le=2,
                                      description="For lines that do not set it.")
    chunk_size: int = Field(256, ge=1, description="Offline: lines per engine call; results are "
                            "written per chunk.")
    chat_template: str | None = Field(
        None, description="Offline: template file, or 'chatml'; none: the tokenizer's, ChatML "
        "if it has none.")
    progress: Annotated[bool, Flag("--no-progress")] = Field(
        True, description="A progress bar; --no-progress hides it.")
    log_level: str = Field("warning", description="debug, info, warning or error.")
    engine_args: Annotated[list[str], Passthrough(only_with="offline")] = Field(
        default_factory=list)

    @property
    def served_name(self) -> str:
        if self.model_name:
            return self.model_name
        path = Path(self.model).expanduser()
        return path.resolve().name if self.offline and path.exists() else self.model


def _run(settings: BatchSettings, jobs: Sequence[BatchLine], results: ResultsFile, tally: Tally,
         progress: Progress) -> None:
    if settings.offline:
        from fleet.batch.offline import run_offline

        run_offline(jobs, results, tally, progress, model=settings.model,
                    model_name=settings.served_name, chat_template=settings.chat_template,
                    engine_args=settings.engine_args, chunk_size=settings.chunk_size)
    else:
        asyncio.run(run_online(jobs, results, tally, progress, api_base=settings.api_base,
                               api_key=settings.key, model=settings.model,
                               timeout=settings.timeout, concurrency=settings.concurrency,
                               retries=settings.retries))


def main(argv: Sequence[str] | None = None) -> int:
    try:
        settings = BatchSettings.from_cli(argv)
    except ValidationError as exc:
        print(f"fleet batch: invalid settings:\n{exc}", file=sys.stderr)
        return 2
    setup_logging(settings.log_level, "batch")
    defaults = Defaults(model=settings.served_name, system=settings.system,
                        max_tokens=settings.max_tokens, temperature=settings.temperature)
    results = ResultsFile(settings.output)
    try:
        jobs = read_input(settings.input, defaults)
        results.load()
    except (OSError, InputError) as exc:
        print(f"fleet batch: {exc}", file=sys.stderr)
        return 2
    done = results.done_ids()
    todo = [job for job in jobs if job.custom_id not in done]
    tally = Tally(total=len(jobs), skipped=len(jobs) - len(todo))
    progress = Progress(tally, enabled=settings.progress)
    code, note, finished = 0, "", False
    try:
        if todo:
            _run(settings, todo, results, tally, progress)
        finished = True
        results.finalize(jobs)
        code = 1 if tally.failed else 0
    except KeyboardInterrupt:
        code, note = 130, "interrupted: run the same command again to resume"
    except BatchAborted as exc:
        code, note = 1, f"stopped: {exc}"
    finally:
        progress.close()
    print(tally.summary(str(settings.output), sorted_=finished, note=note), flush=True)
    return code


if __name__ == "__main__":
    raise SystemExit(main())
