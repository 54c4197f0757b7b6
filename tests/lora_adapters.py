"""PEFT LoRA adapters for the demo model, made on the spot for tests and benchmarks.

`peft` writes the first adapter, so the files are exactly what a user's fine-tune would hold;
the others copy its layout with fresh seeded weights. The B matrices are scaled well above
peft's init: an adapter with init-sized weights leaves the demo model's greedy answer as it was,
and a test must see an adapter change the answer (and two adapters answer differently).

A model folder with no weights (bench/dummy_model.py, served with `--load-format dummy` on a
GPU) has nothing for peft to wrap: `make_adapters_for_config` writes the same files from the
folder's config alone (tests/integration/test_lora_adapters.py checks them against peft's).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Sequence
from pathlib import Path

RANK = 8
TARGETS = ("q_proj", "v_proj")
SCALE = 50.0
_WEIGHTS = "adapter_model.safetensors"


def _first_adapter(base: Path, target: Path, seed: int) -> None:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    config = LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=list(TARGETS),
                        init_lora_weights=False, task_type="CAUSAL_LM")
    peft_model = get_peft_model(model, config)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_B" in name:
                param.mul_(SCALE)
    peft_model.save_pretrained(str(target))


def _reseed(source: Path, target: Path, seed: int) -> None:
    import torch
    from safetensors.torch import load_file, save_file

    target.mkdir(parents=True)
    shutil.copy(source / "adapter_config.json", target / "adapter_config.json")
    generator = torch.Generator().manual_seed(seed)
    tensors = load_file(str(source / _WEIGHTS))
    fresh = {}
    for key, tensor in sorted(tensors.items()):
        noise = torch.randn(tensor.shape, generator=generator, dtype=torch.float32)
        # The same spread per matrix as peft's own init had, new values.
        fresh[key] = (noise * tensor.float().std()).to(tensor.dtype).contiguous()
    save_file(fresh, str(target / _WEIGHTS))


def make_adapters(base: Path, folder: Path, names: Sequence[str], seed: int = 0
                  ) -> dict[str, Path]:
    """One adapter folder per name under `folder` (reused when already made)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / name for name in names}
    first = folder / ".template"
    if not (first / _WEIGHTS).is_file():
        shutil.rmtree(first, ignore_errors=True)
        _first_adapter(base, first, seed)
    for index, path in enumerate(paths.values()):
        if not (path / _WEIGHTS).is_file():
            shutil.rmtree(path, ignore_errors=True)
            _reseed(first, path, seed + 1 + index)
        config = json.loads((path / "adapter_config.json").read_text())
        assert config["r"] == RANK, config
    return paths


def make_adapters_for_config(base: Path, folder: Path, names: Sequence[str], seed: int = 0
                             ) -> dict[str, Path]:
    """As `make_adapters`, from `base`'s config.json alone: the layout peft writes for a
    Llama-style model (rank RANK on the q and v projections), seeded random weights."""
    import torch
    from safetensors.torch import save_file

    config = json.loads((base / "config.json").read_text())
    hidden, heads = config["hidden_size"], config["num_attention_heads"]
    head_dim = config.get("head_dim") or hidden // heads
    out = {"q_proj": heads * head_dim,
           "v_proj": config.get("num_key_value_heads", heads) * head_dim}
    adapter_config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": str(base),
        "r": RANK, "lora_alpha": 2 * RANK, "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "target_modules": list(TARGETS), "init_lora_weights": False,
        "inference_mode": True, "use_rslora": False, "use_dora": False,
        "modules_to_save": None,
    }
    folder.mkdir(parents=True, exist_ok=True)
    paths = {name: folder / name for name in names}
    for index, path in enumerate(paths.values()):
        if (path / _WEIGHTS).is_file():
            continue
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        generator = torch.Generator().manual_seed(seed + 1 + index)
        tensors = {}
        for layer in range(config["num_hidden_layers"]):
            for target in TARGETS:
                key = f"base_model.model.model.layers.{layer}.self_attn.{target}"
                # peft's kaiming init for A; B as A's spread times SCALE (init is zero).
                a = torch.randn((RANK, hidden), generator=generator) / hidden ** 0.5
                b = torch.randn((out[target], RANK), generator=generator) * SCALE / hidden ** 0.5
                tensors[f"{key}.lora_A.weight"] = a.contiguous()
                tensors[f"{key}.lora_B.weight"] = b.contiguous()
        save_file(tensors, str(path / _WEIGHTS))
        (path / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2) + "\n")
    return paths
