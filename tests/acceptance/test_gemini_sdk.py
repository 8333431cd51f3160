"""The official `google-genai` SDK, unchanged but for `base_url`, against a real server:
Gemini Batch Mode (inline and file batches) and the Files API it uploads and downloads
through, on the same engine as OpenAI batches."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from google import genai
from google.genai import errors, types

from batchery.security.auth import add_key
from batchery.stores.sql.store import SqlStore
from tests.conftest import Server, start_server
from tests.helpers import SDK_DEPLOYMENTS

ENDED = {types.JobState.JOB_STATE_SUCCEEDED, types.JobState.JOB_STATE_FAILED,
         types.JobState.JOB_STATE_CANCELLED, types.JobState.JOB_STATE_EXPIRED}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    tmp = tmp_path_factory.mktemp("gemini")
    config = tmp / "deployments.yaml"
    config.write_text(SDK_DEPLOYMENTS)
    server = start_server(tmp, "--config", str(config), "--workers", "2",
                          "--chunk-size", "2", "--lease-seconds", "6")
    yield server
    server.stop()


def gemini(base_url: str, key: str = "any-key", **options: Any) -> genai.Client:
    return genai.Client(api_key=key, http_options={"base_url": base_url, **options})


@pytest.fixture
def client(server: Server) -> genai.Client:
    return gemini(server.base_url + "/gemini")


def text_request(text: str, **config: Any) -> dict[str, Any]:
    request: dict[str, Any] = {"contents": [{"role": "user", "parts": [{"text": text}]}]}
    if config:
        request["config"] = config
    return request


def wait(client: genai.Client, name: str, timeout: float = 60) -> types.BatchJob:
    deadline = time.monotonic() + timeout
    while (job := client.batches.get(name=name)).state not in ENDED:
        assert time.monotonic() < deadline, job
        time.sleep(0.2)
    return job


def answer_text(response: types.GenerateContentResponse | None) -> str:
    assert response is not None and response.candidates
    content = response.candidates[0].content
    assert content is not None and content.parts
    return "".join(p.text or "" for p in content.parts)


def test_an_inline_batch_answers_every_request_in_order(client: genai.Client) -> None:
    job = client.batches.create(model="echo", src=[
        {**text_request("first"), "metadata": {"row": "1"}},
        text_request("one two three four", system_instruction="be brief",
                     max_output_tokens=2, temperature=0.5),
        text_request("out of range", temperature=5),
        {"contents": [{"role": "user", "parts": [{"text": "earlier"}]},
                      {"role": "model", "parts": [{"text": "reply"}]},
                      {"role": "user", "parts": [{"text": "last"}]}]},
    ], config={"display_name": "inline-four"})
    assert job.name is not None and job.name.startswith("batches/")
    assert job.state in {types.JobState.JOB_STATE_PENDING, types.JobState.JOB_STATE_RUNNING}
    assert job.model == "models/echo" and job.display_name == "inline-four"

    done = wait(client, job.name)
    assert done.state is types.JobState.JOB_STATE_SUCCEEDED
    assert done.create_time and done.end_time and done.end_time >= done.create_time
    assert done.dest is not None and done.dest.file_name is None
    answers = done.dest.inlined_responses
    assert answers is not None and len(answers) == 4
    first, brief, bad, last = answers
    assert answer_text(first.response) == "first" and first.metadata == {"row": "1"}
    assert first.response is not None and first.response.usage_metadata is not None
    assert first.response.usage_metadata.total_token_count == 2
    assert first.response.model_version == "echo"
    # max_output_tokens became max_tokens: two words, and the length stop.
    assert answer_text(brief.response) == "one two"
    assert brief.response is not None and brief.response.candidates
    assert brief.response.candidates[0].finish_reason is types.FinishReason.MAX_TOKENS
    # The engine's request check refused the temperature: an error of its own, nothing run.
    assert bad.response is None and bad.error is not None
    assert bad.error.code == 3 and "temperature" in (bad.error.message or "")
    assert bad.metadata is None
    assert answer_text(last.response) == "last"


def test_a_file_batch_writes_a_responses_file_keyed_in_request_order(
        client: genai.Client, server: Server, tmp_path: Path) -> None:
    lines = [{"key": f"row-{i}", "request": {
        "contents": [{"parts": [{"text": f"text {i}"}]}],
        # The proto's own field names, as people write JSONL files by hand.
        "generation_config": {"max_output_tokens": 1}}} for i in range(5)]
    lines.append({"request": {"contents": [{"parts": [{"text": "no key"}]}],
                              "systemInstruction": {"parts": [{"text": "sys"}]}}})
    path = tmp_path / "requests.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    uploaded = client.files.upload(file=path, config={"mime_type": "application/jsonl"})
    assert uploaded.name is not None and uploaded.name.startswith("files/")
    assert uploaded.size_bytes == path.stat().st_size
    assert uploaded.display_name == "requests.jsonl"
    assert uploaded.state is types.FileState.ACTIVE
    assert client.files.get(name=uploaded.name).size_bytes == path.stat().st_size

    job = client.batches.create(model="models/echo", src=uploaded.name)
    done = wait(client, job.name or "")
    assert done.state is types.JobState.JOB_STATE_SUCCEEDED
    assert done.dest is not None and done.dest.inlined_responses is None
    results_name = done.dest.file_name
    assert results_name is not None
    got = [json.loads(line) for line in client.files.download(file=results_name).splitlines()]
    assert [g.get("key") for g in got] == [f"row-{i}" for i in range(5)] + [None]
    assert [g["response"]["candidates"][0]["content"]["parts"][0]["text"] for g in got] \
        == ["text"] * 5 + ["no key"]
    assert got[0]["response"]["candidates"][0]["finishReason"] == "MAX_TOKENS"

    # The results file is a file of the project, in both files APIs.
    listed = [f.name for f in client.files.list()]
    assert results_name in listed and uploaded.name in listed
    results = client.files.get(name=results_name)
    assert results.source is types.FileSource.GENERATED and results.download_uri
    with openai.OpenAI(base_url=server.v1, api_key="any", max_retries=0) as oai:
        file_id = results_name.removeprefix("files/")
        assert oai.files.content(file_id).content == client.files.download(file=results)


@pytest.mark.filterwarnings("ignore:batches.create_embeddings")  # "experimental"
def test_an_embeddings_batch(client: genai.Client, server: Server) -> None:
    job = client.batches.create_embeddings(model="echo", src={"inlined_requests": {
        "contents": [{"parts": [{"text": "alpha"}]}, {"parts": [{"text": "beta gamma"}]}],
        "config": {"output_dimensionality": 8}}})
    done = wait(client, job.name or "")
    assert done.state is types.JobState.JOB_STATE_SUCCEEDED
    answers = done.dest.inlined_embed_content_responses if done.dest else None
    assert answers is not None and len(answers) == 2
    values = [a.response.embedding.values for a in answers
              if a.response and a.response.embedding]
    assert len(values) == 2 and all(v and len(v) == 8 for v in values) \
        and values[0] != values[1]
    assert answers[1].response and answers[1].response.token_count == 2
    assert operation(server, job.name or "")["metadata"]["@type"].endswith(
        ".EmbedContentBatch")


def operation(server: Server, name: str) -> dict[str, Any]:
    answer = httpx.get(f"{server.base_url}/gemini/v1beta/{name}",
                       headers={"x-goog-api-key": "any"})
    assert answer.status_code == 200, answer.text
    body: dict[str, Any] = answer.json()
    return body


def test_states_times_and_batch_stats_on_the_wire(client: genai.Client,
                                                   server: Server) -> None:
    job = client.batches.create(model="echo", src=[
        text_request("a"), text_request("b"), text_request("c", temperature=9)])
    wait(client, job.name or "")
    op = operation(server, job.name or "")
    meta = op["metadata"]
    assert op["name"] == job.name and op["done"] is True
    assert meta["@type"].endswith(".GenerateContentBatch") and meta["name"] == job.name
    assert meta["state"] == "BATCH_STATE_SUCCEEDED"
    # int64 counts are strings in proto3 JSON, and zeros are left out.
    assert meta["batchStats"] == {"requestCount": "3", "successfulRequestCount": "2",
                                  "failedRequestCount": "1"}
    for stamp in ("createTime", "updateTime", "endTime"):
        assert meta[stamp].endswith("Z"), stamp
        datetime.fromisoformat(meta[stamp])
    assert meta["createTime"] <= meta["updateTime"] == meta["endTime"]
    assert op["response"]["@type"].endswith(".GenerateContentBatchOutput")
    assert len(op["response"]["inlinedResponses"]["inlinedResponses"]) == 3


def test_list_pages_and_gemini_batches_stay_out_of_the_openai_api(
        client: genai.Client, server: Server) -> None:
    names = {client.batches.create(model="echo", src=[text_request(str(i))]).name or ""
             for i in range(3)}
    pager = client.batches.list(config={"page_size": 2})
    assert len(pager.page) == 2
    listed = [job.name for job in pager]
    assert names <= set(listed) and len(listed) == len(set(listed))
    assert all(name and name.startswith("batches/gbatch-") for name in listed)
    with openai.OpenAI(base_url=server.v1, api_key="any", max_retries=0) as oai:
        assert not any(b.id.startswith("gbatch-") for b in oai.batches.list())
        with pytest.raises(openai.NotFoundError):
            oai.batches.retrieve(next(iter(names)).removeprefix("batches/"))


def test_cancel_reports_the_unrun_requests_and_an_ended_batch_cannot_be_cancelled(
        client: genai.Client) -> None:
    job = client.batches.create(model="echo-slow",
                                src=[text_request(f"r{i}") for i in range(150)])
    client.batches.cancel(name=job.name or "")
    done = wait(client, job.name or "")
    assert done.state is types.JobState.JOB_STATE_CANCELLED
    answers = done.dest.inlined_responses if done.dest else None
    assert answers is not None and len(answers) == 150
    cancelled = [a for a in answers if a.error is not None]
    assert cancelled and all(a.error and a.error.code == 1 for a in cancelled)
    assert all(answer_text(a.response) == f"r{i}" for i, a in enumerate(answers)
               if a.error is None)
    with pytest.raises(errors.ClientError) as refused:
        client.batches.cancel(name=job.name or "")
    assert refused.value.code == 400 and refused.value.status == "FAILED_PRECONDITION"


def test_delete_only_an_ended_batch_and_its_results_go_with_it(
        client: genai.Client, tmp_path: Path) -> None:
    running = client.batches.create(model="echo-slow",
                                    src=[text_request(f"r{i}") for i in range(100)])
    with pytest.raises(errors.ClientError) as refused:
        client.batches.delete(name=running.name or "")
    assert refused.value.code == 400 and refused.value.status == "FAILED_PRECONDITION"
    client.batches.cancel(name=running.name or "")
    wait(client, running.name or "")
    client.batches.delete(name=running.name or "")
    with pytest.raises(errors.ClientError) as gone:
        client.batches.get(name=running.name or "")
    assert gone.value.code == 404 and gone.value.status == "NOT_FOUND"

    path = tmp_path / "one.jsonl"
    path.write_text(json.dumps({"key": "k", "request": text_request("x")}) + "\n")
    uploaded = client.files.upload(file=path, config={"mime_type": "application/jsonl"})
    done = wait(client, client.batches.create(model="echo", src=uploaded.name or "").name
                or "")
    results = done.dest.file_name if done.dest else None
    assert results and client.files.get(name=results)
    client.batches.delete(name=done.name or "")
    with pytest.raises(errors.ClientError) as file_gone:
        client.files.get(name=results)
    assert file_gone.value.code == 404
    client.files.delete(name=uploaded.name or "")
    assert uploaded.name not in [f.name for f in client.files.list()]


def test_errors_come_in_googles_envelope_naming_the_field(client: genai.Client,
                                                          server: Server) -> None:
    with pytest.raises(errors.ClientError) as unknown_model:
        client.batches.create(model="nope", src=[text_request("x")])
    assert unknown_model.value.code == 404 and unknown_model.value.status == "NOT_FOUND"
    assert "models/nope is not found" in (unknown_model.value.message or "")
    image = {"contents": [{"parts": [{"inline_data": {"mime_type": "image/png",
                                                       "data": b"\x89PNG"}}]}]}
    with pytest.raises(errors.ClientError) as bad_part:
        client.batches.create(model="echo", src=[text_request("ok"), image])
    assert bad_part.value.code == 400 and bad_part.value.status == "INVALID_ARGUMENT"
    assert "requests[1].request.contents[0].parts[0]" in (bad_part.value.message or "")
    with pytest.raises(errors.ClientError) as no_batch:
        client.batches.get(name="batches/gbatch-nothing")
    assert no_batch.value.code == 404
    raw = httpx.post(f"{server.base_url}/gemini/v1beta/models/echo:batchGenerateContent",
                     json={"batch": {"input_config": {}}})
    error = raw.json()["error"]
    assert raw.status_code == 400 and error["status"] == "INVALID_ARGUMENT"
    assert error["details"][0]["fieldViolations"][0]["field"] == "batch.input_config"


def test_a_resumable_upload_in_several_chunks(server: Server, client: genai.Client) -> None:
    url = f"{server.base_url}/gemini/upload/v1beta/files"
    data = b"".join(json.dumps({"key": str(i), "request": text_request(f"c{i}")}).encode()
                    + b"\n" for i in range(40))
    start = httpx.post(url, json={"file": {"display_name": "chunks.jsonl"}}, headers={
        "x-goog-api-key": "any", "X-Goog-Upload-Protocol": "resumable",
        "X-Goog-Upload-Command": "start",
        "X-Goog-Upload-Header-Content-Length": str(len(data))})
    assert start.status_code == 200 and start.headers["x-goog-upload-status"] == "active"
    upload_url = start.headers["x-goog-upload-url"]

    def send(command: str, offset: int, body: bytes) -> httpx.Response:
        # No API key: the upload URL is what authorizes the chunks, as on the hosted API.
        return httpx.post(upload_url, content=body, headers={
            "X-Goog-Upload-Command": command, "X-Goog-Upload-Offset": str(offset)})

    half = len(data) // 2
    assert send("upload", 0, data[:half]).headers["x-goog-upload-status"] == "active"
    query = send("query", 0, b"")
    assert query.headers["x-goog-upload-size-received"] == str(half)
    wrong = send("upload", 5, data[half:])
    assert wrong.status_code == 400 and wrong.headers["x-goog-upload-status"] == "final"
    assert "X-Goog-Upload-Offset" in wrong.json()["error"]["message"]
    too_long = send("upload, finalize", half, data[half:] + b"extra")
    assert too_long.status_code == 400
    final = send("upload, finalize", half, data[half:])
    assert final.status_code == 200 and final.headers["x-goog-upload-status"] == "final"
    made = final.json()["file"]
    assert made["sizeBytes"] == str(len(data)) and made["displayName"] == "chunks.jsonl"
    assert client.files.download(file=made["name"]) == data == _download(server, made)
    assert send("query", 0, b"").status_code == 404  # the upload is over

    job = client.batches.create(model="echo", src=made["name"])
    done = wait(client, job.name or "")
    assert done.state is types.JobState.JOB_STATE_SUCCEEDED


def _download(server: Server, made: dict[str, Any]) -> bytes:
    answer = httpx.get(f"{server.base_url}/gemini/v1beta/{made['name']}:download",
                       params={"alt": "media"}, headers={"x-goog-api-key": "any"})
    assert answer.status_code == 200
    return answer.content


def test_the_hosted_path_layout_at_the_root(server: Server) -> None:
    """`base_url` without a prefix and `api_version="v1beta"`: `/v1beta/...` and
    `/upload/v1beta/files`, as on generativelanguage.googleapis.com."""
    client = gemini(server.base_url, api_version="v1beta")
    job = client.batches.create(model="echo", src=[text_request("root")])
    done = wait(client, job.name or "")
    assert done.dest and done.dest.inlined_responses
    assert answer_text(done.dest.inlined_responses[0].response) == "root"


def test_keys_and_projects(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    key_a = add_key(keys, "team-a", role="member")[1]
    key_b = add_key(keys, "team-b", role="member")[1]
    config = tmp_path / "deployments.yaml"
    config.write_text(SDK_DEPLOYMENTS)
    server = start_server(tmp_path, "--config", str(config), "--keys-file", str(keys),
                          "--workers", "1")
    try:
        base = server.base_url + "/gemini"
        team_a, team_b = gemini(base, key_a), gemini(base, key_b)
        path = tmp_path / "in.jsonl"
        path.write_text(json.dumps({"key": "k", "request": text_request("mine")}) + "\n")
        uploaded = team_a.files.upload(file=path, config={"mime_type": "application/jsonl"})
        job = team_a.batches.create(model="echo", src=uploaded.name or "")
        assert wait(team_a, job.name or "").state is types.JobState.JOB_STATE_SUCCEEDED
        for call in (lambda: team_b.batches.get(name=job.name or ""),
                     lambda: team_b.files.get(name=uploaded.name or ""),
                     lambda: team_b.batches.create(model="echo", src=uploaded.name or "")):
            with pytest.raises(errors.ClientError) as hidden:
                call()
            assert hidden.value.code == 404
        assert job.name not in [j.name for j in team_b.batches.list()]
        stranger = gemini(base, "wrong")  # kept: a dropped client closes its connection
        with pytest.raises(errors.ClientError) as bad_key:
            stranger.batches.list()
        assert bad_key.value.code == 401 and bad_key.value.status == "UNAUTHENTICATED"
        # `?key=` works as the header does, on the Gemini paths.
        by_query = httpx.get(f"{base}/v1beta/{job.name}", params={"key": key_a})
        assert by_query.status_code == 200 and by_query.json()["name"] == job.name
        assert httpx.get(f"{base}/v1beta/{job.name}").status_code == 401
    finally:
        server.stop()


def test_a_batch_past_its_window_expires(tmp_path: Path) -> None:
    config = tmp_path / "deployments.yaml"
    config.write_text(SDK_DEPLOYMENTS)
    server = start_server(tmp_path, "--config", str(config), "--workers", "1",
                          "--chunk-size", "5", "--message-batch-window", "2")
    try:
        client = gemini(server.base_url + "/gemini")
        job = client.batches.create(model="echo-slow",
                                    src=[text_request(f"r{i}") for i in range(200)])
        done = wait(client, job.name or "")
        assert done.state is types.JobState.JOB_STATE_EXPIRED
        answers = done.dest.inlined_responses if done.dest else None
        assert answers is not None and len(answers) == 200
        assert any(a.error and a.error.code == 4 for a in answers)  # DEADLINE_EXCEEDED
    finally:
        server.stop()


@pytest.mark.postgres
def test_on_postgres_concurrent_readers_make_one_results_file(
        pg_url: str, tmp_path: Path) -> None:
    """The first read of an ended batch writes its results file; readers racing for it all
    get that one file, and the engine's own output and error files go."""
    config = tmp_path / "deployments.yaml"
    config.write_text(SDK_DEPLOYMENTS)
    server = start_server(tmp_path, "--config", str(config), "--database-url", pg_url,
                          "--workers", "1")
    store = SqlStore.from_url(pg_url)
    try:
        client = gemini(server.base_url + "/gemini")
        path = tmp_path / "in.jsonl"
        path.write_text("".join(json.dumps({"key": f"k{i}", "request": text_request(str(i))})
                                + "\n" for i in range(30)))
        uploaded = client.files.upload(file=path, config={"mime_type": "application/jsonl"})
        name = client.batches.create(model="echo", src=uploaded.name or "").name or ""
        batch_id = name.removeprefix("batches/")
        deadline = time.monotonic() + 60
        while not (batch := store.get_batch(None, batch_id)) or not batch.status.is_terminal:
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert batch.output_file_id is not None
        with ThreadPoolExecutor(8) as pool:
            ops = list(pool.map(lambda _: operation(server, name), range(8)))
        files = {op["metadata"]["output"]["responsesFile"] for op in ops}
        assert len(files) == 1
        lines = client.files.download(file=files.pop()).splitlines()
        assert [json.loads(line)["key"] for line in lines] == [f"k{i}" for i in range(30)]
        assert store.get_file(None, batch.output_file_id) is None
        assert [j.name for j in client.batches.list()] == [name]
    finally:
        store.close()
        server.stop()
