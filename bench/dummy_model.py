"""A Llama-3-8B-shaped model folder with no weights, for `--load-format dummy` on a GPU.

Config of the 8B shape (hidden 4096, 32 layers, 32 heads, 8 KV heads, intermediate 14336) with
the demo model's tokenizer, so vocab 49152. Throughput and latency with dummy weights are those
of the real shape. Run here, then carry the folder to the GPU machine:

    .venv/bin/python bench/dummy_model.py .gpu/llama8b
"""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

from fleet.demo_model import ensure_demo_model

CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
    "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "max_position_embeddings": 8192, "rms_norm_eps": 1e-5, "rope_theta": 500000.0,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16", "vocab_size": 49152,
    "bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2,
}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def main(target: str) -> None:
    demo = ensure_demo_model(progress=False)
    out = Path(target)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(CONFIG, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"eos_token_id": 2}) + "\n")
    for name in TOKENIZER_FILES:
        shutil.copy(demo / name, out / name)
    print(out)


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else ".gpu/llama8b")
