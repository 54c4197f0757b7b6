"""The benchmark script still runs end to end (tiny workload); it checks no speed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.integration.harness import API_KEY, CLUSTER_TOKEN, Stack

pytestmark = pytest.mark.integration
BENCH = Path(__file__).parents[2] / "bench" / "serve_bench.py"


def test_serve_bench_smoke_writes_both_sides(stack: Stack, tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(BENCH), "--smoke", "--gateway-url", stack.gateway_url,
         "--controller-url", stack.controller_url, "--gateway-key", API_KEY,
         "--tokenizer", str(stack.model_path), "--out", str(tmp_path), "--label", "smoke"],
        capture_output=True, text=True, timeout=300,
        env={**os.environ, "FLEET_CLUSTER_TOKEN": CLUSTER_TOKEN},
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (path,) = tmp_path.glob("serve-smoke-*.json")
    record = json.loads(path.read_text())
    for side in ("direct", "gateway"):
        assert record[side]["completed"] == 4 and record[side]["failed"] == 0
    assert record["summary"]["throughput_ratio"] > 0
