"""Which chat template an engine gets, the ChatML fallback, and the files that carry its stops."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jinja2
import pytest

from fleet.demo_model import ensure_demo_model
from fleetcore.chat_template import (
    CHATML_TEMPLATE,
    TemplatePlan,
    TemplateSource,
    TokenizerFacts,
    choose_template,
    flag_value,
    merged_generation_config,
    plan_template,
    write_engine_files,
)

QWEN_IDS = {"<|im_end|>": 151645, "<|endoftext|>": 151643}


def render(messages: list[dict[str, str]]) -> str:
    return jinja2.Template(CHATML_TEMPLATE).render(messages=messages, add_generation_prompt=True)


def test_chatml_renders_qwens_format_with_its_default_system_prompt() -> None:
    assert render([{"role": "user", "content": "Hi"}]) == (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )


def test_chatml_keeps_a_given_system_prompt_and_the_turns_in_order() -> None:
    text = render([{"role": "system", "content": "Be brief."},
                   {"role": "user", "content": "Q1"}, {"role": "assistant", "content": "A1"},
                   {"role": "user", "content": "Q2"}])
    assert text == ("<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nQ1<|im_end|>\n"
                    "<|im_start|>assistant\nA1<|im_end|>\n<|im_start|>user\nQ2<|im_end|>\n"
                    "<|im_start|>assistant\n")


def test_a_tokenizer_with_a_template_keeps_it() -> None:
    plan = choose_template(None, TokenizerFacts(has_template=True, vocab_ids=QWEN_IDS))
    assert plan == TemplatePlan(TemplateSource.MODEL)
    assert plan.label == "model"


def test_a_tokenizer_without_one_gets_chatml_and_its_stop_tokens() -> None:
    plan = choose_template(None, TokenizerFacts(has_template=False, vocab_ids=QWEN_IDS))
    assert plan.source is TemplateSource.CHATML and plan.label == "chatml"
    assert plan.stop_token_ids == (151645, 151643)
    assert plan.stops_missing == ()


def test_stop_strings_missing_from_the_vocabulary_are_named() -> None:
    plan = choose_template(None, TokenizerFacts(False, {"<|endoftext|>": 0}))
    assert plan.stop_token_ids == (0,)
    assert plan.stops_missing == ("<|im_end|>",)


def test_chatml_can_be_asked_for_even_when_the_tokenizer_has_a_template() -> None:
    plan = choose_template("chatml", TokenizerFacts(has_template=True, vocab_ids=QWEN_IDS))
    assert plan.source is TemplateSource.CHATML and plan.stop_token_ids


def test_a_template_file_overrides(tmp_path: Path) -> None:
    file = tmp_path / "mine.jinja"
    file.write_text("{{ messages[0]['content'] }}")
    plan = choose_template(str(file), TokenizerFacts(has_template=True))
    assert plan.source is TemplateSource.FILE and plan.file == file.resolve()
    assert plan.label == f"file:{file.resolve()}"
    assert plan_template("/no/such/model", str(file)) == plan  # no tokenizer needed
    with pytest.raises(FileNotFoundError):
        choose_template(str(tmp_path / "missing.jinja"), TokenizerFacts(has_template=False))


@pytest.mark.parametrize("base, ids, expected", [
    ({"eos_token_id": 0, "temperature": 0.7}, (2, 0), {"eos_token_id": [0, 2], "temperature": 0.7}),
    ({"eos_token_id": [5, 6]}, (2,), {"eos_token_id": [5, 6, 2]}),
    ({}, (2, 0), {"eos_token_id": [2, 0]}),
])
def test_stop_ids_join_the_generation_configs_eos(base: dict, ids: tuple, expected: dict) -> None:
    assert merged_generation_config(base, ids) == expected


def test_flag_value_reads_both_spellings() -> None:
    assert flag_value(["--tokenizer", "/t", "--x"], "--tokenizer") == "/t"
    assert flag_value(["--tokenizer=/t"], "--tokenizer") == "/t"
    assert flag_value(["--tokenizer-mode", "slow"], "--tokenizer") is None


def test_engine_files_for_chatml(tmp_path: Path) -> None:
    model = tmp_path / "model"
    model.mkdir()
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": 0,
                                                              "temperature": 0.3}))
    plan = TemplatePlan(TemplateSource.CHATML, stop_token_ids=(2, 0))
    files = write_engine_files(plan, str(model), tmp_path)
    assert files.chat_template is not None and files.chat_template.read_text() == CHATML_TEMPLATE
    assert files.generation_config is not None
    config = json.loads((files.generation_config / "generation_config.json").read_text())
    assert config["eos_token_id"] == [0, 2] and config["temperature"] == 0.3
    assert files.engine_args() == ["--chat-template", str(files.chat_template),
                                   "--generation-config", str(files.generation_config)]
    assert files.llm_kwargs() == {"chat_template": str(files.chat_template),
                                  "generation_config": str(files.generation_config)}


def test_a_users_generation_config_is_left_alone(tmp_path: Path) -> None:
    plan = TemplatePlan(TemplateSource.CHATML, stop_token_ids=(2,))
    files = write_engine_files(plan, str(tmp_path), tmp_path, ["--generation-config", "vllm"])
    assert files.generation_config is None and files.chat_template is not None


def test_the_models_own_template_needs_no_files(tmp_path: Path) -> None:
    files = write_engine_files(TemplatePlan(TemplateSource.MODEL), "m", tmp_path)
    assert files.engine_args() == [] and list(tmp_path.iterdir()) == []


def test_real_tokenizers_with_and_without_a_template(tmp_path: Path) -> None:
    demo = ensure_demo_model(progress=False)
    assert plan_template(str(demo), None).source is TemplateSource.MODEL
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json", "config.json"):
        shutil.copy(demo / name, bare / name)
    config = json.loads((bare / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    (bare / "tokenizer_config.json").write_text(json.dumps(config))
    plan = plan_template(str(bare), None)
    # SmolLM2's vocabulary: <|endoftext|> is 0, <|im_end|> is 2.
    assert plan.source is TemplateSource.CHATML and plan.stop_token_ids == (2, 0)
    # --tokenizer in the engine's flags is the one inspected.
    assert plan_template("/no/such/model", None, ["--tokenizer", str(demo)]).source is \
        TemplateSource.MODEL
