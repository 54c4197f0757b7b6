"""`fleet batch` through the real stack: two CPU workers (one core each) behind the gateway.

Each batch runs as the `fleet batch` command in a child process, as a user runs it.
"""

from __future__ import annotations

import collections
import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.integration.harness import API_KEY, MODEL_NAME, Stack

pytestmark = pytest.mark.integration
QUESTIONS = ["What is the capital of France?", "Name a colour.", "What is 2 + 2?",
             "Say hello.", "Name a fruit."]


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Stack]:
    stack = Stack(workdir=tmp_path_factory.mktemp("batch"), model_path=model_path)
    try:
        stack.start_controller()
        stack.start_gateway()
        stack.start_worker("w0", cpus="0")
        stack.start_worker("w1", cpus="1")
        stack.wait_worker_state("w0", "ready", timeout=300)
        stack.wait_worker_state("w1", "ready", timeout=300)
        stack.wait_routable()
        yield stack
    finally:
        stack.close()


def batch_argv(stack: Stack, source: Path, output: Path, *flags: str) -> list[str]:
    return [sys.executable, "-m", "fleet.cli", "batch", "--input", str(source),
            "--output", str(output), "--model", MODEL_NAME, "--gateway-url", stack.gateway_url,
            *flags]


def run_batch(stack: Stack, source: Path, output: Path, *flags: str
              ) -> subprocess.CompletedProcess[str]:
    return subprocess.run(batch_argv(stack, source, output, *flags), capture_output=True,
                          text=True, timeout=600,
                          env={**os.environ, "FLEET_CLIENT_API_KEY": API_KEY})


def records(output: Path) -> list[dict]:
    return [json.loads(line) for line in output.read_text().splitlines()]


def write_input(path: Path, count: int) -> list[str]:
    """`count` lines, alternating plain text, chat in the batch format and completions."""
    ids, lines = [], []
    for i in range(count):
        question = f"{QUESTIONS[i % len(QUESTIONS)]} ({i})"
        if i % 3 == 0:
            ids.append(f"line-{i + 1}")
            lines.append(question)
        elif i % 3 == 1:
            ids.append(f"chat-{i}")
            lines.append(json.dumps({"custom_id": f"chat-{i}", "method": "POST",
                                     "url": "/v1/chat/completions", "body": {
                                         "model": "gpt-4o-mini",
                                         "messages": [{"role": "user", "content": question}]}}))
        else:
            ids.append(f"text-{i}")
            lines.append(json.dumps({"custom_id": f"text-{i}",
                                     "body": {"prompt": f"Q: {question}\nA:"}}))
    path.write_text("\n".join(lines) + "\n")
    return ids


def test_200_lines_are_spread_over_both_workers(pair: Stack, tmp_path: Path) -> None:
    source, output = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    ids = write_input(source, 200)
    done = run_batch(pair, source, output, "--concurrency", "8", "--max-tokens", "4",
                     "--temperature", "0")
    assert done.returncode == 0, done.stdout + done.stderr
    written = records(output)
    assert [r["custom_id"] for r in written] == ids  # one each, in input order
    assert all(r["error"] is None and r["response"]["status_code"] == 200 for r in written)
    assert all(r["response"]["body"]["model"] == MODEL_NAME for r in written)
    kinds = collections.Counter(r["response"]["body"]["object"] for r in written)
    assert kinds == {"chat.completion": 134, "text_completion": 66}
    # The worker is the gateway's X-Fleet-Worker header of each response.
    spread = collections.Counter(r["response"]["worker"] for r in written)
    assert set(spread) == {"w0", "w1"} and min(spread.values()) >= 40, spread
    assert "200 lines: 200 done now, 0 done before, 0 failed" in done.stdout
    assert f"workers: w0 {spread['w0']}, w1 {spread['w1']}" in done.stdout
    assert "completion tokens/s" in done.stdout
    # The progress bar: done of total, failures and tokens per second, on stderr.
    assert "200/200" in done.stderr and "failed=0" in done.stderr and "tok_s=" in done.stderr


def test_a_killed_batch_resumes_without_duplicates_or_gaps(pair: Stack, tmp_path: Path) -> None:
    source, output = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    ids = write_input(source, 60)
    proc = subprocess.Popen(
        batch_argv(pair, source, output, "--concurrency", "2", "--max-tokens", "16",
                   "--no-progress"),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        env={**os.environ, "FLEET_CLIENT_API_KEY": API_KEY},
    )
    try:
        pair.wait_for(lambda: output.exists() and len(output.read_text().splitlines()) >= 10,
                      "10 results", 300)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    before = records(output)
    assert 10 <= len(before) < 60
    assert len({r["custom_id"] for r in before}) == len(before)

    again = run_batch(pair, source, output, "--concurrency", "4", "--max-tokens", "16")
    assert again.returncode == 0, again.stdout + again.stderr
    after = records(output)
    assert [r["custom_id"] for r in after] == ids
    assert all(r["error"] is None for r in after)
    # What the first run wrote was kept, not asked again.
    kept = {r["custom_id"]: r["id"] for r in before}
    assert all(r["id"] == kept[r["custom_id"]] for r in after if r["custom_id"] in kept)
    assert f"{60 - len(before)} done now, {len(before)} done before, 0 failed" in again.stdout

    third = run_batch(pair, source, output)
    assert third.returncode == 0 and "0 done now, 60 done before" in third.stdout
    assert records(output) == after


def test_a_failed_line_is_written_as_failed_and_tried_again_next_run(
        pair: Stack, tmp_path: Path) -> None:
    source, output = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    lines = ["Say hello.",
             json.dumps({"custom_id": "too-long",
                         "body": {"messages": [{"role": "user", "content": "Hi"}],
                                  "max_tokens": 10_000}}),
             "Say goodbye."]
    source.write_text("\n".join(lines) + "\n")
    first = run_batch(pair, source, output, "--max-tokens", "4")
    assert first.returncode == 1
    failed = {r["custom_id"]: r for r in records(output)}["too-long"]
    assert failed["response"]["status_code"] == 400 and "4096" in failed["error"]["message"]
    assert "2 done now, 0 done before, 1 failed" in first.stdout
    second = run_batch(pair, source, output, "--max-tokens", "4")
    assert "0 done now, 2 done before, 1 failed" in second.stdout
    assert [r["custom_id"] for r in records(output)] == ["line-1", "too-long", "line-3"]


def test_a_wrong_key_stops_the_batch_at_once(pair: Stack, tmp_path: Path) -> None:
    source, output = tmp_path / "prompts.txt", tmp_path / "results.jsonl"
    source.write_text("Say hello.\n")
    done = subprocess.run(batch_argv(pair, source, output), capture_output=True, text=True,
                          timeout=120, env={**os.environ, "FLEET_CLIENT_API_KEY": "wrong"})
    assert done.returncode == 1
    assert "stopped: 401" in done.stdout and "not valid" in done.stdout
    assert not output.exists() or output.read_text() == ""
