"""Batch input lines, result records, and the output file that makes a batch resumable.

Input: one request per line, either in the OpenAI batch format
(`{"custom_id": ..., "url": "/v1/chat/completions", "body": {"messages": [...]}}`, or a body with
`prompt` for /v1/completions, or with `input` for /v1/embeddings) or plain text, which becomes
one user message with the id `line-N` (N counts lines from 1, so ids stay the same when the file
is read again).

Output: one OpenAI batch-output record per line (`id`, `custom_id`, `response` with
`status_code`, `request_id`, `worker` and `body`, `error`), appended and flushed as each request
completes. Reading the file back tells which ids are done; a finished run rewrites it once, in
input order, keeping one record per id.
"""

from __future__ import annotations

import copy
import json
import os
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

CHAT = "/v1/chat/completions"
COMPLETIONS = "/v1/completions"
EMBEDDINGS = "/v1/embeddings"
URLS = (CHAT, COMPLETIONS, EMBEDDINGS)
# Client-side streaming makes no sense for a batch; the rest is the engine's business.
_DROPPED_KEYS = ("stream", "stream_options")


class InputError(ValueError):
    """A line of the input file that cannot become a request; names the line."""


@dataclass(frozen=True)
class BatchLine:
    index: int  # position in the input, for the final sort
    custom_id: str
    url: str  # one of URLS
    body: dict[str, Any]


@dataclass(frozen=True)
class Defaults:
    """What every request gets: the model, and sampling values for bodies that lack them."""

    model: str
    system: str | None = None  # for plain-text lines
    max_tokens: int | None = None
    temperature: float | None = None


def _url_for(body: Mapping[str, Any], url: object, where: str) -> str:
    if url is not None:
        path = str(url)
        path = path if path.startswith("/v1/") else f"/v1{path}" if path.startswith("/") else path
        if path not in URLS:
            raise InputError(f"{where}: url {url!r} is not one of {', '.join(URLS)}")
        return path
    if "messages" in body:
        return CHAT
    if "prompt" in body:
        return COMPLETIONS
    if "input" in body:
        return EMBEDDINGS
    raise InputError(f"{where}: the body has none of 'messages', 'prompt' and 'input'")


def _with_defaults(body: dict[str, Any], defaults: Defaults, url: str) -> dict[str, Any]:
    for key in _DROPPED_KEYS:
        body.pop(key, None)
    body["model"] = defaults.model
    if url == EMBEDDINGS:  # no sampling to default
        return body
    if defaults.max_tokens is not None and "max_tokens" not in body \
            and "max_completion_tokens" not in body:
        body["max_tokens"] = defaults.max_tokens
    if defaults.temperature is not None:
        body.setdefault("temperature", defaults.temperature)
    return body


def parse_line(text: str, number: int, defaults: Defaults) -> BatchLine | None:
    """One input line (numbered from 1); None for a blank line."""
    stripped = text.strip()
    if not stripped:
        return None
    where = f"line {number}"
    data: object = None
    if stripped.startswith("{"):
        try:
            data = json.loads(stripped)
        except ValueError:
            data = None  # plain text that happens to start with a brace
    if not isinstance(data, dict):
        messages = [{"role": "system", "content": defaults.system}] if defaults.system else []
        messages.append({"role": "user", "content": stripped})
        return BatchLine(number - 1, f"line-{number}", CHAT,
                         _with_defaults({"messages": messages}, defaults, CHAT))
    body = data.get("body")
    if not isinstance(body, dict):
        raise InputError(f"{where}: a JSON line needs a 'body' object (OpenAI batch format)")
    custom_id = data.get("custom_id", f"line-{number}")
    if not isinstance(custom_id, str) or not custom_id:
        raise InputError(f"{where}: 'custom_id' must be a non-empty string")
    if data.get("method", "POST") != "POST":
        raise InputError(f"{where}: method must be POST")
    url = _url_for(body, data.get("url"), where)
    if url == CHAT and not (isinstance(body.get("messages"), list) and body["messages"]):
        raise InputError(f"{where}: 'messages' must be a non-empty list")
    if url == COMPLETIONS and not body.get("prompt"):
        raise InputError(f"{where}: 'prompt' must not be empty")
    if url == EMBEDDINGS and not body.get("input"):
        raise InputError(f"{where}: 'input' must not be empty")
    return BatchLine(number - 1, custom_id, url,
                     _with_defaults(copy.deepcopy(body), defaults, url))


def parse_lines(lines: Iterable[str], defaults: Defaults) -> list[BatchLine]:
    jobs: list[BatchLine] = []
    seen: dict[str, int] = {}
    for number, text in enumerate(lines, start=1):
        job = parse_line(text, number, defaults)
        if job is None:
            continue
        if job.custom_id in seen:
            raise InputError(f"line {number}: custom_id {job.custom_id!r} repeats line "
                             f"{seen[job.custom_id]}")
        seen[job.custom_id] = number
        jobs.append(job)
    return jobs


def read_input(path: Path, defaults: Defaults) -> list[BatchLine]:
    with path.open(encoding="utf-8") as handle:
        return parse_lines(handle, defaults)


# -- records ---------------------------------------------------------------------------------
def _record_id() -> str:
    return f"batch_req_{uuid.uuid4().hex}"


def success_record(job: BatchLine, body: Mapping[str, Any], *, request_id: str | None = None,
                   worker: str | None = None) -> dict[str, Any]:
    return {"id": _record_id(), "custom_id": job.custom_id,
            "response": {"status_code": 200, "request_id": request_id, "worker": worker,
                         "body": dict(body)},
            "error": None}


def error_record(job: BatchLine, message: str, *, code: str | None,
                 status_code: int | None = None, request_id: str | None = None
                 ) -> dict[str, Any]:
    error = {"code": code, "message": message}
    response = None if status_code is None else {
        "status_code": status_code, "request_id": request_id, "worker": None,
        "body": {"error": {**error, "type": None, "param": None}},
    }
    return {"id": _record_id(), "custom_id": job.custom_id, "response": response,
            "error": error}


def is_success(record: Mapping[str, Any]) -> bool:
    response = record.get("response")
    return record.get("error") is None and isinstance(response, dict) \
        and response.get("status_code") == 200


def usage_of(record: Mapping[str, Any]) -> tuple[int, int]:
    """(prompt, completion) tokens of a successful record; (0, 0) when it has no usage."""
    body = (record.get("response") or {}).get("body") or {}
    usage = body.get("usage") or {}
    return int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)


# -- the output file -------------------------------------------------------------------------
class ResultsFile:
    """The output: read back to resume, appended line by line, sorted once at the end."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.records: list[dict[str, Any]] = []

    def load(self) -> None:
        """Read what an earlier run wrote. A last line cut short by a kill is dropped (and cut
        off the file, so the next append starts on a fresh line)."""
        self.records = []
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        keep = len(data)
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
        for number, raw in enumerate(data[:keep].splitlines(), start=1):
            if not raw.strip():
                continue
            try:
                record = json.loads(raw)
            except ValueError as exc:
                raise InputError(f"{self.path} line {number} is not JSON ({exc}); is it the "
                                 "output of fleet batch?") from None
            if not isinstance(record, dict) or "custom_id" not in record:
                raise InputError(f"{self.path} line {number} has no custom_id; is it the "
                                 "output of fleet batch?")
            self.records.append(record)
        if keep != len(data):
            with self.path.open("r+b") as handle:
                handle.truncate(keep)

    def done_ids(self) -> set[str]:
        return {str(r["custom_id"]) for r in self.records if is_success(r)}

    def append(self, record: dict[str, Any]) -> None:
        """Write one record and hand it to the OS at once: a kill loses nothing written."""
        line = json.dumps(record, ensure_ascii=False) + "\n"
        with self.path.open("a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
        self.records.append(record)

    def finalize(self, jobs: Sequence[BatchLine]) -> None:
        """Rewrite the file in input order, one record per id: its success if it has one,
        else its last failure. Records of ids not in this input stay, after the rest."""
        best: dict[str, dict[str, Any]] = {}
        for record in self.records:
            cid = str(record["custom_id"])
            if cid not in best or not is_success(best[cid]):
                best[cid] = record
        ordered = [best.pop(job.custom_id) for job in jobs if job.custom_id in best]
        ordered += list(best.values())
        tmp = self.path.with_name(f".{self.path.name}.sorting")
        with tmp.open("w", encoding="utf-8") as handle:
            for record in ordered:
                handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, self.path)
        self.records = ordered
