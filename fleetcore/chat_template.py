"""Which chat template an engine renders conversations with, and the ChatML fallback.

Older chat models (Qwen-7B-Chat, Qwen-1_8B-Chat, ...) ship a tokenizer without `chat_template`,
and vLLM refuses chat requests for them. Such a model gets the built-in ChatML template
(`<|im_start|>role\\n...<|im_end|>\\n`) and the stop tokens `<|im_end|>` and `<|endoftext|>`: the
model's own eos is often only `<|endoftext|>`, so without them it would write `<|im_end|>` and go
on to invent the user's next turn.

The stops reach the engine as its generation config (`--generation-config DIR` for the server,
`generation_config=DIR` for `vllm.LLM`): vLLM adds the `eos_token_id`s listed there to every
request's stop tokens, on chat and completions alike, and leaves them out of the text. Nothing
between the client and the engine has to rewrite requests for it.

The worker and `fleet batch --offline` both use `plan_template` then `write_engine_files`.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

# Qwen's own format and default system prompt, as the seed's Qwen chat wrapper renders it.
CHATML_TEMPLATE = (
    "{%- for message in messages %}"
    "{%- if loop.first and message['role'] != 'system' %}"
    "{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}"
    "{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
CHATML_STOPS = ("<|im_end|>", "<|endoftext|>")
CHATML = "chatml"  # the value of --chat-template that asks for the built-in template


class TemplateSource(StrEnum):
    MODEL = "model"  # the tokenizer's own chat_template
    CHATML = "chatml"  # the built-in fallback
    FILE = "file"  # --chat-template FILE


@dataclass(frozen=True)
class TokenizerFacts:
    has_template: bool
    vocab_ids: Mapping[str, int] = field(default_factory=dict)  # of the ChatML stop strings


@dataclass(frozen=True)
class TemplatePlan:
    source: TemplateSource
    file: Path | None = None  # the --chat-template file
    stop_token_ids: tuple[int, ...] = ()
    stops_missing: tuple[str, ...] = ()  # ChatML stop strings the vocabulary lacks as one token

    @property
    def label(self) -> str:
        """What the worker reports in its registry record."""
        if self.source is TemplateSource.FILE:
            return f"file:{self.file}"
        return self.source.value


@dataclass(frozen=True)
class EngineTemplateFiles:
    """What the engine gets: a template to render with and a generation config with the stops."""

    chat_template: Path | None = None
    generation_config: Path | None = None

    def engine_args(self) -> list[str]:
        args: list[str] = []
        if self.chat_template is not None:
            args += ["--chat-template", str(self.chat_template)]
        if self.generation_config is not None:
            args += ["--generation-config", str(self.generation_config)]
        return args

    def llm_kwargs(self) -> dict[str, str]:
        kwargs: dict[str, str] = {}
        if self.chat_template is not None:
            kwargs["chat_template"] = str(self.chat_template)
        if self.generation_config is not None:
            kwargs["generation_config"] = str(self.generation_config)
        return kwargs


def choose_template(override: str | None, facts: TokenizerFacts) -> TemplatePlan:
    """The template for a tokenizer: an explicit override, else its own, else ChatML."""
    if override is not None and override != CHATML:
        path = Path(override).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"chat template file {path} does not exist")
        return TemplatePlan(TemplateSource.FILE, file=path.resolve())
    if override is None and facts.has_template:
        return TemplatePlan(TemplateSource.MODEL)
    ids = tuple(dict.fromkeys(facts.vocab_ids[s] for s in CHATML_STOPS if s in facts.vocab_ids))
    missing = tuple(s for s in CHATML_STOPS if s not in facts.vocab_ids)
    return TemplatePlan(TemplateSource.CHATML, stop_token_ids=ids, stops_missing=missing)


def flag_value(args: Sequence[str], flag: str) -> str | None:
    """The value of `--flag X` or `--flag=X` in an argument list (the last one wins)."""
    value = None
    for i, arg in enumerate(args):
        if arg == flag and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(flag + "="):
            value = arg.split("=", 1)[1]
    return value


def inspect_tokenizer(name_or_path: str, *, trust_remote_code: bool = False) -> TokenizerFacts:
    """Load the tokenizer (blocking, a few seconds) and read what the template choice needs."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    vocab = tokenizer.get_vocab()
    ids = {s: int(vocab[s]) for s in CHATML_STOPS if s in vocab}
    return TokenizerFacts(has_template=bool(getattr(tokenizer, "chat_template", None)),
                          vocab_ids=ids)


def plan_template(model: str, override: str | None,
                  engine_args: Sequence[str] = ()) -> TemplatePlan:
    """Inspect the model's tokenizer (or the engine's `--tokenizer`) and choose (blocking)."""
    if override is not None and override != CHATML:
        return choose_template(override, TokenizerFacts(has_template=True))
    tokenizer = flag_value(engine_args, "--tokenizer") or model
    facts = inspect_tokenizer(tokenizer, trust_remote_code="--trust-remote-code" in engine_args)
    plan = choose_template(override, facts)
    if plan.stops_missing:
        logger.warning("ChatML stop strings missing from the vocabulary model=%s missing=%s; "
                       "the engine cannot stop on them", model, ",".join(plan.stops_missing))
    return plan


def merged_generation_config(base: Mapping[str, Any], stop_ids: Sequence[int]) -> dict[str, Any]:
    """`base` with `stop_ids` added to its eos_token_id (an int or a list, kept in order)."""
    eos = base.get("eos_token_id")
    current = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return {**base, "eos_token_id": list(dict.fromkeys([*current, *stop_ids]))}


def _model_generation_config(model: str) -> dict[str, Any]:
    from transformers import AutoConfig, GenerationConfig

    try:
        config = GenerationConfig.from_pretrained(model)
    except OSError:
        try:
            config = GenerationConfig.from_model_config(AutoConfig.from_pretrained(model))
        except (OSError, ValueError):
            return {}
    return dict(config.to_diff_dict())


def write_engine_files(plan: TemplatePlan, model: str, workdir: Path,
                       engine_args: Sequence[str] = ()) -> EngineTemplateFiles:
    """Write what `plan` needs into `workdir` (blocking); the engine reads it at start."""
    if plan.source is TemplateSource.MODEL:
        return EngineTemplateFiles()
    if plan.source is TemplateSource.FILE:
        return EngineTemplateFiles(chat_template=plan.file)
    template = workdir / "chatml.jinja"
    template.write_text(CHATML_TEMPLATE)
    if not plan.stop_token_ids:
        return EngineTemplateFiles(chat_template=template)
    if flag_value(engine_args, "--generation-config") is not None:
        logger.warning("--generation-config is set: the ChatML stop tokens %s are not added",
                       list(plan.stop_token_ids))
        return EngineTemplateFiles(chat_template=template)
    folder = workdir / "generation-config"
    folder.mkdir(exist_ok=True)
    config = merged_generation_config(_model_generation_config(model), plan.stop_token_ids)
    (folder / "generation_config.json").write_text(json.dumps(config, indent=2))
    return EngineTemplateFiles(chat_template=template, generation_config=folder)
