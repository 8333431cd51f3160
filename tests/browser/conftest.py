"""The browser-test harness: a real `batchery serve`, and Debian's Chromium driven by
Playwright. Every page a test opens fails the test on a browser console error or on a
request to any host but the server's (nothing may leave the machine).

Locally the tests skip when Chromium or Playwright is missing; in CI they fail instead
(`scripts/install dev` installs both)."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from tests.conftest import CI, Server, start_server

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
IMAGES = Path(__file__).resolve().parents[2] / "docs" / "images"
VIEWPORT = {"width": 1280, "height": 800}

try:
    from playwright.sync_api import (
        Browser,
        ConsoleMessage,
        Page,
        Playwright,
        Route,
        sync_playwright,
    )
except ImportError:  # pragma: no cover - the skip below says what to install
    sync_playwright = None  # type: ignore[assignment]


def key_of(name: str) -> str:
    """The API key of a test key name (fixed, so tests can sign in with it)."""
    return f"sk-ui-{name}-0123456789abcdef"


#: The keys of `ui_server`: name -> (project, role).
KEYS = {"admin-a": ("a", "admin"), "member-a": ("a", "member"), "member-b": ("b", "member")}

#: The config of `ui_server`: the SDK suites' echo models (a fast one and a slow one, to
#: catch batches mid-run) and an endpoint with two deployments to switch between.
CONFIG: dict[str, Any] = {
    "deployments": [{"name": "echo", "backend": "echo"},
                    {"name": "echo-slow", "backend": "echo", "options": {"latency_ms": 200}}],
    "endpoints": [{"name": "shop", "default_deployment": "blue",
                   "deployments": [{"name": "blue", "backend": "echo"},
                                   {"name": "green", "backend": "echo",
                                    "workers": {"min": 0, "max": 2}}]}],
}


def write_keys(path: Path, keys: dict[str, tuple[str, str]]) -> Path:
    path.write_text(yaml.safe_dump({"keys": [
        {"name": name, "project": project, "role": role,
         "sha256": hashlib.sha256(key_of(name).encode()).hexdigest()}
        for name, (project, role) in keys.items()]}))
    return path


def start_ui_server(root: Path, config: dict[str, Any] | None = None,
                    keys: dict[str, tuple[str, str]] | None = None, *args: str,
                    name: str = "ui") -> Server:
    """A `batchery serve` with `config`, and with `keys` (None: open mode)."""
    root.mkdir(parents=True, exist_ok=True)
    config_path = root / f"{name}-config.yaml"
    config_path.write_text(yaml.safe_dump(config or CONFIG))
    extra = ["--config", str(config_path), "--workers", "1", *args]
    if keys is not None:
        extra += ["--keys-file", str(write_keys(root / f"{name}-keys.yaml", keys))]
    return start_server(root, *extra, name=name)


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server with keys (`KEYS`): projects `a` (admin and member) and `b` (member)."""
    server = start_ui_server(tmp_path_factory.mktemp("ui"), CONFIG, KEYS)
    yield server
    server.stop()


@pytest.fixture(scope="module")
def open_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """A server without a keys file: open mode."""
    server = start_ui_server(tmp_path_factory.mktemp("ui-open"), CONFIG, None, name="open")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def playwright() -> Iterator[Playwright]:
    missing = None
    if sync_playwright is None:
        missing = "the playwright package (pip install -e '.[dev]')"
    elif not os.path.exists(CHROMIUM):
        missing = f"Chromium at {CHROMIUM} (apt-get install chromium)"
    if missing is not None:
        if CI:
            pytest.fail(f"the browser tests need {missing}")
        pytest.skip(f"the browser tests need {missing}")
    with sync_playwright() as p:
        yield p


@pytest.fixture(scope="module")
def browser(playwright: Playwright) -> Iterator[Browser]:
    browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS,
                                         headless=True)
    yield browser
    browser.close()


@dataclass
class Watch:
    """What the pages of one test did wrong: console errors and requests off the server."""

    origin: str
    errors: list[str] = field(default_factory=list)
    foreign: list[str] = field(default_factory=list)
    #: Substrings of console errors a test expects (a refused form answers 403).
    allowed: list[str] = field(default_factory=list)

    def on_console(self, message: ConsoleMessage) -> None:
        if message.type == "error" and not any(a in message.text for a in self.allowed):
            self.errors.append(f"{message.text} at {message.location.get('url')}")

    def on_page_error(self, error: Exception) -> None:
        self.errors.append(f"uncaught: {error}")

    def on_route(self, route: Route) -> None:
        url = route.request.url
        parts = urlsplit(url)
        if parts.scheme in ("http", "https", "ws", "wss") and \
                f"{parts.scheme}://{parts.netloc}" != self.origin:
            self.foreign.append(url)
            route.abort()
            return
        route.continue_()


PageFactory = Callable[..., Page]


@pytest.fixture
def watch() -> Iterator[list[Watch]]:
    """The watches of the test's pages; the test fails if any saw an error."""
    watches: list[Watch] = []
    yield watches
    problems = [f"console error: {e}" for w in watches for e in w.errors]
    problems += [f"request off the server: {u}" for w in watches for u in w.foreign]
    assert not problems, "\n".join(problems)


@pytest.fixture
def new_page(browser: Browser, watch: list[Watch]) -> Iterator[PageFactory]:
    """`new_page(server, key=None, viewport=VIEWPORT)`: a page in a fresh browser context
    (its own cookies), signed in with `key` when given, watched for errors."""
    contexts = []

    def factory(server: Server, key: str | None = None,
                viewport: dict[str, int] | None = None) -> Page:
        context = browser.new_context(base_url=server.base_url, viewport=viewport or VIEWPORT)
        contexts.append(context)
        seen = Watch(origin=server.base_url)
        watch.append(seen)
        context.route("**/*", seen.on_route)
        page = context.new_page()
        page.on("console", seen.on_console)
        page.on("pageerror", seen.on_page_error)
        page.watch = seen  # type: ignore[attr-defined]
        if key is not None:
            sign_in(page, key)
        return page

    yield factory
    for context in contexts:
        context.close()


def sign_in(page: Page, key: str, next_path: str = "/ui") -> None:
    page.goto(f"/ui/login?next={next_path}")
    page.fill("#key", key)
    page.click("button[type=submit]")
    page.wait_for_url(f"**{next_path}")


def shot(page: Page, name: str) -> Path:
    """A screenshot of the page for the docs: `docs/images/<name>.png`."""
    IMAGES.mkdir(parents=True, exist_ok=True)
    path = IMAGES / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    return path
