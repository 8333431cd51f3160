"""The API as HTTP: its OpenAPI schema says what the server does (checked by schemathesis
against a real `batchery serve`), wrong methods get 405 with `Allow`, and a 500 leaves the
connection usable."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import schemathesis
import uvicorn
from fastapi import Request
from hypothesis import configuration
from schemathesis.engine import events, from_schema

from batchery.api.app import create_app
from batchery.runtime import open_runtime
from batchery.security.auth import add_key
from batchery.settings import Settings
from tests.conftest import Server, start_server

#: The routes that read a request body: each must declare it.
BODY_ROUTES = {("post", "/v1/files"), ("post", "/v1/batches"), ("post", "/v1/messages/batches"),
               ("post", "/api/v1/endpoints"), ("patch", "/api/v1/endpoints/{name}"),
               ("post", "/api/v1/endpoints/{name}/deployments"),
               ("post", "/api/v1/endpoints/{name}/jobs"), ("post", "/api/v1/keys")}
#: Streams: their content type, documented with a string schema.
STREAMS = {("get", "/v1/files/{file_id}/content"): "application/octet-stream",
           ("get", "/v1/messages/batches/{batch_id}/results"): "application/x-jsonl",
           ("get", "/api/v1/jobs/{job_id}/results"): "application/x-ndjson",
           ("get", "/v1/batches/{batch_id}/results"): "application/jsonl",
           ("get", "/api/v1/jobs/{job_id}/logs"): "text/plain"}
#: What a JSON Schema cannot say: `custom_id`s unique within a batch. A schema-valid body
#: that repeats one is refused, rightly, with 400.
UNSAYABLE = {("POST /v1/messages/batches", "positive_data_acceptance"): "must be unique"}


@pytest.fixture(scope="module")
def keyed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, str]]:
    """A server with a keys file, and a member key of it."""
    tmp = tmp_path_factory.mktemp("openapi")
    keys = tmp / "keys.yaml"
    member = add_key(keys, "team-a", role="member")[1]
    add_key(keys, "team-a", role="admin")
    config = tmp / "config.yaml"
    config.write_text("deployments:\n  - {name: echo, backend: echo}\n")
    server = start_server(tmp, "--config", str(config), "--keys-file", str(keys),
                          "--workers", "1")
    yield server, member
    server.stop()


def operations(schema: dict[str, Any]) -> Iterator[tuple[str, str, dict[str, Any]]]:
    for path, item in schema["paths"].items():
        for method, operation in item.items():
            yield method, path, operation


def test_every_operation_documents_its_body_answer_and_errors(
        keyed: tuple[Server, str]) -> None:
    server, _ = keyed
    schema = httpx.get(server.base_url + "/openapi.json").json()
    seen = set()
    for method, path, operation in operations(schema):
        seen.add((method, path))
        where = f"{method.upper()} {path}"
        responses = operation["responses"]
        assert "422" not in responses, where
        envelope = "AnthropicError" if path.startswith("/v1/messages") else "OpenAIError"
        errors = [400, 401, 403, 404] + ([413] if "requestBody" in operation else [])
        for status in errors:
            content = responses[str(status)]["content"]["application/json"]
            assert content["schema"] == {"$ref": f"#/components/schemas/{envelope}"}, where
        (media_type, answer), = responses["200"]["content"].items()
        if (method, path) in STREAMS:
            assert media_type == STREAMS[(method, path)], where
            assert answer["schema"]["type"] == "string", where
        else:
            assert media_type == "application/json", where
            refs = [answer["schema"]] if "$ref" in answer["schema"] \
                else answer["schema"]["anyOf"]
            assert all(r["$ref"].startswith("#/components/schemas/") for r in refs), where
        if (method, path) in BODY_ROUTES:
            body = operation["requestBody"]
            assert body["required"], where
            (_, content), = body["content"].items()
            assert content["schema"]["type"] == "object", where
    assert seen >= BODY_ROUTES | set(STREAMS)
    assert schema["security"], "a server with a keys file asks for a key"


def test_schemathesis_finds_nothing(keyed: tuple[Server, str], tmp_path: Path,
                                    monkeypatch: pytest.MonkeyPatch,
                                    request: pytest.FixtureRequest) -> None:
    """Every check schemathesis has, over every operation, as a member key."""
    server, member = keyed
    # Schemathesis and hypothesis keep their files here, not in the working tree.
    monkeypatch.chdir(tmp_path)
    configuration.set_hypothesis_home_dir(tmp_path / ".hypothesis")
    request.addfinalizer(lambda: configuration.set_hypothesis_home_dir(None))
    config = schemathesis.Config.from_dict({
        "headers": {"Authorization": f"Bearer {member}"},
        "workers": 1,
        # A fixed seed: the same cases on every run, so that a red run is a finding that
        # reproduces, never a roll of the dice (the cases still cover every operation).
        "seed": 20261202,
        "generation": {"max-examples": 8, "database": "none"},
        "cache": {"enabled": False},
        "request-timeout": 10,
        "checks": {"enabled": True},
    })
    schema = schemathesis.openapi.from_url(server.base_url + "/openapi.json", config=config)
    failures, errors = run(schema)
    assert not errors, "\n".join(errors)
    assert not failures, "\n\n".join(failures)


def run(schema: Any) -> tuple[list[str], list[str]]:
    """Runs every phase; returns the failures (but those in UNSAYABLE) and the errors."""
    failures: list[str] = []
    errors: list[str] = []
    for event in from_schema(schema).execute():
        if isinstance(event, events.ScenarioFinished):
            failures += scenario_failures(event.recorder)
        elif isinstance(event, events.NonFatalError | events.FatalError):
            info = getattr(event, "info", event)
            errors.append(f"{getattr(event, 'label', '')}: {info}\n"
                          f"{getattr(info, 'traceback', '')}")
    return failures, errors


def scenario_failures(recorder: Any) -> list[str]:
    found = []
    for case_id, checks in recorder.checks.items():
        for check in checks:
            if check.failure_info is None:
                continue
            interaction = recorder.interactions.get(case_id)
            answer = interaction.response.content.decode(errors="replace") \
                if interaction is not None and interaction.response is not None else ""
            # The stateful phase's scenarios chain operations: name the one that failed.
            label = recorder.cases[case_id].value.operation.label
            excused = UNSAYABLE.get((label, check.name))
            if excused is not None and excused in answer:
                continue
            failure = check.failure_info.failure
            found.append(f"{label}: {check.name}: {failure.title}\n"
                         f"{failure.message}\n{check.failure_info.code_sample}\n{answer[:500]}")
    return found


def test_a_wrong_method_gets_405_listing_the_allowed_ones(keyed: tuple[Server, str]) -> None:
    server, member = keyed
    auth = {"Authorization": f"Bearer {member}"}
    cases = {"/v1/batches": ("PUT", "GET, POST", "error"),
             "/v1/files/file-x": ("POST", "DELETE, GET", "error"),
             "/v1/messages/batches/msgbatch_x": ("PATCH", "DELETE, GET", "type"),
             "/api/v1/jobs/job-x": ("PATCH", "DELETE, GET", "error")}
    for path, (method, allowed, envelope_key) in cases.items():
        answer = httpx.request(method, server.base_url + path, headers=auth)
        assert answer.status_code == 405, (path, answer.text)
        assert answer.headers["allow"] == allowed, path
        assert envelope_key in answer.json(), path
    anthropic = httpx.request("PATCH", server.base_url + "/v1/messages/batches/x",
                              headers=auth).json()
    assert anthropic["type"] == "error" and anthropic["error"]["type"] == \
        "invalid_request_error"


@pytest.fixture
def threaded_app(tmp_path: Path) -> Iterator[tuple[str, list[int]]]:
    """The real app in this process, served by uvicorn on a thread, with one route that
    fails and one that tells which client port (so which connection) it was called on."""
    runtime = open_runtime(Settings(data_dir=tmp_path / "data"))
    app = create_app(runtime)
    ports: list[int] = []

    def boom() -> None:
        raise RuntimeError("boom: a bug in a route")

    def port(request: Request) -> dict[str, int]:
        assert request.client is not None
        ports.append(request.client.port)
        return {"port": request.client.port}

    app.add_api_route("/v1/test-boom", boom)
    app.add_api_route("/v1/test-port", port)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=0,
                                           log_level="critical", lifespan="off"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        assert time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]  # the one the system gave it
    yield f"http://127.0.0.1:{port}", ports
    server.should_exit = True
    thread.join(10)
    runtime.close()


def test_a_500_leaves_the_connection_usable(threaded_app: tuple[str, list[int]]) -> None:
    base_url, ports = threaded_app
    with httpx.Client(base_url=base_url) as client:
        client.get("/v1/test-port")
        failed = client.get("/v1/test-boom")
        assert failed.status_code == 500
        assert failed.json()["error"]["type"] == "server_error"
        assert failed.headers.get("connection") != "close"
        time.sleep(0.2)  # time for a server that drops the connection to have dropped it
        client.get("/v1/test-port")
    assert len(ports) == 2 and ports[0] == ports[1], "the 500 cost the connection"
