"""`fleet up`'s device planning: GPUs grouped per worker, CPU cores shared out."""

import pytest

from fleet.launcher import group_gpus, parse_cores, split_cores, visible_gpus


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
