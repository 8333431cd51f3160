"""The dashboard's job and webhook pages in a real browser, against a real `batchery serve`
whose endpoint runs a python predictor (`Doubler`, slowed by its `sleep` config)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import httpx
import pytest
from playwright.sync_api import Page, expect

from tests.acceptance.jobs_support import deployment
from tests.browser.conftest import KEYS, PageFactory, key_of, shot, start_ui_server
from tests.conftest import Server

CONFIG: dict[str, Any] = {"endpoints": [{"name": "nums", "deployments": [
    deployment("main", "Doubler", workers={"min": 0, "max": 1, "idle_seconds": 30})]}]}


@pytest.fixture(scope="module")
def jobs_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_ui_server(tmp_path_factory.mktemp("ui-jobs"), CONFIG, KEYS, name="jobs")
    yield server
    server.stop()


def api(server: Server, key: str = "member-a") -> httpx.Client:
    return httpx.Client(base_url=server.base_url + "/api/v1", timeout=30,
                        headers={"Authorization": f"Bearer {key_of(key)}"})


def submit(server: Server, items: list[Any], sleep: float, **extra: Any) -> str:
    body = {"item_list": {"items": items, "batch_size": 1}, "config": {"sleep": sleep},
            **extra}
    with api(server) as client:
        response = client.post("/endpoints/nums/jobs", json=body)
    assert response.status_code == 200, response.text
    job_id: str = response.json()["id"]
    return job_id


def job_status(server: Server, job_id: str) -> str:
    with api(server) as client:
        status: str = client.get(f"/jobs/{job_id}").json()["status"]
    return status


def mark(page: Page) -> None:
    """A mark that a reload would wipe: what the page shows later came by polling."""
    page.evaluate("window.__not_reloaded = true")


def assert_not_reloaded(page: Page) -> None:
    assert page.evaluate("window.__not_reloaded === true")


def test_a_jobs_logs_and_status_follow_it_live(jobs_server: Server,
                                               new_page: PageFactory) -> None:
    job_id = submit(jobs_server, [1, 2, 3, 4, 5, {"fail": True}], 0.6, max_retries=0)
    page = new_page(jobs_server, key_of("member-a"))
    page.goto(f"/ui/jobs/{job_id}")
    mark(page)
    logs = page.locator("ol.log li")
    # Lines written while the page is open arrive without a reload, newest kept in view.
    expect(logs.filter(has_text="batch 0: succeeded")).to_have_count(1, timeout=30_000)
    first = logs.count()
    expect(page.locator("[data-status]")).to_have_text("completed_with_failures",
                                                         timeout=60_000)
    expect(logs.filter(has_text="on_job_complete of")).to_have_count(1, timeout=30_000)
    assert logs.count() > first
    assert_not_reloaded(page)
    # The newest line (first in the markup, shown last) stays in view as lines arrive.
    page.locator("ol.log").scroll_into_view_if_needed()
    expect(logs.first).to_be_in_viewport()
    ids = [int(i) for i in logs.evaluate_all("els => els.map(e => e.dataset.id)")]
    assert ids[0] == max(ids)
    shot(page, "job")
    # The failed batch is listed with its traceback, and the counts are the job's.
    failed = page.locator("details.failed-batch")
    expect(failed).to_have_count(1)
    failed.locator("summary").click()
    expect(failed.locator("pre.traceback")).to_contain_text("ValueError: refusing item")
    expect(page.locator(".card", has_text="Items")).to_contain_text("5 / 6")
    # Filtering by level keeps only the error lines.
    page.select_option("select[name=level]", "ERROR")
    page.click("form[aria-label='Filter the logs'] button[type=submit]")
    page.wait_for_url("**level=ERROR**")
    expect(page.locator("ol.log li")).to_have_count(1)
    expect(page.locator("ol.log li .level")).to_have_text("ERROR")
    # And by worker: the only worker's lines are all of them.
    worker = page.locator("select[name=worker] option").nth(1).get_attribute("value")
    assert worker
    page.goto(f"/ui/jobs/{job_id}?worker={worker}")
    expect(page.locator("ol.log li").first).to_contain_text(worker)


def test_stop_a_running_job_from_its_page(jobs_server: Server, new_page: PageFactory) -> None:
    job_id = submit(jobs_server, list(range(40)), 0.5)
    page = new_page(jobs_server, key_of("member-a"))
    page.goto(f"/ui/jobs/{job_id}")
    expect(page.locator("[data-status]")).to_have_text("running", timeout=30_000)
    page.get_by_role("button", name="Stop job").click()
    expect(page.locator("[data-status]")).to_have_text("stopped", timeout=10_000)
    assert job_status(jobs_server, job_id) == "stopped"
    expect(page.get_by_role("button", name="Stop job")).to_have_count(0)


def test_the_jobs_list_follows_progress_and_filters_by_status(
        jobs_server: Server, new_page: PageFactory) -> None:
    job_id = submit(jobs_server, [1, 2, 3], 0.5)
    page = new_page(jobs_server, key_of("member-a"))
    page.goto("/ui/jobs")
    mark(page)
    row = page.locator("tr", has=page.locator(f"a[href='/ui/jobs/{job_id}']"))
    expect(row).to_contain_text("succeeded", timeout=60_000)
    expect(row).to_contain_text("3 / 3")
    assert_not_reloaded(page)
    shot(page, "jobs")
    page.select_option("select[name=status]", "stopped")
    page.click("form[aria-label='Filter jobs'] button[type=submit]")
    page.wait_for_url("**status=stopped**")
    expect(page.locator(f"a[href='/ui/jobs/{job_id}']")).to_have_count(0)


def test_another_projects_member_sees_neither_the_job_nor_its_logs(
        jobs_server: Server, new_page: PageFactory) -> None:
    job_id = submit(jobs_server, [1], 0)
    page = new_page(jobs_server, key_of("member-b"))
    page.goto("/ui/jobs")
    expect(page.locator(".empty")).to_contain_text("No jobs yet")
    page.watch.allowed.append("404")  # type: ignore[attr-defined]
    response = page.goto(f"/ui/jobs/{job_id}")
    assert response is not None and response.status == 404
    expect(page.locator("h1")).to_have_text("Not found")
    fragment = page.request.get(f"/ui/fragments/jobs/{job_id}/logs")
    assert fragment.status == 404
    # The admin of project `a` sees it, in the list of every project and on its page.
    admin = new_page(jobs_server, key_of("admin-a"))
    admin.goto(f"/ui/jobs/{job_id}")
    expect(admin.locator("h1")).to_contain_text(job_id)


def test_a_stop_without_the_forms_token_is_refused(jobs_server: Server,
                                                   new_page: PageFactory) -> None:
    job_id = submit(jobs_server, list(range(20)), 0.5)
    page = new_page(jobs_server, key_of("member-a"))
    response = page.request.post(f"/ui/jobs/{job_id}/stop", form={"csrf": "forged"})
    assert response.status == 403
    assert job_status(jobs_server, job_id) != "stopped"
    with api(jobs_server) as client:
        client.post(f"/jobs/{job_id}/stop")


class Receiver(BaseHTTPRequestHandler):
    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        self.send_response(204)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


def test_webhook_endpoints_and_their_deliveries(tmp_path_factory: pytest.TempPathFactory,
                                                new_page: PageFactory) -> None:
    receiver = ThreadingHTTPServer(("127.0.0.1", 0), Receiver)
    threading.Thread(target=receiver.serve_forever, daemon=True).start()
    server = start_ui_server(tmp_path_factory.mktemp("ui-hooks"), CONFIG, None, name="hooks")
    try:
        page = new_page(server)
        page.goto("/ui/webhooks")
        expect(page.locator(".empty")).to_contain_text("No webhook endpoints")
        url = f"http://127.0.0.1:{receiver.server_address[1]}/hooks"
        with httpx.Client(base_url=server.v1, timeout=30) as client:
            made = client.post("/webhook_endpoints", json={
                "name": "ops", "url": url, "event_types": ["job.succeeded"]}).json()
            tested = client.post(f"/webhook_endpoints/{made['id']}/test",
                                 json={"event_type": "job.succeeded"})
            assert tested.status_code == 200, tested.text
        page.goto("/ui/webhooks")
        section = page.locator("section.webhook", has_text="ops")
        expect(section).to_contain_text(url)
        expect(section.locator("tbody tr")).to_have_count(1)
        expect(section.locator("tbody tr")).to_contain_text("job.succeeded")
        expect(section.locator("tbody tr")).to_contain_text("204")
        shot(page, "webhooks")
    finally:
        server.stop()
        receiver.shutdown()
        receiver.server_close()
