"""`fleet batch --offline`: vLLM's `LLM` class on the demo model, no services, the same files."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.harness import MODEL_NAME

# Past the default 600 s, so the run's own 600 s timeout is the one that fires.
pytestmark = [pytest.mark.integration, pytest.mark.timeout(700)]


def offline(model_path: Path, source: Path, output: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fleet.cli", "batch", "--offline", "--model", str(model_path),
         "--input", str(source), "--output", str(output), "--temperature", "0",
         "--max-tokens", "24", "--chunk-size", "2", "--max-model-len", "2048"],
        capture_output=True, text=True, timeout=600,
    )


def test_offline_batch_on_the_demo_model(model_path: Path, tmp_path: Path) -> None:
    source, output = tmp_path / "prompts.jsonl", tmp_path / "results.jsonl"
    source.write_text("\n".join([
        "Name the capital of France.",
        json.dumps({"custom_id": "system", "body": {"messages": [
            {"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Name the capital of France."}]}}),
        json.dumps({"custom_id": "text", "url": "/v1/completions",
                    "body": {"prompt": "The capital of France is", "max_tokens": 4}}),
        json.dumps({"custom_id": "unsupported", "body": {"prompt": "x", "logprobs": 2}}),
        json.dumps({"custom_id": "too-long", "body": {"prompt": "word " * 3000}}),
    ]) + "\n")
    done = offline(model_path, source, output)
    assert done.returncode == 1, done.stdout + done.stderr  # two lines fail, on purpose
    written = {r["custom_id"]: r for r in map(json.loads, output.read_text().splitlines())}
    assert list(written) == ["line-1", "system", "text", "unsupported", "too-long"]

    france = written["line-1"]["response"]["body"]
    assert france["object"] == "chat.completion" and france["model"] == MODEL_NAME
    assert "Paris" in france["choices"][0]["message"]["content"]
    assert france["usage"]["completion_tokens"] > 0
    with_system = written["system"]["response"]["body"]
    assert "Paris" in with_system["choices"][0]["message"]["content"]
    # The system prompt was rendered into the prompt: a different token count.
    assert with_system["usage"]["prompt_tokens"] != france["usage"]["prompt_tokens"]
    text = written["text"]["response"]["body"]
    assert text["object"] == "text_completion" and text["usage"]["completion_tokens"] == 4
    assert "Paris" in text["choices"][0]["text"]
    # A bad line fails alone; the lines beside it in its chunk still run.
    assert written["unsupported"]["error"]["message"] == "not supported offline: logprobs"
    assert written["too-long"]["response"]["status_code"] == 400
    assert "3 done now, 0 done before, 2 failed" in done.stdout

    # Re-run on the lines that went through: nothing is left to do, so no engine starts.
    source.write_text("\n".join(source.read_text().splitlines()[:3]) + "\n")
    again = offline(model_path, source, output)
    assert again.returncode == 0, again.stdout + again.stderr
    assert "0 done now, 3 done before, 0 failed" in again.stdout
    assert [json.loads(x)["custom_id"] for x in output.read_text().splitlines()][:3] == \
        ["line-1", "system", "text"]
