"""The gateway tokenises chats as the engine's tokenizer and template do (the demo model's)."""

from __future__ import annotations

import random

import pytest
from transformers import AutoTokenizer

from fleet.demo_model import demo_model_path, is_complete
from gateway.prompt_tokens import PromptTokenizer
from gateway.protocol import ChatCompletionRequest, CompletionRequest
from worker.tokenizer_files import read_tokenizer_files

MODEL = demo_model_path()
pytestmark = pytest.mark.skipif(not is_complete(MODEL), reason="the demo model is not prepared")
WORDS = "lantern harbor ember  glacier\n\nthimble, falcon; quartz! café 東京 🙂".split(" ")


def chats(n: int) -> list[list[dict[str, str]]]:
    rng = random.Random(0)
    system = " ".join(rng.choice(WORDS) for _ in range(300))
    out = []
    for i in range(n):
        turns = [{"role": "system", "content": system}] if i % 3 else []
        for t in range(1 + i % 3):
            turns.append({"role": "user", "content": " ".join(rng.choice(WORDS)
                                                              for _ in range(5 + t))})
            turns.append({"role": "assistant", "content": f"answer {t} <|im_end|> inside"})
        turns.append({"role": "user", "content": "and now?"})
        out.append(turns)
    return out


def test_chat_ids_are_the_hugging_face_template_and_tokenizer_ids() -> None:
    files = read_tokenizer_files(MODEL, None)
    assert files is not None and files.chat_template
    ours = PromptTokenizer(files)
    theirs = AutoTokenizer.from_pretrained(str(MODEL))
    for messages in chats(12):  # twice each: the second from the cache of pieces
        # vLLM's path: render to text, then encode without adding special tokens.
        text = theirs.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        expected = theirs(text, add_special_tokens=False)["input_ids"]
        request = ChatCompletionRequest.model_validate({"model": "m", "messages": messages})
        assert request.prompt_ids(ours) == list(expected)
        assert request.prompt_ids(ours) == list(expected)


def test_completion_ids_and_token_prompts() -> None:
    files = read_tokenizer_files(MODEL, None)
    assert files is not None
    ours = PromptTokenizer(files)
    theirs = AutoTokenizer.from_pretrained(str(MODEL))
    text = CompletionRequest(model="m", prompt="The capital of France is")
    assert text.prompt_ids(ours) == theirs("The capital of France is")["input_ids"]
    assert CompletionRequest(model="m", prompt=[5, 6, 7]).prompt_ids(ours) == [5, 6, 7]
