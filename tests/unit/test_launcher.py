"""`fleet up`'s device planning: GPUs grouped per worker, CPU cores shared out."""

import os

import pytest

from fleet.devices import group_gpus, parse_cores, split_cores, visible_gpus
from fleet.launcher import UpSettings, fleet_of, plan


def test_visible_gpus_follow_cuda_visible_devices() -> None:
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": "2,5"}) == ["2", "5"]
    assert visible_gpus({"CUDA_VISIBLE_DEVICES": ""}) == []


@pytest.mark.parametrize("gpus, k, expected", [
    (["0", "1"], 1, ["0", "1"]),
    (["0", "1", "2", "3"], 2, ["0,1", "2,3"]),
    (["0", "1", "2"], 2, ["0,1"]),
    (["4", "7"], 2, ["4,7"]),
    ([], 1, []),
])
def test_group_gpus(gpus: list[str], k: int, expected: list[str]) -> None:
    assert group_gpus(gpus, k) == expected


def test_group_gpus_refuses_zero() -> None:
    with pytest.raises(ValueError):
        group_gpus(["0"], 0)


@pytest.mark.parametrize("cores, n, expected", [
    ([0, 1], 1, ["0-1"]),
    ([0, 1], 2, ["0", "1"]),
    ([0, 1, 2, 3, 4], 2, ["0-2", "3-4"]),
    ([0, 2, 4], 1, ["0,2,4"]),
])
def test_split_cores(cores: list[int], n: int, expected: list[str]) -> None:
    assert split_cores(cores, n) == expected


def test_more_cpu_workers_than_cores_is_refused() -> None:
    with pytest.raises(ValueError, match="at least 3 cores"):
        split_cores([0, 1], 3)


def test_parse_cores() -> None:
    assert parse_cores("0-2,5") == [0, 1, 2, 5]
    assert parse_cores("1") == [1]
    with pytest.raises(ValueError):
        parse_cores("a-b")


def _fake_nvidia_smi(tmp_path, monkeypatch: pytest.MonkeyPatch, count: int) -> None:
    """A machine with `count` GPUs, as nvidia-smi lists them (no GPU here to ask)."""
    script = tmp_path / "nvidia-smi"
    script.write_text("#!/bin/sh\n" + "".join(f"echo {i}\n" for i in range(count)))
    script.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)


def _workers(argv: list[str]) -> list:
    args = UpSettings.from_cli(["--model", "/m", "--no-webui", *argv])
    fleet = fleet_of(args, on_gpus=bool(visible_gpus()))
    return [s for s in plan(args, fleet, "t" * 32) if s.name.startswith("worker")]


def test_one_worker_per_gpu_on_a_two_gpu_machine(tmp_path, monkeypatch) -> None:
    _fake_nvidia_smi(tmp_path, monkeypatch, 2)
    assert visible_gpus() == ["0", "1"]
    workers = _workers(["--max-model-len", "4096"])
    assert [w.argv[w.argv.index("--gpus") + 1] for w in workers] == ["0", "1"]
    for worker in workers:
        assert worker.env["NCCL_NVLS_ENABLE"] == "0"  # NVLink multicast stays off
        assert worker.argv[-2:] == ["--max-model-len", "4096"]
        assert "--enforce-eager" not in worker.argv  # CUDA graphs on GPUs


def test_gpus_per_worker_two_makes_one_tensor_parallel_worker(tmp_path, monkeypatch) -> None:
    _fake_nvidia_smi(tmp_path, monkeypatch, 2)
    (worker,) = _workers(["--gpus-per-worker", "2"])
    assert worker.argv[worker.argv.index("--gpus") + 1] == "0,1"
    assert worker.env["NCCL_NVLS_ENABLE"] == "0"


def test_cuda_visible_devices_limits_the_plan(tmp_path, monkeypatch) -> None:
    _fake_nvidia_smi(tmp_path, monkeypatch, 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    workers = _workers([])
    assert [w.argv[w.argv.index("--gpus") + 1] for w in workers] == ["2", "3"]
