"""The chat UI in a real browser, against the real stack serving the demo model on CPU.

Screenshots of each step go to artifacts/screenshots/ (ignored by git), to look at.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import httpx

from tests.e2e.conftest import SCREENSHOTS, UIStack
from tests.integration.harness import API_KEY, MODEL_NAME, free_port

if TYPE_CHECKING:
    from playwright.sync_api import Page

NewPage = Callable[[], "Page"]
FRANCE = "Name the capital of France."  # a clear greedy margin (test_openai_api.py says why)
STORY = "Write a very long story about a dragon who learns to fly. Make it at least 2000 words."
CODE = "Write a Python function that adds two numbers."


# --- reading and driving the page ----------------------------------------------------------------

def shot(page: Page, name: str) -> None:
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=SCREENSHOTS / f"{name}.png", full_page=True)


def answers(page: Page) -> Any:
    return page.locator('#chatbot [data-testid="bot"]')


def questions(page: Page) -> Any:
    return page.locator('#chatbot [data-testid="user"]')


def status(page: Page) -> Any:
    return page.locator("#status")


def set_number(page: Page, elem_id: str, value: float) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")
    box.blur()


def send(page: Page, text: str | None = None) -> None:
    if text is not None:
        page.locator("#message textarea").fill(text)
    page.locator("#send").click()


def wait_answered(page: Page, asked: int, timeout: float = 60_000) -> str:
    """Wait for the `asked`-th question's answer to end; return its text."""
    from playwright.sync_api import expect

    expect(questions(page)).to_have_count(asked, timeout=timeout)
    expect(status(page)).not_to_contain_text("Generating", timeout=timeout)
    expect(answers(page)).to_have_count(asked)
    return str(answers(page).last.inner_text())


def engine_running(stack: UIStack) -> int:
    url = stack.worker_record("worker")["engine_url"].rstrip("/")
    text = httpx.get(f"{url}/metrics", timeout=5).text
    return int(sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith("vllm:num_requests_running")))


def served_models(stack: UIStack) -> list[str]:
    data = httpx.get(f"{stack.gateway_url}/v1/models", timeout=5,
                     headers={"Authorization": f"Bearer {API_KEY}"}).json()
    return [m["id"] for m in data["data"]]


def turns_logged(log_dir: Path) -> list[dict[str, Any]]:
    lines = [json.loads(line) for path in sorted(log_dir.glob("webui-*.jsonl"))
             for line in path.read_text().splitlines()]
    return lines


WATCH_ANSWERS = """() => {
    window.seenAnswers = [];
    const chat = document.querySelector('#chatbot');
    new MutationObserver(() => {
        const bots = chat.querySelectorAll('[data-testid="bot"]');
        if (bots.length) window.seenAnswers.push(bots[bots.length - 1].innerText.trim());
    }).observe(chat, {subtree: true, childList: true, characterData: true});
}"""


# --- the scenario --------------------------------------------------------------------------------

def test_chat_streams_stops_regenerates_clears_and_survives_a_worker_restart(
    stack: UIStack, new_page: NewPage, tmp_path: Path
) -> None:
    from playwright.sync_api import expect

    log_dir = tmp_path / "chat-log"
    _, url = stack.start_webui(log_dir=log_dir)
    page = new_page()

    # 1. The page loads with the served model chosen, and no error.
    page.goto(url)
    expect(page.locator("#model input")).to_have_value(MODEL_NAME)
    expect(status(page)).to_have_text("")
    assert API_KEY not in page.content()
    assert API_KEY not in httpx.get(f"{url}/config", timeout=10).text
    shot(page, "01-loaded")

    # 2. A deterministic question streams its answer into the chat.
    set_number(page, "temperature", 0)
    set_number(page, "max-tokens", 64)
    page.evaluate(WATCH_ANSWERS)
    send(page, FRANCE)
    expect(answers(page).first).to_contain_text("Paris", timeout=60_000)
    first = wait_answered(page, 1)
    assert "Paris" in first
    seen = [t for t in dict.fromkeys(page.evaluate("window.seenAnswers")) if t]
    assert len(seen) >= 2, f"the answer did not stream: {seen}"
    assert all(first.startswith(partial) for partial in seen), seen
    expect(page.locator("#message textarea")).to_have_value("")
    # The turn is logged once the status has cleared (a write in a thread): wait for it.
    stack.wait_for(lambda: len(turns_logged(log_dir)) == 1, "the turn in the log", 10)
    turn = turns_logged(log_dir)[-1]
    assert (turn["type"], turn["model"], turn["outcome"]) == ("turn", MODEL_NAME, "complete")
    assert turn["parameters"] == {"temperature": 0.0, "top_p": 1.0, "max_tokens": 64}
    shot(page, "02-paris")

    # 👍 on the answer goes into the log.
    page.locator('#chatbot button[aria-label="Like"]').first.click()
    stack.wait_for(lambda: turns_logged(log_dir)[-1]["type"] == "feedback", "the 👍", 10)
    assert turns_logged(log_dir)[-1]["rating"] == "like"

    # 3. A follow-up only makes sense with the history, which every turn sends.
    logged = len(turns_logged(log_dir))
    send(page, "And of Germany?")
    assert "Berlin" in wait_answered(page, 2)
    stack.wait_for(lambda: len(turns_logged(log_dir)) > logged, "the turn in the log", 10)
    conversation = turns_logged(log_dir)[-1]["conversation"]
    assert [m["role"] for m in conversation] == ["user", "assistant"] * 2
    assert conversation[0]["content"] == FRANCE
    shot(page, "03-follow-up")

    # 4. A long story streams; meanwhile a second user is answered without waiting for it
    #    (with a code block rendered); then Stop ends the story and the engine drops it.
    set_number(page, "max-tokens", 3000)
    send(page, STORY)
    expect(questions(page)).to_have_count(3)
    stack.wait_for(lambda: answers(page).count() == 3
                   and len(answers(page).nth(2).inner_text()) > 80, "the story to stream", 60)
    expect(status(page)).to_contain_text("Generating")
    so_far = answers(page).nth(2).inner_text()
    stack.wait_for(lambda: len(answers(page).nth(2).inner_text()) > len(so_far),
                   "the story to grow", 30)

    other = new_page()
    other.goto(url)
    expect(other.locator("#model input")).to_have_value(MODEL_NAME)
    set_number(other, "temperature", 0)
    set_number(other, "max-tokens", 48)
    send(other, CODE)
    wait_answered(other, 1)
    expect(other.locator("#chatbot pre code").first).to_contain_text("def ")
    shot(other, "04-second-user-code-block")
    assert questions(other).count() == 1  # the first user's conversation is not here

    before_stop = len(answers(page).nth(2).inner_text())
    expect(status(page)).to_contain_text("Generating")
    stack.wait_for(lambda: engine_running(stack) == 1, "the engine to run the story", 10)
    page.locator("#stop").click()
    expect(status(page)).to_contain_text("Stopped", timeout=5_000)
    # 3000 tokens would take the engine minutes on one core.
    stack.wait_for(lambda: engine_running(stack) == 0, "the engine to abort the story", 10)
    stopped = answers(page).nth(2).inner_text()
    assert len(stopped) >= before_stop
    assert answers(page).nth(2).inner_text() == stopped
    stack.wait_for(lambda: turns_logged(log_dir)[-1].get("outcome") == "stopped",
                   "the stopped turn in the log", 10)
    shot(page, "05-stopped")

    # 5. Regenerate replaces the last answer (a short one this time) instead of adding one.
    set_number(page, "max-tokens", 16)
    logged = len(turns_logged(log_dir))
    page.locator("#regenerate").click()
    expect(answers(page).nth(2)).not_to_have_text(stopped)
    regenerated = wait_answered(page, 3)
    assert regenerated != stopped
    stack.wait_for(lambda: len(turns_logged(log_dir)) > logged, "the new turn in the log", 30)
    turn = turns_logged(log_dir)[-1]
    assert turn["outcome"] == "complete"
    assert turn["parameters"]["max_tokens"] == 16
    assert [m["content"] for m in turn["conversation"][::2]] == [FRANCE, "And of Germany?",
                                                                 STORY]
    assert answers(page).nth(2).inner_text() == regenerated
    shot(page, "06-regenerated")

    # A prompt longer than the model's context is refused with its own message, and the
    # conversation is left as it was.
    send(page, "lorem ipsum " * 3000)
    expect(status(page)).to_contain_text("too long for", timeout=30_000)
    expect(status(page)).to_contain_text("context")
    expect(questions(page)).to_have_count(3)
    shot(page, "07-context-exceeded")
    page.locator("#message textarea").fill("")

    # 6. Clear empties the conversation.
    page.locator("#clear").click()
    expect(questions(page)).to_have_count(0)
    expect(answers(page)).to_have_count(0)
    expect(status(page)).to_have_text("")

    # 7. With the only worker gone, the chat says so, and keeps the question for later.
    stack.stop("worker")
    stack.wait_for(lambda: served_models(stack) == [], "the gateway to drop the worker", 30)
    send(page, FRANCE)
    expect(status(page)).to_contain_text("No worker is serving", timeout=30_000)
    expect(questions(page)).to_have_count(0)
    expect(page.locator("#message textarea")).to_have_value(FRANCE)
    shot(page, "08-no-worker")
    page.locator("#refresh").click()
    expect(status(page)).to_contain_text("serves no model right now")
    expect(page.locator("#model input")).to_have_value(MODEL_NAME)

    # 8. A worker joins again: refresh, and the same page chats again.
    stack.start_worker("worker", cpus="0")
    stack.wait_routable(timeout=300)
    page.locator("#refresh").click()
    expect(status(page)).to_have_text("")
    send(page)
    assert "Paris" in wait_answered(page, 1)
    shot(page, "09-worker-back")


def test_a_wrong_api_key_and_an_unreachable_gateway_each_get_their_message(
    stack: UIStack, new_page: NewPage
) -> None:
    from playwright.sync_api import expect

    _, wrong_key = stack.start_webui("webui-wrong-key", api_key="sk-wrong")
    page = new_page()
    page.goto(wrong_key)
    expect(status(page)).to_contain_text("refused the API key (401)")
    assert "sk-wrong" not in page.content()
    shot(page, "10-wrong-key")

    nowhere = f"http://127.0.0.1:{free_port()}"
    _, unreachable = stack.start_webui("webui-unreachable", gateway_url=nowhere)
    page = new_page()
    page.goto(unreachable)
    expect(status(page)).to_contain_text(f"Cannot reach the gateway at {nowhere}")
    # Still usable: asking again gets the same clear answer.
    page.locator("#refresh").click()
    expect(status(page)).to_contain_text("Cannot reach the gateway")
    shot(page, "11-unreachable")
