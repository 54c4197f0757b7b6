"""The chat page as `make run` serves it: `fleet up` with its defaults, nothing else.

No API keys, no chat log, the demo fleet (a worker for the chat model and one for the
embedding model, each on its share of the cores): what a newcomer gets. The page offers the chat
model; the embedding model's card lists no chat endpoint. (The scenario in
test_webui.py runs the page with `--log-dir`, the variant with feedback buttons.) The `new_page`
fixture fails the test on any script or console error of the page.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING

import pytest

from tests.e2e.test_webui import FRANCE, answers, questions, send, shot, status, wait_answered
from tests.integration.fleet_up import FleetUp
from tests.integration.harness import MODEL_NAME

if TYPE_CHECKING:
    from collections.abc import Callable

    from playwright.sync_api import Page


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[FleetUp]:
    up = FleetUp(tmp_path_factory.mktemp("fleet-up-default"))
    try:
        up.start_and_wait(timeout=600)
        yield up
    finally:
        assert up.stop() == 0, up.tail()


def test_the_default_page_shows_the_question_and_the_streamed_answer(
    fleet: FleetUp, new_page: Callable[[], Page]
) -> None:
    from playwright.sync_api import expect

    assert "--log-dir" not in " ".join(fleet.services()["webui"].cmdline())
    page = new_page()
    page.goto(fleet.webui_url)
    expect(page.locator("#model input")).to_have_value(MODEL_NAME)
    expect(status(page)).to_have_text("")
    # As a newcomer does: type, press Enter, with the page's own settings.
    page.locator("#message textarea").fill(FRANCE)
    page.locator("#message textarea").press("Enter")
    expect(questions(page)).to_have_count(1, timeout=10_000)
    expect(questions(page).first).to_contain_text(FRANCE)
    first = wait_answered(page, 1, timeout=120_000)
    assert first.strip(), "the answer is empty"
    expect(status(page)).to_have_text("")
    # No log, so no feedback buttons that would record nothing.
    expect(page.locator('#chatbot button[aria-label="Like"]')).to_have_count(0)
    shot(page, "20-fleet-up-default")

    send(page, "And of Germany?")
    second = wait_answered(page, 2, timeout=120_000)
    assert second.strip()
    expect(questions(page)).to_have_count(2)
    assert answers(page).first.inner_text() == first
    shot(page, "21-fleet-up-default-follow-up")

