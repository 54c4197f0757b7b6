"""Browser tests: the real stack, the web UI as a process, and Debian's chromium via playwright.

Playwright drives the system's `/usr/bin/chromium` (never a downloaded browser). Without it, or
without the playwright package, every test here is skipped with the reason; `make test` installs
chromium first, so CI runs them.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import httpx
import pytest

from fleet.demo_model import ensure_demo_model
from tests.integration.harness import API_KEY, Service, Stack, free_port

if TYPE_CHECKING:
    from playwright.sync_api import Browser, Page

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
SCREENSHOTS = Path(__file__).resolve().parents[2] / "artifacts" / "screenshots"


def _missing() -> str | None:
    if not Path(CHROMIUM).exists():
        return "chromium is not installed (make test installs it: apt-get install -y chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "the playwright package is missing (pip install -e '.[test]')"
    return None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    reason = _missing()
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.e2e)
            if reason:
                item.add_marker(pytest.mark.skip(reason=reason))


class UIStack(Stack):
    """The integration harness's stack, plus web UI processes."""

    def start_webui(self, name: str = "webui", *, gateway_url: str | None = None,
                    api_key: str = API_KEY, log_dir: Path | None = None) -> tuple[Service, str]:
        port = free_port()
        argv = ["-m", "webui", "--port", str(port), "--gateway-url",
                gateway_url or self.gateway_url, "--timeout", "60"]
        if log_dir is not None:
            argv += ["--log-dir", str(log_dir)]
        # The key goes in the environment, as a deployment would pass it: not on the command line.
        service = self._spawn(name, argv, env={"FLEET_WEBUI_API_KEY": api_key})
        url = f"http://127.0.0.1:{port}"
        self.wait_for(lambda: httpx.get(f"{url}/health", timeout=2).is_success,
                      f"{name} to answer", 60, watch=[name])
        return service, url


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[UIStack]:
    stack = UIStack(workdir=tmp_path_factory.mktemp("e2e-stack"),
                    model_path=ensure_demo_model(progress=False))
    try:
        stack.start_serving()
        yield stack
    finally:
        stack.close()


@pytest.fixture(scope="session")
def browser() -> Iterator[Browser]:
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture
def new_page(browser: Browser, request: pytest.FixtureRequest) -> Iterator[Callable[[], Page]]:
    """Pages in fresh browser contexts: each one is a separate user, with its own session.

    A script error or a console error on any of them fails the test, whatever it checked: a
    page can throw on every update and still show some of the text a test looks for.
    """
    contexts = []
    errors: list[str] = []

    def make() -> Page:
        context = browser.new_context(viewport={"width": 1280, "height": 900})
        context.set_default_timeout(30_000)
        contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda exc: errors.append(f"pageerror: {exc}"))
        page.on("console", lambda msg: errors.append(f"console error: {msg.text} {msg.location}")
                if msg.type == "error" else None)
        return page

    yield make
    if getattr(request.node, "rep_call", None) is not None and request.node.rep_call.failed:
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        for i, context in enumerate(contexts):
            for page in context.pages:
                page.screenshot(path=SCREENSHOTS / f"FAILED-{request.node.name}-{i}.png",
                                full_page=True)
    for context in contexts:
        context.close()
    assert not errors, "the page reported errors:\n" + "\n".join(dict.fromkeys(errors))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> object:
    report = yield
    setattr(item, f"rep_{report.when}", report)
    return report
