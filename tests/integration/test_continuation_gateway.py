"""Stream continuation through a real gateway process, against fake engines that stream token
ids as vLLM does (tests/integration/fake_engine.py `--token-ids`): the subject is the gateway's
relay, its stall timer and its abort of a continuation whose client left. (The real-engine
version, through `fleet up`, is tests/integration/test_stream_continuation.py.)

Round-robin routing over the workers sorted by id sends each first attempt to `a-stall`, which
goes silent after 3 chunks; `b-ok` continues what it began.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.integration.fake_engine import WORDS
from tests.integration.harness import API_KEY, Stack

MODEL = "continued-model"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
CHUNKS = 40


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    stack = Stack(workdir=tmp_path_factory.mktemp("continue-gw"), model_path=Path("unused"))
    try:
        stack.start_controller()
        flags = ["--token-ids", "--chunks", str(CHUNKS), "--interval-ms", "50"]
        stack.start_fake_engine("a-stall", MODEL, [*flags, "--stall-after", "3"])
        stack.start_fake_engine("b-ok", MODEL, flags)
        stack.start_gateway(extra=["--stall-timeout", "1", "--routing", "round-robin"])
        stack.wait_for(lambda: httpx.get(f"{stack.gateway_url}/health", headers=AUTH,
                                         timeout=5).json()["routable_workers"] == 2,
                       "the gateway to route both fake engines", 60)
        yield stack
    finally:
        stack.close()


def _stats(stack: Stack, name: str) -> dict:
    port = stack.worker_ports[name]
    return httpx.get(f"http://127.0.0.1:{port}/stats", timeout=5).json()


def _continuations(stack: Stack, reason: str) -> float:
    text = httpx.get(f"{stack.gateway_url}/metrics", timeout=5).text
    found = re.findall(rf'^fleet_gateway_continuations_total{{[^}}]*reason="{reason}"'
                       rf'[^}}]*}} (\S+)$', text, re.MULTILINE)
    return sum(float(v) for v in found)


def _wait_both_routable(stack: Stack) -> None:
    # The stalled worker's breaker opened; it lets a trial through after its cool-down.
    stack.wait_for(lambda: httpx.get(f"{stack.gateway_url}/health", headers=AUTH,
                                     timeout=5).json()["routable_workers"] == 2,
                   "both fake engines routable again", 30)


def test_a_stalled_stream_is_finished_by_the_other_worker(stack: Stack) -> None:
    before = _continuations(stack, "stall")
    events = []
    with httpx.stream("POST", f"{stack.gateway_url}/v1/chat/completions", headers=AUTH,
                      timeout=60, json={"model": MODEL, "stream": True, "max_tokens": 8,
                                        "stream_options": {"include_usage": True},
                                        "messages": [{"role": "user", "content": "hi"}]}) as r:
        assert r.headers["x-fleet-worker"] == "a-stall"
        lines = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "data: [DONE]"
    events = [json.loads(line[6:]) for line in lines[:-1]]
    text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    assert text == "".join(WORDS[:8])
    assert {e["id"] for e in events} == {"fake-0"}  # the original stream's id throughout
    assert [c["finish_reason"] for e in events for c in e["choices"]
            if c.get("finish_reason")] == ["length"]
    assert events[-1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 8,
                                   "total_tokens": 11}
    assert '"token_ids":[' not in "".join(lines)
    assert _continuations(stack, "stall") == before + 1
    _wait_both_routable(stack)


def test_a_client_that_leaves_during_a_continuation_aborts_it(stack: Stack) -> None:
    _wait_both_routable(stack)
    with httpx.stream("POST", f"{stack.gateway_url}/v1/completions", headers=AUTH,
                      timeout=60, json={"model": MODEL, "stream": True,
                                        "max_tokens": CHUNKS, "prompt": "go"}) as r:
        assert r.headers["x-fleet-worker"] == "a-stall"
        seen = 0
        for line in r.iter_lines():
            if line.startswith("data: {"):
                seen += 1
            if seen == 8:  # 3 from a-stall, then 5 of the continuation on b-ok
                assert _stats(stack, "b-ok")["running"] == 1
                break  # the client leaves
    stack.wait_for(lambda: _stats(stack, "b-ok")["running"] == 0,
                   "b-ok to see the continuation aborted", 10)
    _wait_both_routable(stack)
