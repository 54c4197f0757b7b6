"""`fleet batch`: run a file of requests through the gateway (or offline, with vLLM's `LLM`).

    fleet batch --input prompts.jsonl --output results.jsonl --model M
    fleet batch --offline --input prompts.txt --output results.jsonl --model /models/M

Running the same command again skips the lines already done (failed ones are tried again).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from pydantic import Field, ValidationError

from fleet.batch.jobs import BatchLine, Defaults, InputError, ResultsFile, read_input
from fleet.batch.online import BatchAborted, run_online
from fleet.batch.report import Progress, Tally
from fleet.client.settings import ClientSettings, add_client_flags
from fleet.logs import setup_logging

logger = logging.getLogger(__name__)


class BatchSettings(ClientSettings):
    input: Path
    output: Path
    model: str
    model_name: str | None = None  # offline: the name written into the results
    offline: bool = False
    concurrency: int = Field(32, ge=1, le=4096)
    retries: int = Field(5, ge=0, le=100)
    system: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    chunk_size: int = Field(256, ge=1)
    chat_template: str | None = None
    progress: bool = True
    log_level: str = "warning"
    engine_args: list[str] = Field(default_factory=list)

    @property
    def served_name(self) -> str:
        if self.model_name:
            return self.model_name
        path = Path(self.model).expanduser()
        return path.resolve().name if self.offline and path.exists() else self.model

    @classmethod
    def from_cli(cls, argv: Sequence[str] | None = None) -> BatchSettings:
        parser = argparse.ArgumentParser(prog="fleet batch", description=__doc__.split("\n")[0])
        parser.add_argument("--input", required=True,
                            help="JSONL in the OpenAI batch format, or plain text, one per line.")
        parser.add_argument("--output", required=True, help="Results, JSONL (appended to).")
        parser.add_argument("--model", required=True,
                            help="Model name at the gateway; with --offline, its path or id.")
        parser.add_argument("--offline", action="store_true",
                            help="Run vLLM here, no services. Unknown flags go to vLLM.")
        parser.add_argument("--model-name", help="Offline: the model name in the results.")
        parser.add_argument("--concurrency", type=int, help="Requests in flight (default 32).")
        parser.add_argument("--retries", type=int,
                            help="More tries for a failed request, with backoff (default 5).")
        parser.add_argument("--system", help="System prompt for plain-text lines.")
        parser.add_argument("--max-tokens", type=int, help="For lines that do not set it.")
        parser.add_argument("--temperature", type=float, help="For lines that do not set it.")
        parser.add_argument("--chunk-size", type=int,
                            help="Offline: lines per engine call; results are written per chunk "
                            "(default 256).")
        parser.add_argument("--chat-template",
                            help="Offline: template file, or 'chatml' (default: the tokenizer's, "
                            "ChatML if it has none).")
        parser.add_argument("--no-progress", dest="progress", action="store_false", default=None,
                            help="No progress bar.")
        parser.add_argument("--log-level", help="debug, info, warning (default) or error.")
        add_client_flags(parser)
        args, engine_args = parser.parse_known_args(argv)
        if engine_args and not args.offline:
            parser.error(f"unrecognized arguments: {' '.join(engine_args)}")
        values = {k: v for k, v in vars(args).items() if v is not None}
        return cls(**values, engine_args=engine_args)


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
