"""`openai.AzureOpenAI`, unchanged, against a real `batchery serve` with API keys: Azure's
`/openai/...` paths with `?api-version=` and the `api-key` header, and the `/openai/v1/...`
form. Azure's spelling of endpoints (`/chat/completions`), its dotted form keys
(`expires_after.seconds`), its file expiry range and its validation codes.

This module also runs under openai 1.x (test_older_sdks.py), so it uses only API that both
majors share.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai
import orjson
import pytest
from openai import AzureOpenAI, OpenAI

from batchery.security.auth import add_key
from tests.conftest import Server, start_server
from tests.helpers import SDK_DEPLOYMENTS, chat_file, chat_line, jsonl

TERMINAL = {"completed", "failed", "expired", "cancelled"}
VERSION = "2024-10-21"


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    """A server that needs keys, and a member key of it."""
    tmp = tmp_path_factory.mktemp("azure")
    keys = tmp / "keys.yaml"
    key = add_key(keys, "team-a", role="member")[1]
    config = tmp / "deployments.yaml"
    config.write_text(SDK_DEPLOYMENTS)
    server = start_server(tmp, "--config", str(config), "--keys-file", str(keys),
                          "--workers", "2", "--chunk-size", "10")
    yield server, key
    server.stop()


@pytest.fixture
def azure(keyed: tuple[Server, str]) -> Iterator[AzureOpenAI]:
    server, key = keyed
    with AzureOpenAI(azure_endpoint=server.base_url, api_key=key, api_version=VERSION,
                     max_retries=0) as client:
        yield client


def wait(client: OpenAI, batch_id: str, timeout: float = 60.0) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        batch = client.batches.retrieve(batch_id)
        if batch.status in TERMINAL:
            return batch
        assert time.monotonic() < deadline, f"batch still {batch.status}"
        time.sleep(0.2)


def lines_of(client: OpenAI, file_id: str | None) -> list[dict[str, Any]]:
    assert file_id is not None
    return [orjson.loads(x) for x in client.files.content(file_id).content.splitlines()]


def raw(server: Server, method: str, path: str, key: str, **kwargs: Any) -> httpx.Response:
    """A request as Azure's curl examples send it: `api-key` header, `api-version` query."""
    params = {"api-version": VERSION, **kwargs.pop("params", {})}
    params = {name: value for name, value in params.items() if value is not None}
    return httpx.request(method, server.base_url + path, params=params,
                         headers={"api-key": key}, timeout=30, **kwargs)


def test_sdk_major_is_the_one_expected() -> None:
    expected = os.environ.get("TEST_EXPECT_OPENAI_MAJOR")
    major = int(openai.__version__.split(".")[0])
    assert major == int(expected) if expected else major >= 2


def test_azure_client_whole_flow(azure: AzureOpenAI) -> None:
    # Azure's docs: the batch endpoint without /v1, the lines' urls with it; we take either.
    lines = [chat_line(f"req-{i}", f"hello number {i}") for i in range(12)]
    lines[5]["url"] = "/chat/completions"
    f = azure.files.create(file=("requests.jsonl", jsonl(lines)), purpose="batch")
    assert f.id.startswith("file-") and f.purpose == "batch" and f.filename == "requests.jsonl"
    assert azure.files.retrieve(f.id).bytes == len(jsonl(lines))
    assert f.id in [x.id for x in azure.files.list(purpose="batch")]

    batch = azure.batches.create(input_file_id=f.id, endpoint="/chat/completions",
                                 completion_window="24h", metadata={"team": "nlp"})
    assert batch.status == "validating" and batch.endpoint == "/chat/completions"
    done = wait(azure, batch.id)
    assert done.status == "completed", done.errors
    assert done.endpoint == "/chat/completions"  # echoed as given, as Azure does
    assert (done.request_counts.total, done.request_counts.completed) == (12, 12)
    assert done.metadata == {"team": "nlp"} and done.model == "echo"

    out = lines_of(azure, done.output_file_id)
    assert sorted(x["custom_id"] for x in out) == sorted(f"req-{i}" for i in range(12))
    fifth = next(x for x in out if x["custom_id"] == "req-5")
    assert fifth["response"]["status_code"] == 200
    assert fifth["response"]["body"]["choices"][0]["message"]["content"] == "hello number 5"

    assert batch.id in [b.id for b in azure.batches.list(limit=1)]  # pages through all
    assert azure.batches.retrieve(batch.id).output_file_id == done.output_file_id
    assert "echo" in [m.id for m in azure.models.list()]
    assert azure.files.delete(f.id).deleted is True
    with pytest.raises(openai.NotFoundError):
        azure.files.retrieve(f.id)


def test_cancel_on_azure_paths(azure: AzureOpenAI) -> None:
    f = azure.files.create(file=chat_file(200, prefix="slow", model="echo-slow"),
                           purpose="batch")
    batch = azure.batches.create(input_file_id=f.id, endpoint="/chat/completions",
                                 completion_window="24h")
    cancelling = azure.batches.cancel(batch.id)
    assert cancelling.status in ("cancelling", "cancelled") and cancelling.cancelling_at
    done = wait(azure, batch.id, timeout=30)
    assert done.status == "cancelled" and done.cancelled_at
    assert azure.batches.cancel(batch.id).status == "cancelled"


def test_key_is_read_from_the_api_key_header(keyed: tuple[Server, str]) -> None:
    server, _ = keyed
    with AzureOpenAI(azure_endpoint=server.base_url, api_key="wrong", api_version=VERSION,
                     max_retries=0) as stranger, pytest.raises(openai.AuthenticationError):
        stranger.batches.list()


def test_v1_base_url_form(keyed: tuple[Server, str]) -> None:
    """Azure's v1 API: the plain `OpenAI` client on `…/openai/v1` (Bearer), and
    `AzureOpenAI` there with a version label that the v1 paths take as they come."""
    server, key = keyed
    with OpenAI(base_url=server.base_url + "/openai/v1", api_key=key, max_retries=0) as plain:
        f = plain.files.create(file=chat_file(3), purpose="batch")
        batch = plain.batches.create(input_file_id=f.id, endpoint="/v1/chat/completions",
                                     completion_window="24h")
        done = wait(plain, batch.id)
        assert done.status == "completed" and done.request_counts.completed == 3
        assert len(lines_of(plain, done.output_file_id)) == 3
    with AzureOpenAI(base_url=server.base_url + "/openai/v1", api_key=key,
                     api_version="preview", max_retries=0) as azure:
        assert azure.batches.retrieve(batch.id).status == "completed"
        assert batch.id in [b.id for b in azure.batches.list()]


def test_failed_validation_uses_azure_codes(azure: AzureOpenAI,
                                            keyed: tuple[Server, str]) -> None:
    server, key = keyed
    stray = chat_line("b")
    stray["url"] = "/v1/embeddings"
    f = azure.files.create(file=jsonl([chat_line("a"), stray]), purpose="batch")
    batch = azure.batches.create(input_file_id=f.id, endpoint="/chat/completions",
                                 completion_window="24h")
    done = wait(azure, batch.id)
    assert done.status == "failed"
    assert done.errors is not None
    assert [(e.code, e.line, e.param) for e in done.errors.data] == [("url_mismatch", 2, "url")]
    # The same batch on the OpenAI paths keeps OpenAI's code.
    with OpenAI(base_url=server.v1, api_key=key, max_retries=0) as plain:
        errors = plain.batches.retrieve(batch.id).errors
        assert errors is not None and errors.data[0].code == "invalid_url"


def test_unknown_endpoint_is_refused_on_azure_paths(azure: AzureOpenAI) -> None:
    f = azure.files.create(file=chat_file(1), purpose="batch")
    with pytest.raises(openai.BadRequestError) as caught:
        azure.batches.create(input_file_id=f.id, endpoint="/chat/completion",
                             completion_window="24h")
    assert caught.value.code == "invalid_value" and caught.value.param == "endpoint"


def test_dotted_form_keys_and_azure_expiry_range(keyed: tuple[Server, str]) -> None:
    server, key = keyed
    fourteen_days = 14 * 86400
    sent = raw(server, "POST", "/openai/files", key,
               data={"purpose": "batch", "expires_after.anchor": "created_at",
                     "expires_after.seconds": str(fourteen_days)},
               files={"file": ("in.jsonl", chat_file(1), "application/octet-stream")})
    assert sent.status_code == 200, sent.text
    assert sent.json()["expires_at"] == sent.json()["created_at"] + fourteen_days
    # An hour is the hosted OpenAI's least, under Azure's 14 days.
    hour = {"purpose": "batch", "expires_after[anchor]": "created_at",
            "expires_after[seconds]": "3600"}
    refused = raw(server, "POST", "/openai/files", key, data=hour,
                  files={"file": ("in.jsonl", chat_file(1))})
    assert refused.status_code == 400
    error = refused.json()["error"]
    assert (error["param"], error["code"]) == ("expires_after.seconds", "invalid_value")
    assert str(fourteen_days) in error["message"]
    plain = httpx.post(server.v1 + "/files", headers={"Authorization": f"Bearer {key}"},
                       data=hour, files={"file": ("in.jsonl", chat_file(1))})
    assert plain.status_code == 200, plain.text


@pytest.mark.parametrize(("params", "expected"), [
    ({"api-version": None}, "missing_required_parameter"),
    ({"api-version": "2023-05-15"}, "invalid_value"),
    ({"api-version": "tomorrow"}, "invalid_value"),
])
def test_legacy_paths_need_a_batch_api_version(keyed: tuple[Server, str],
                                               params: dict[str, Any], expected: str) -> None:
    server, key = keyed
    answer = raw(server, "GET", "/openai/batches", key, params=params)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert (error["param"], error["code"]) == ("api-version", expected)


def test_versions_that_serve_batches(keyed: tuple[Server, str]) -> None:
    server, key = keyed
    for version in ("2024-07-01-preview", "2025-04-01-preview", VERSION):
        answer = raw(server, "GET", "/openai/batches", key, params={"api-version": version})
        assert answer.status_code == 200, (version, answer.text)
    assert raw(server, "GET", "/openai/v1/batches", key,
               params={"api-version": None}).status_code == 200


def test_paths_without_a_key_answer_401(keyed: tuple[Server, str]) -> None:
    server, _ = keyed
    answer = httpx.get(server.base_url + "/openai/files", params={"api-version": VERSION})
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "invalid_api_key"
