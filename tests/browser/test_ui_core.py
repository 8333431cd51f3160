"""The dashboard's core in a real browser: sign-in and projects, open mode, CSRF, switching
an endpoint's default, every page free of console errors, and the offline `/docs`."""

from __future__ import annotations

import re
import time
from collections.abc import Iterator

import httpx
import pytest
from openai import OpenAI

from tests.browser.conftest import VIEWPORT, PageFactory, key_of, shot
from tests.conftest import Server
from tests.helpers import chat_file

pytestmark = pytest.mark.slow
expect = pytest.importorskip("playwright.sync_api").expect

PAGES = ["/ui", "/ui/batches", "/ui/jobs", "/ui/endpoints", "/ui/webhooks"]
MOBILE = {"width": 390, "height": 844}


def api(server: Server, name: str) -> httpx.Client:
    return httpx.Client(base_url=server.base_url + "/api/v1", timeout=30,
                        headers={"authorization": f"Bearer {key_of(name)}"})


@pytest.fixture(scope="module")
def endpoints(ui_server: Server) -> Iterator[None]:
    """`ep-a` in project a and `ep-b` in project b, each with deployments blue and green."""
    with api(ui_server, "admin-a") as admin:
        for name, project in (("ep-a", "a"), ("ep-b", "b")):
            body = {"name": name, "project": project,
                    "deployments": [{"name": "blue", "backend": "echo"},
                                    {"name": "green", "backend": "echo",
                                     "workers": {"min": 0, "max": 2}}]}
            response = admin.post("/endpoints", json=body)
            assert response.status_code == 200, response.text
    yield


def default_of(server: Server, endpoint: str) -> str:
    with api(server, "admin-a") as admin:
        value: str = admin.get(f"/endpoints/{endpoint}").json()["default_deployment"]
        return value


def test_open_mode_opens_directly(open_server: Server, new_page: PageFactory) -> None:
    page = new_page(open_server)
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/ui$"))
    expect(page.get_by_role("heading", name="Overview")).to_be_visible()
    expect(page.locator(".who")).to_contain_text("open mode")
    page.goto("/ui/login")  # nothing to sign in to
    expect(page).to_have_url(re.compile(r"/ui$"))


def test_sign_in_and_see_only_own_project(ui_server: Server, endpoints: None,
                                          new_page: PageFactory) -> None:
    page = new_page(ui_server)
    page.goto("/ui/endpoints")
    expect(page).to_have_url(re.compile(r"/ui/login\?next="))
    page.watch.allowed.append("401")  # type: ignore[attr-defined]
    page.fill("#key", "sk-not-a-key-000000")
    page.click("button[type=submit]")
    expect(page.get_by_role("alert")).to_contain_text("Incorrect API key")
    page.fill("#key", key_of("member-b"))
    page.click("button[type=submit]")
    expect(page).to_have_url(re.compile(r"/ui/endpoints$"))
    main = page.locator("main")
    expect(main.get_by_role("heading", name="ep-b")).to_be_visible()
    expect(main.get_by_role("heading", name="ep-a")).to_have_count(0)
    cookie = next(c for c in page.context.cookies() if c["name"] == "batchery_key")
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict" and cookie["path"] == "/ui"

    member_a = new_page(ui_server, key_of("member-a"))
    member_a.goto("/ui/endpoints")
    expect(member_a.locator("main").get_by_role("heading", name="ep-a")).to_be_visible()
    expect(member_a.locator("main").get_by_role("heading", name="ep-b")).to_have_count(0)

    page.click("text=Sign out")
    expect(page).to_have_url(re.compile(r"/ui/login$"))
    page.goto("/ui")
    expect(page).to_have_url(re.compile(r"/ui/login\?next="))


def test_admin_filters_by_project(ui_server: Server, endpoints: None,
                                  new_page: PageFactory) -> None:
    page = new_page(ui_server, key_of("admin-a"))
    page.goto("/ui/endpoints")
    main = page.locator("main")
    expect(main.get_by_role("heading", name="ep-a")).to_be_visible()
    expect(main.get_by_role("heading", name="ep-b")).to_be_visible()
    page.goto("/ui/endpoints?project=b")
    expect(main.get_by_role("heading", name="ep-b")).to_be_visible()
    expect(main.get_by_role("heading", name="ep-a")).to_have_count(0)


def _signed_in(server: Server, name: str) -> tuple[httpx.Client, str]:
    client = httpx.Client(base_url=server.base_url, timeout=30)
    response = client.post("/ui/login", data={"key": key_of(name), "next": "/ui/endpoints"})
    assert response.status_code == 303, response.text
    page = client.get("/ui/endpoints")
    match = re.search(r'name="csrf" value="([0-9a-f]+)"', page.text)
    assert match, page.text
    return client, match.group(1)


def test_csrf_refused(ui_server: Server, endpoints: None) -> None:
    client, token = _signed_in(ui_server, "admin-a")
    other, other_token = _signed_in(ui_server, "member-a")
    other.close()
    url = "/ui/endpoints/ep-a/default"
    cases = [({"deployment": "green"}, {}),  # no token
             ({"deployment": "green", "csrf": "0" * 64}, {}),  # a made-up token
             ({"deployment": "green", "csrf": other_token}, {}),  # another key's token
             ({"deployment": "green", "csrf": token}, {"origin": "http://evil.example"})]
    try:
        for data, headers in cases:
            response = client.post(url, data=data, headers=headers)
            assert response.status_code == 403, (data, headers, response.text)
            assert "try again" in response.text and "<html" in response.text
        assert default_of(ui_server, "ep-a") == "blue"
        assert other_token != token
    finally:
        client.close()


def test_switch_default_as_admin_refused_as_member(ui_server: Server, endpoints: None,
                                                   new_page: PageFactory) -> None:
    member = new_page(ui_server, key_of("member-a"))
    member.goto("/ui/endpoints")
    section = member.locator("section.endpoint", has_text="ep-a")
    button = section.get_by_role("button", name="Make default green")
    expect(button).to_be_disabled()
    # The button is disabled for a member; a forced POST is refused by the server too.
    member.watch.allowed.append("403")  # type: ignore[attr-defined]
    button.evaluate("b => b.disabled = false")
    button.click()
    expect(member.get_by_role("alert")).to_contain_text("Only an admin key")
    assert default_of(ui_server, "ep-a") == "blue"

    admin = new_page(ui_server, key_of("admin-a"))
    admin.goto("/ui/endpoints")
    section = admin.locator("section.endpoint", has_text="ep-a")
    section.get_by_role("button", name="Make default green").click()
    expect(admin.get_by_role("status")).to_contain_text("Default of ep-a is now green")
    expect(admin.locator("section.endpoint", has_text="ep-a").locator("[data-default]")
           ).to_have_text("green")
    assert default_of(ui_server, "ep-a") == "green"


@pytest.mark.parametrize("viewport", [VIEWPORT, MOBILE], ids=["1280", "390"])
def test_every_page_without_console_errors(ui_server: Server, open_server: Server,
                                           endpoints: None, new_page: PageFactory,
                                           viewport: dict[str, int]) -> None:
    for page in (new_page(ui_server, key_of("admin-a"), viewport),
                 new_page(ui_server, key_of("member-b"), viewport),
                 new_page(open_server, None, viewport)):
        for path in PAGES:
            response = page.goto(path)
            assert response is not None and response.status == 200, path
            expect(page.locator("main h1")).to_be_visible()
            # Nothing wider than the screen but what scrolls on purpose.
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= viewport["width"], (path, width)
        page.goto("/ui")
        page.wait_for_timeout(2500)  # one round of live polling


def run_batch(server: Server, key: str, lines: int) -> None:
    """A chat batch of `lines` lines on the echo model, run to completion."""
    with OpenAI(base_url=server.v1, api_key=key, max_retries=0) as client:
        upload = client.files.create(file=("in.jsonl", chat_file(lines)), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, completion_window="24h",
                                      endpoint="/v1/chat/completions")
        deadline = time.monotonic() + 60
        while batch.status != "completed":
            assert time.monotonic() < deadline, batch
            time.sleep(0.2)
            batch = client.batches.retrieve(batch.id)


def test_overview_counts_lines(ui_server: Server, endpoints: None,
                               new_page: PageFactory) -> None:
    """A finished batch shows in the throughput of its project, not in another's."""
    run_batch(ui_server, key_of("member-a"), 120)
    page = new_page(ui_server, key_of("member-a"))
    page.goto("/ui")
    expect(page.locator("main")).to_contain_text("peak 2 in the last hour")
    other = new_page(ui_server, key_of("member-b"))
    other.goto("/ui")
    expect(other.locator("main")).to_contain_text("peak 0 in the last hour")
    admin = new_page(ui_server, key_of("admin-a"))
    for viewport, name in ((VIEWPORT, "overview"), (MOBILE, "overview-mobile")):
        admin.set_viewport_size(viewport)
        admin.goto("/ui")
        shot(admin, name)


def test_docs_offline(open_server: Server, new_page: PageFactory) -> None:
    page = new_page(open_server)
    page.goto("/docs")
    ops = page.locator("details.op")
    expect(ops.first).to_be_visible()
    assert ops.count() > 20
    page.fill("#api-filter", "/v1/batches")
    expect(page.locator("details.op:not([hidden])").first).to_contain_text("/v1/batches")
    assert page.locator("details.op:not([hidden])").count() < ops.count()


def test_numbers_and_durations_read_well() -> None:
    from batchery.ui import duration, human

    assert [human(v) for v in (0, 12345, 999_999, 1_234_567, 2.5e9, 0.75, None)] == \
        ["0", "12,345", "999,999", "1.2 M", "2.5 G", "0.8", "\u2013"]
    assert [duration(v) for v in (5, 125, 7300, None)] == ["5s", "2m 05s", "2h 01m", "\u2013"]
