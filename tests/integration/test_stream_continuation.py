"""Streams that survive their worker: two real CPU workers through `fleet up`, faults dealt to
one of them while streams run on it.

Each test first runs its requests without a fault, as the reference; then again with the
fault, and every stream must end as one stream whose text equals the reference's. The gateway
runs with `--stall-timeout 3` (through its environment, as `fleet up` passes it on).
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import pytest

from tests.integration.fleet_up import FleetUp, kill_tree
from tests.integration.harness import MODEL_NAME

pytestmark = pytest.mark.integration
STALL = 3.0
# Prompts whose greedy answers have no near-tie in their first 48 tokens (top-1 minus top-2
# logprob at least 0.3 at every step, measured on this engine): the continuation's prefill of
# the generated tokens is not bit-identical to their decode, and a near tie would flip.
CHATS = ["Continue the sequence: 1, 2, 3, 4, 5, 6,",
         "Write 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12 and continue to 30."]
COMPLETIONS = ["10, 11, 12, 13, 14,", "100, 101, 102, 103,", "2, 4, 6, 8, 10,",
               "1, 2, 3, 4, 5, 6,", "20, 21, 22, 23,"]


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[FleetUp]:
    up = FleetUp(tmp_path_factory.mktemp("continue"),
                 ["--cpu-workers", "2", "--max-model-len", "2048"],
                 env={"FLEET_GATEWAY_STALL_TIMEOUT": str(STALL)})
    try:
        up.start_and_wait(timeout=600)
        yield up
    finally:
        with contextlib.suppress(Exception):  # nothing left stopped
            for process in engines(up).values():
                process.send_signal(signal.SIGCONT)
        up.stop()


def _module(proc: psutil.Process) -> str:
    argv = proc.cmdline()
    return argv[argv.index("-m") + 1] if "-m" in argv else ""


def engines(fleet: FleetUp) -> dict[str, psutil.Process]:
    """Each worker's engine API server (under the worker's engine guard), by worker id."""
    found = {}
    procs = psutil.Process(fleet.proc.pid).children(recursive=True) if fleet.proc else []
    for worker in fleet.workers():
        port = str(httpx.URL(worker["engine_url"]).port)
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                parent = proc.parent()
                if (_module(proc) == "vllm.entrypoints.openai.api_server"
                        and port in proc.cmdline() and parent is not None
                        and _module(parent) != _module(proc)):
                    found[worker["worker_id"]] = proc
    return found


def worker_process(fleet: FleetUp, worker_id: str) -> psutil.Process:
    process = engines(fleet)[worker_id]
    while _module(process) != "worker":
        parent = process.parent()
        assert parent is not None
        process = parent
    return process


def engine_url(fleet: FleetUp, worker_id: str) -> str:
    url = next(w["engine_url"] for w in fleet.workers() if w["worker_id"] == worker_id)
    return str(url).rstrip("/")


def both_routable(fleet: FleetUp) -> None:
    fleet.wait_for(lambda: httpx.get(f"{fleet.gateway_url}/health", timeout=5).json()
                   ["routable_workers"] == 2, "both workers routable", 300)


def continuations(fleet: FleetUp, reason: str) -> float:
    text = httpx.get(f"{fleet.gateway_url}/metrics", timeout=5).text
    pattern = rf'^fleet_gateway_continuations_total{{[^}}]*reason="{reason}"[^}}]*}} (\S+)$'
    return sum(float(v) for v in re.findall(pattern, text, re.MULTILINE))


def body(i: int, max_tokens: int = 48) -> tuple[str, dict]:
    """Request i: chat or completion in turn, at temperature 0, usage asked for by some."""
    common = {"model": MODEL_NAME, "temperature": 0, "max_tokens": max_tokens, "stream": True}
    if i % 3 == 0:
        common["stream_options"] = {"include_usage": True}
    if i % 2 == 0:
        prompt = CHATS[i // 2 % len(CHATS)]
        return "/v1/chat/completions", {**common,
                                        "messages": [{"role": "user", "content": prompt}]}
    return "/v1/completions", {**common, "prompt": COMPLETIONS[i // 2 % len(COMPLETIONS)]}


@dataclass
class Stream:
    """One streamed request in a thread: its events as they come."""

    fleet: FleetUp
    path: str
    request: dict
    events: list[dict] = field(default_factory=list)
    worker: str = ""
    ended: str = ""  # "[DONE]", or what went wrong
    started: threading.Event = field(default_factory=threading.Event)
    leave_after: threading.Event | None = None  # set: the client goes away
    _thread: threading.Thread | None = None

    def run(self) -> None:
        try:
            with httpx.stream("POST", f"{self.fleet.gateway_url}{self.path}", json=self.request,
                              timeout=120) as response:
                self.worker = response.headers.get("x-fleet-worker", "")
                if response.status_code != 200:
                    self.ended = f"HTTP {response.status_code}: {response.read()[:300]!r}"
                    return
                for line in response.iter_lines():
                    if not line.startswith("data: "):
                        continue
                    if line == "data: [DONE]":
                        self.ended = "[DONE]"
                        return
                    self.events.append(json.loads(line[6:]))
                    if len(self.text()) > 0:
                        self.started.set()
                    if self.leave_after is not None and self.leave_after.is_set():
                        self.ended = "left"
                        return
                self.ended = "no [DONE]"
        except httpx.HTTPError as exc:
            self.ended = f"{type(exc).__name__}: {exc}"
        finally:
            self.started.set()

    def start(self) -> Stream:
        self._thread = threading.Thread(target=self.run, daemon=True)
        self._thread.start()
        return self

    def join(self, timeout: float = 180) -> None:
        assert self._thread is not None
        self._thread.join(timeout)
        assert not self._thread.is_alive(), f"stream still running: {self.text()!r}"

    def text(self) -> str:
        parts = []
        for event in self.events:
            for choice in event.get("choices", []):
                parts.append(choice["delta"].get("content") or "" if "delta" in choice
                             else choice.get("text") or "")
        return "".join(parts)

    def check_shape(self) -> None:
        """One stream, as the client asked for it."""
        assert self.ended == "[DONE]", (self.ended, self.text())
        assert not any("error" in e for e in self.events), self.events
        assert len({e["id"] for e in self.events}) == 1
        assert len({e["created"] for e in self.events}) == 1
        assert {e["model"] for e in self.events} == {MODEL_NAME}
        chat = self.path.endswith("chat/completions")
        assert {e["object"] for e in self.events} == (
            {"chat.completion.chunk"} if chat else {"text_completion"})
        finishes = [c["finish_reason"] for e in self.events for c in e["choices"]
                    if c.get("finish_reason")]
        assert len(finishes) == 1, finishes
        if chat:
            roles = [c["delta"].get("role") for e in self.events for c in e["choices"]
                     if c["delta"].get("role")]
            assert roles == ["assistant"]
        dumped = json.dumps(self.events)
        assert re.search(r'"(prompt_)?token_ids": \[', dumped) is None, "token ids not asked for"
        usage = [e["usage"] for e in self.events if e.get("usage")]
        if self.request.get("stream_options"):
            assert len(usage) == 1 and not self.events[-1]["choices"], self.events[-3:]
        else:
            assert usage == []

    def usage(self) -> dict | None:
        return next((e["usage"] for e in self.events if e.get("usage")), None)


def run_all(fleet: FleetUp, requests: list[tuple[str, dict]],
            fault: Callable[[list[Stream]], None] | None = None) -> list[Stream]:
    streams = [Stream(fleet, path, request).start() for path, request in requests]
    if fault is not None:
        fault(streams)
    for stream in streams:
        stream.join()
    return streams


def wait_all_started(streams: list[Stream], timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    for stream in streams:
        assert stream.started.wait(max(0.1, deadline - time.monotonic())), "a stream never began"


def busiest(streams: list[Stream]) -> str:
    counts: dict[str, int] = {}
    for stream in streams:
        if stream.ended == "":
            counts[stream.worker] = counts.get(stream.worker, 0) + 1
    return max(counts, key=lambda w: counts[w])


def test_a_continuation_from_token_ids_joins_its_text_at_a_character_boundary(
        fleet: FleetUp) -> None:
    """What the seam relies on: a completion from token ids that end on a whole character
    streams text that joins the prefix's as one decode of all the ids would. (Cut inside a
    character, vLLM's detokenizer does not: the gateway never cuts there.)"""
    worker = fleet.workers()[0]
    url = worker["engine_url"].rstrip("/")
    auth = {"Authorization": f"Bearer {worker['engine_api_key']}"}
    text = "Le café est très bon, où êtes-vous? 日本語のテキスト 😀 ok"
    ids = httpx.post(f"{url}/tokenize", timeout=30, headers=auth, json={
        "model": MODEL_NAME, "prompt": text, "add_special_tokens": False}).json()["tokens"]

    def decode(tokens: list[int]) -> str:
        return httpx.post(f"{url}/detokenize", timeout=30, headers=auth,
                          json={"model": MODEL_NAME, "tokens": tokens}).json()["prompt"]

    clean = [k for k in range(3, len(ids)) if not decode(ids[:k]).endswith("\ufffd")]
    assert len(clean) < len(ids) - 3, "the text has no character split across tokens"
    for k in clean[-8:]:
        streamed, generated = "", []
        with httpx.stream("POST", f"{url}/v1/completions", timeout=60, headers=auth, json={
                "model": MODEL_NAME, "prompt": ids[:k], "max_tokens": 6, "temperature": 0,
                "stream": True, "return_token_ids": True}) as response:
            for line in response.iter_lines():
                if line.startswith("data: {"):
                    choice = json.loads(line[6:])["choices"][0]
                    streamed += choice["text"]
                    generated += choice["token_ids"] or []
        # The whole decode may end in an unfinished character or a special token the stream
        # does not show; what was streamed must join the prefix with nothing lost or repeated.
        joined, whole = decode(ids[:k]) + streamed, decode(ids[:k] + generated)
        assert whole.startswith(joined) and len(whole) - len(joined) <= 16, (k, joined, whole)


def test_a_stalled_engine_moves_its_streams_to_the_other_worker(fleet: FleetUp) -> None:
    requests = [body(i) for i in range(4)]
    reference = run_all(fleet, requests)
    for stream in reference:
        stream.check_shape()
    before = continuations(fleet, "stall")
    stopped: list[psutil.Process] = []

    def stop_one(streams: list[Stream]) -> None:
        wait_all_started(streams)
        engine = engines(fleet)[busiest(streams)]
        engine.send_signal(signal.SIGSTOP)
        stopped.append(engine)

    try:
        streams = run_all(fleet, requests, stop_one)
        moved = continuations(fleet, "stall") - before
    finally:
        for engine in stopped:
            with contextlib.suppress(psutil.Error):  # its worker may have replaced it
                engine.send_signal(signal.SIGCONT)
    for stream, ref in zip(streams, reference, strict=True):
        stream.check_shape()
        assert stream.text() == ref.text()
        assert stream.usage() == ref.usage()
    assert moved >= 1
    assert "continuing stream request_id=" in fleet.text() and "reason=stall" in fleet.text()
    both_routable(fleet)


def test_a_client_that_leaves_during_a_continuation_aborts_it(fleet: FleetUp) -> None:
    both_routable(fleet)
    path, request = body(0, max_tokens=400)
    request["ignore_eos"] = True  # long enough to leave in the middle of its continuation
    leave = threading.Event()
    stream = Stream(fleet, path, request, leave_after=leave).start()
    assert stream.started.wait(120)
    first = stream.worker
    engine = engines(fleet)[first]
    other = next(w for w in engines(fleet) if w != first)
    metrics = f"{engine_url(fleet, other)}/metrics"

    def running() -> float:
        text = httpx.get(metrics, timeout=5).text
        return sum(float(v) for v in re.findall(r"^vllm:num_requests_running{[^}]*} (\S+)$",
                                                 text, re.MULTILINE))

    assert stream.ended == "" and stream.text(), (stream.ended, stream.text())
    before = continuations(fleet, "stall")
    engine.send_signal(signal.SIGSTOP)
    try:
        fleet.wait_for(lambda: continuations(fleet, "stall") > before,
                       f"the gateway to move the stream off {first} (engine pid {engine.pid})",
                       60)
        fleet.wait_for(lambda: running() >= 1, f"the continuation to run on {other}", 60)
        leave.set()
        stream.join()
        assert stream.ended == "left"
        fleet.wait_for(lambda: running() == 0, "the other engine to abort the continuation",
                       30)
    finally:
        with contextlib.suppress(psutil.Error):
            engine.send_signal(signal.SIGCONT)
    both_routable(fleet)


def test_streams_on_a_killed_worker_complete_with_the_text_they_would_have_had(
        fleet: FleetUp) -> None:
    both_routable(fleet)
    requests = [body(i) for i in range(16)]
    reference = run_all(fleet, requests)
    for stream in reference:
        stream.check_shape()
    before = continuations(fleet, "broke")
    killed: list[str] = []

    def kill_busiest(streams: list[Stream]) -> None:
        wait_all_started(streams)
        victim = busiest(streams)
        killed.append(victim)
        kill_tree(worker_process(fleet, victim))

    streams = run_all(fleet, requests, kill_busiest)
    on_victim = [s for s in streams if s.worker == killed[0]]
    assert on_victim, "no stream ran on the killed worker"
    for stream, ref in zip(streams, reference, strict=True):
        stream.check_shape()
        assert stream.text() == ref.text(), (stream.worker, stream.request)
        assert stream.usage() == ref.usage()
    assert continuations(fleet, "broke") - before >= 1

