"""bench/scale_bench.py's placement check: which worker's engine sits on which GPU."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from bench.scale_bench import placement

UUIDS = ["GPU-aaaa", "GPU-bbbb"]


@pytest.fixture
def workers() -> Iterator[dict[str, int]]:
    """Two processes whose command lines look like `python -m worker --gpus N`, each with a
    child (as an engine under its worker): pids by the GPU their worker names."""
    procs = {}
    for gpu in ("0", "1"):
        code = ("import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', "
                "'import time; time.sleep(60)']); time.sleep(60)")
        procs[gpu] = subprocess.Popen([sys.executable, "-c", code, "worker", "--gpus", gpu])
    try:
        def engine(proc: subprocess.Popen[bytes]) -> int:
            deadline = time.monotonic() + 30
            while not (kids := psutil.Process(proc.pid).children()):
                assert time.monotonic() < deadline, "the fake worker started no engine"
                time.sleep(0.01)
            return kids[0].pid

        yield {gpu: engine(proc) for gpu, proc in procs.items()}
    finally:
        for proc in procs.values():
            for kid in psutil.Process(proc.pid).children():
                kid.kill()
            proc.kill()
            proc.wait()


def _fake_nvidia_smi(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                     apps: list[tuple[int, int]]) -> None:
    """nvidia-smi on a two-GPU machine whose compute processes are `apps` (pid, GPU index)."""
    gpus = "".join(f"{i}, {u}, 1000\n" for i, u in enumerate(UUIDS))
    rows = "".join(f"{pid}, {UUIDS[gpu]}, 900\n" for pid, gpu in apps)
    script = tmp_path / "nvidia-smi"
    script.write_text('#!/bin/sh\ncase "$1" in\n'
                      f"--query-gpu=*) printf '{gpus}' ;;\n"
                      f"--query-compute-apps=*) printf '{rows}' ;;\nesac\n")
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")


def test_each_engine_on_the_gpu_its_worker_names(workers, tmp_path, monkeypatch) -> None:
    _fake_nvidia_smi(tmp_path, monkeypatch, [(workers["0"], 0), (workers["1"], 1)])
    found = placement()
    assert found["each_worker_on_its_own_gpus"] is True
    assert {(a["worker_gpus"], a["gpu"]) for a in found["apps"]} == {("0", 0), ("1", 1)}
    assert [g["index"] for g in found["gpus"]] == [0, 1]


def test_an_engine_on_another_workers_gpu_is_caught(workers, tmp_path, monkeypatch) -> None:
    _fake_nvidia_smi(tmp_path, monkeypatch, [(workers["0"], 0), (workers["1"], 0)])
    assert placement()["each_worker_on_its_own_gpus"] is False


def test_nothing_to_tell_without_nvidia_smi_or_known_pids(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # no nvidia-smi at all
    assert placement() == {"gpus": [], "apps": [], "each_worker_on_its_own_gpus": None}
    _fake_nvidia_smi(tmp_path, monkeypatch, [(os.getpid(), 0)])  # pytest is no worker
    assert placement()["each_worker_on_its_own_gpus"] is None
