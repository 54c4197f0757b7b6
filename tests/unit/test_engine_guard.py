"""The engine's guard starts the engine under a live worker, also where the worker is PID 1 (a
container's entrypoint), and not under one that is gone."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from worker.engine_guard import PARENT_ENV

ROOT = Path(__file__).resolve().parents[2]
# A worker, reduced to what the guard sees of it: its pid in the environment, the guard its child.
WORKER = f"""
import os, subprocess, sys
parent = sys.argv[1] if len(sys.argv) > 1 else str(os.getpid())
print("pid", os.getpid(), flush=True)
engine = [sys.executable, "-c", "print('engine ran')"]
sys.exit(subprocess.call([sys.executable, "-m", "worker.engine_guard", "--", *engine],
                         env={{**os.environ, "{PARENT_ENV}": parent}}))
"""


def _run(argv: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


def test_the_guard_starts_the_engine_under_a_worker_that_is_pid_1() -> None:
    unshare = shutil.which("unshare")
    if unshare is None or _run([unshare, "--pid", "--fork", "true"]).returncode != 0:
        pytest.skip("no PID namespace here (unshare needs root)")
    result = _run([unshare, "--pid", "--fork", sys.executable, "-c", WORKER])
    assert result.stdout.splitlines() == ["pid 1", "engine ran"], result.stderr
    assert result.returncode == 0


def test_the_guard_starts_nothing_when_its_worker_is_not_its_parent() -> None:
    result = _run([sys.executable, "-c", WORKER, "999999999"])
    assert result.returncode == 1
    assert "engine ran" not in result.stdout
