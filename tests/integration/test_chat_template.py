"""Prompt templates on real workers: the ChatML fallback for a tokenizer without a template, with
its stop tokens, and a --chat-template file.

The "bare" model is the demo model's real weights behind a tokenizer folder made like
Qwen-7B-Chat's: no chat_template, and `<|endoftext|>` as its eos. Such a model ends a turn with
`<|im_end|>`, which is not its eos: without the fallback's stop tokens it writes on into an
invented next turn. The module starts both workers at once, one per core.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Iterator
from pathlib import Path

import openai
import pytest
from transformers import AutoTokenizer

from fleet.client import Chat
from tests.integration.harness import API_KEY, Stack

pytestmark = pytest.mark.integration
BARE, CUSTOM = "bare-chat", "custom-chat"
CUSTOM_TEMPLATE = ("{% for m in messages %}[{{ m['role'] }}]: {{ m['content'] }}\n{% endfor %}"
                   "{% if add_generation_prompt %}[assistant]: {% endif %}")
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
IM_END = 2  # in SmolLM2's vocabulary


def bare_model(demo: Path, folder: Path) -> Path:
    """The demo model with its chat template taken away and eos set to <|endoftext|>."""
    folder.mkdir()
    for item in demo.iterdir():
        if item.name == "chat_template.jinja":
            continue
        if item.suffix == ".safetensors":
            os.symlink(item, folder / item.name)
        else:
            shutil.copy(item, folder / item.name)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config.pop("chat_template", None)
    config["eos_token"] = "<|endoftext|>"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    for name in ("config.json", "generation_config.json"):
        data = json.loads((folder / name).read_text())
        data["eos_token_id"] = 0
        (folder / name).write_text(json.dumps(data))
    return folder


@pytest.fixture(scope="module")
def templated(tmp_path_factory: pytest.TempPathFactory, model_path: Path) -> Iterator[Stack]:
    work = tmp_path_factory.mktemp("templates")
    template = work / "custom.jinja"
    template.write_text(CUSTOM_TEMPLATE)
    stack = Stack(workdir=work, model_path=model_path)
    try:
        stack.start_controller()
        stack.start_gateway()
        stack.start_worker("bare", cpus="0", model=bare_model(model_path, work / "bare"),
                           model_name=BARE)
        stack.start_worker("custom", cpus="1", model_name=CUSTOM,
                           extra=["--chat-template", str(template)])
        stack.wait_worker_state("bare", "ready", timeout=300)
        stack.wait_worker_state("custom", "ready", timeout=300)
        stack.wait_for(lambda: len(stack.workers()) == 2 and _served(stack) >= {BARE, CUSTOM},
                       "the gateway to route both models", 30)
        yield stack
    finally:
        stack.close()


def _served(stack: Stack) -> set[str]:
    with _client(stack) as client:
        return {m.id for m in client.models.list()}


def _client(stack: Stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.gateway_url}/v1", api_key=API_KEY, timeout=120,
                         max_retries=0)


@pytest.fixture(scope="module")
def tokenizer(model_path: Path) -> object:
    return AutoTokenizer.from_pretrained(str(model_path))


def test_workers_report_their_template_in_the_registry(templated: Stack) -> None:
    assert templated.worker_record("bare")["chat_template"] == "chatml"
    custom = templated.worker_record("custom")["chat_template"]
    assert custom.startswith("file:") and custom.endswith("custom.jinja")


def test_the_fallback_renders_chatml(templated: Stack, tokenizer: object) -> None:
    with _client(templated) as client:
        reply = client.chat.completions.create(
            model=BARE, messages=FRANCE, max_tokens=1, extra_body={"return_token_ids": True})
    prompt = tokenizer.decode(reply.model_extra["prompt_token_ids"])  # type: ignore[attr-defined]
    assert prompt == ("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
                      "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
                      "<|im_start|>assistant\n")


def test_the_answer_stops_at_im_end_and_no_stop_word_leaks(templated: Stack) -> None:
    # skip_special_tokens=False would show a leaked <|im_end|> or <|im_start|> as text.
    with _client(templated) as client:
        reply = client.chat.completions.create(
            model=BARE, messages=FRANCE, max_tokens=80, temperature=0,
            extra_body={"skip_special_tokens": False})
    choice = reply.choices[0]
    assert "Paris" in choice.message.content
    assert "<|im_end|>" not in choice.message.content
    assert "<|im_start|>" not in choice.message.content
    assert "user" not in choice.message.content  # no invented next turn
    assert choice.finish_reason == "stop"
    assert choice.model_extra["stop_reason"] == IM_END  # our stop token, not the eos


def test_streamed_answers_and_the_client_get_the_same_clean_text(templated: Stack) -> None:
    chat = Chat(templated.gateway_url, API_KEY, BARE, temperature=0, max_tokens=80,
                extra_body={"skip_special_tokens": False}, max_retries=0)
    with chat:
        answer, history = chat.chat("What is the capital of France?")
        with chat.stream_chat("What is the capital of France?") as stream:
            streamed = "".join(stream)
    assert answer == streamed
    assert "Paris" in answer and "<|im_" not in answer and "user" not in answer
    assert stream.finish_reason == "stop"
    assert history[-1]["content"] == answer


def test_raw_completions_on_the_model_stop_at_im_end_too(templated: Stack) -> None:
    prompt = ("<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
              "<|im_start|>assistant\n")
    with _client(templated) as client:
        reply = client.completions.create(model=BARE, prompt=prompt, max_tokens=80,
                                          temperature=0)
    assert reply.choices[0].finish_reason == "stop"
    assert "Paris" in reply.choices[0].text and "user" not in reply.choices[0].text


def test_a_template_file_overrides_the_tokenizers(templated: Stack, tokenizer: object) -> None:
    with _client(templated) as client:
        reply = client.chat.completions.create(
            model=CUSTOM, messages=FRANCE, max_tokens=1, extra_body={"return_token_ids": True})
    prompt = tokenizer.decode(reply.model_extra["prompt_token_ids"])  # type: ignore[attr-defined]
    assert prompt == "[user]: What is the capital of France?\n[assistant]: "
