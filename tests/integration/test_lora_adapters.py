"""The adapters the tests and benchmarks make (tests/lora_adapters.py): the files written from a
model's config alone, for a GPU's weightless model, have the layout peft writes for the same
model. (vLLM serving them is in tests/integration/test_bench_smoke.py's LoRA bench run.)"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from safetensors import safe_open

from tests.lora_adapters import RANK, make_adapters, make_adapters_for_config

pytestmark = pytest.mark.integration


def _layout(folder: Path) -> dict[str, tuple[int, ...]]:
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as weights:
        return {key: tuple(weights.get_slice(key).get_shape()) for key in weights.keys()}


def test_adapters_from_the_config_have_pefts_layout(tmp_path: Path, model_path: Path) -> None:
    (peft,) = make_adapters(model_path, tmp_path / "peft", ["a"]).values()
    made = make_adapters_for_config(model_path, tmp_path / "config", ["a", "b"])
    assert _layout(made["a"]) == _layout(peft)
    assert len(_layout(peft)) == 4 * json.loads(
        (model_path / "config.json").read_text())["num_hidden_layers"]
    theirs = json.loads((peft / "adapter_config.json").read_text())
    for path in made.values():
        ours = json.loads((path / "adapter_config.json").read_text())
        for key in ("peft_type", "task_type", "r", "lora_alpha", "bias", "fan_in_fan_out"):
            assert ours[key] == theirs[key], key
        assert ours["r"] == RANK and set(ours["target_modules"]) == set(theirs["target_modules"])
    # Each adapter its own weights.
    with safe_open(str(made["a"] / "adapter_model.safetensors"), "pt") as a, \
            safe_open(str(made["b"] / "adapter_model.safetensors"), "pt") as b:
        key = next(iter(a.keys()))
        assert not a.get_tensor(key).equal(b.get_tensor(key))
