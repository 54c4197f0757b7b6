"""The tokenizer files a gateway needs to tokenise prompts as this worker's engine does."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

from worker.protocol import TokenizerFiles

logger = logging.getLogger(__name__)


def _token(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def read_tokenizer_files(folder: Path, template_file: Path | None) -> TokenizerFiles | None:
    """From a local model (or `--tokenizer`) folder, with the template the engine was given
    (`template_file`) or else the model's own; None when the folder has no `tokenizer.json`
    (a Hugging Face id, a slow tokenizer): gateways then route on their own estimate."""
    tokenizer = folder / "tokenizer.json"
    if not tokenizer.is_file():
        return None
    config_path = folder / "tokenizer_config.json"
    try:
        config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    except ValueError as exc:
        logger.warning("unreadable tokenizer config path=%s error=%r", config_path, exc)
        config = {}
    own = folder / "chat_template.jinja"
    template: Any
    if template_file is not None:
        template = template_file.read_text()
    elif own.is_file():
        template = own.read_text()
    else:
        template = config.get("chat_template")
        if isinstance(template, list):  # named templates: the engine uses "default"
            template = next((t.get("template") for t in template
                             if isinstance(t, dict) and t.get("name") == "default"), None)
    return TokenizerFiles(
        tokenizer_json=tokenizer.read_text(),
        chat_template=template if isinstance(template, str) else None,
        bos_token=_token(config.get("bos_token")), eos_token=_token(config.get("eos_token")),
    )
