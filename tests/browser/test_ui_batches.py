"""The batches pages in a real browser: a batch created with the SDK shows up and runs to
`completed` without a reload, its output downloads, a running batch is cancelled from its
page, the create form reports a bad file line by line, and a member never sees another
project's batch."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import openai
import orjson
import pytest
from playwright.sync_api import FilePayload, Page, expect

from tests.browser.conftest import CONFIG, KEYS, PageFactory, key_of, shot, start_ui_server
from tests.conftest import Server
from tests.helpers import chat_file, chat_line, jsonl

#: Small chunks, so that a batch of the slow model (200 ms a request) advances in steps a
#: page can watch and a cancel stops it midway.
CHUNK_SIZE = "5"
LIVE_TIMEOUT_MS = 60_000


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    server = start_ui_server(tmp_path_factory.mktemp("ui-batches"), CONFIG, KEYS,
                             "--chunk-size", CHUNK_SIZE, name="batches")
    yield server
    server.stop()


def submit(server: Server, key: str, lines: int, model: str = "echo-slow") -> str:
    client = openai.OpenAI(base_url=server.v1, api_key=key_of(key))
    upload = client.files.create(file=("in.jsonl", chat_file(lines, model=model)),
                                 purpose="batch")
    batch = client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                  completion_window="24h")
    return batch.id


def upload(name: str, data: bytes) -> FilePayload:
    return {"name": name, "mimeType": "application/jsonl", "buffer": data}


def status_of(page: Page, batch_id: str) -> str:
    return page.locator(f"tr[data-batch='{batch_id}'] [data-status]").inner_text()


def test_sdk_batch_appears_and_completes_live_then_downloads(
        server: Server, new_page: PageFactory, tmp_path: Path) -> None:
    page = new_page(server, key_of("member-a"))
    page.goto("/ui/batches")
    page.evaluate("window.__notReloaded = true")
    batch_id = submit(server, "member-a", 40)

    row = page.locator(f"tr[data-batch='{batch_id}']")
    expect(row).to_be_visible(timeout=LIVE_TIMEOUT_MS)
    assert status_of(page, batch_id) != "completed"  # seen before the end, then followed
    expect(row.locator("[data-status]")).to_have_text("completed", timeout=LIVE_TIMEOUT_MS)
    expect(row).to_contain_text("40 done, 0 failed of 40")
    assert page.evaluate("window.__notReloaded") is True
    shot(page, "batches")

    page.click(f"a[href='/ui/batches/{batch_id}']")
    expect(page.locator("[data-status]").first).to_have_text("completed")
    expect(page.locator("table.results tbody tr")).to_have_count(20)  # a page of results
    shot(page, "batch")
    with page.expect_download() as info:
        page.click("a[data-file='output']")
    saved = tmp_path / "output.jsonl"
    info.value.save_as(saved)
    lines = [orjson.loads(line) for line in saved.read_bytes().splitlines()]
    assert sorted(line["custom_id"] for line in lines) == sorted(f"req-{i}" for i in range(40))
    assert all(line["response"]["status_code"] == 200 for line in lines)

    page.click("#results a[rel=next]")
    expect(page.locator("table.results tbody tr")).to_have_count(20)
    expect(page.locator("table.results")).to_contain_text("req-39")

    # The results browser finds a line by its custom_id.
    page.fill("input[name='q']", "req-13")
    page.click("#results button[type=submit]")
    expect(page.locator("table.results tbody tr")).to_have_count(1)
    expect(page.locator("table.results tbody tr")).to_contain_text("req-13")

    # Another project's member neither lists it nor opens it.
    other = new_page(server, key_of("member-b"))
    other.goto("/ui/batches")
    expect(other.locator(f"tr[data-batch='{batch_id}']")).to_have_count(0)
    assert other.request.get(f"/ui/batches/{batch_id}").status == 404
    assert other.request.get(f"/ui/batches/{batch_id}/files/output").status == 404

    # An admin sees every project's batches, and filters by project.
    admin = new_page(server, key_of("admin-a"))
    admin.goto("/ui/batches")
    expect(admin.locator(f"tr[data-batch='{batch_id}']")).to_contain_text("a")
    admin.select_option("select[name='project']", "b")
    admin.click("form.filters button[type=submit]")
    admin.wait_for_url("**project=b**")
    expect(admin.locator(f"tr[data-batch='{batch_id}']")).to_have_count(0)


def test_cancel_a_running_batch_from_its_page(server: Server, new_page: PageFactory) -> None:
    page = new_page(server, key_of("member-a"))
    batch_id = submit(server, "member-a", 100)
    page.goto(f"/ui/batches/{batch_id}")
    status = page.locator("[data-live] [data-status]")
    expect(status).to_have_text("in_progress", timeout=LIVE_TIMEOUT_MS)

    page.click("button:has-text('Cancel batch')")
    expect(page.locator(".notice")).to_contain_text("Cancel requested")
    expect(status).to_have_text("cancelled", timeout=LIVE_TIMEOUT_MS)
    client = openai.OpenAI(base_url=server.v1, api_key=key_of("member-a"))
    batch = client.batches.retrieve(batch_id)
    assert batch.status == "cancelled"
    assert batch.request_counts is not None and batch.request_counts.completed < 100
    expect(page.locator("button:has-text('Cancel batch')")).to_have_count(0)


def test_create_form_reports_bad_lines_then_creates(server: Server,
                                                    new_page: PageFactory) -> None:
    page = new_page(server, key_of("member-a"))
    page.watch.allowed.append("status of 400")  # type: ignore[attr-defined]
    page.goto("/ui/batches/new")
    bad = jsonl([chat_line("x", model="echo"), "not json", chat_line("x", model="echo")])
    page.set_input_files("input[name='file']", files=upload("bad.jsonl", bad))
    page.click("form.stack button[type=submit]")
    alert = page.locator("[role=alert]")
    expect(alert).to_contain_text("Line 2: not valid JSON.")
    expect(alert).to_contain_text("'x' is used by an earlier line")

    page.set_input_files("input[name='file']",
                         files=upload("good.jsonl", chat_file(3, model="echo")))
    page.fill("input[name='window']", "1h")
    page.click("form.stack button[type=submit]")
    page.wait_for_url("**/ui/batches/batch_*")
    expect(page.locator("[data-live] [data-status]")).to_have_text("completed",
                                                                   timeout=LIVE_TIMEOUT_MS)
    expect(page.locator("[data-live]")).to_contain_text("3 done, 0 failed of 3")
