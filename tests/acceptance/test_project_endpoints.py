"""Endpoints and deployments belong to projects, and the operator's policy bounds what
admins may create over REST: a real `batchery serve` with a keys file and a config file."""

from __future__ import annotations

import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anthropic
import httpx
import orjson
import pytest
import yaml
from openai import OpenAI

from tests.acceptance.jobs_support import PREDICTORS
from tests.conftest import Server, start_server

pytestmark = pytest.mark.slow

KEYS = {"admin-a": ("a", "admin"), "member-a": ("a", "member"), "member-b": ("b", "member"),
        "admin-b": ("b", "admin")}
NOT_AVAILABLE = "is not available."


def key_of(name: str) -> str:
    return f"sk-test-{name}-0123456789"


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("project-endpoints")
    keys = root / "keys.yaml"
    keys.write_text(yaml.safe_dump({"keys": [
        {"name": name, "project": project, "role": role,
         "sha256": hashlib.sha256(key_of(name).encode()).hexdigest()}
        for name, (project, role) in KEYS.items()]}))
    config = root / "config.yaml"
    config.write_text(yaml.safe_dump({
        "security": {"allow_code_deployments": True, "allowed_env": ["OPENAI_API_KEY"],
                     "upstream_hosts": ["api.openai.com"], "max_workers_per_deployment": 4},
        "deployments": [{"name": "shared-echo", "backend": "echo"},
                        {"name": "a-only-echo", "backend": "echo", "projects": ["a"]}],
        "endpoints": [
            {"name": "conf-all", "deployments": [{"name": "e1", "backend": "echo"}]},
            {"name": "conf-a", "projects": ["a"],
             "deployments": [{"name": "e1", "backend": "echo"}]}],
    }))
    server = start_server(root, "--config", str(config), "--keys-file", str(keys),
                          "--workers", "1", name="projects")
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator[dict[str, httpx.Client]]:
    clients = {name: httpx.Client(base_url=server.base_url + "/api/v1", timeout=30,
                                  headers={"authorization": f"Bearer {key_of(name)}"})
               for name in KEYS}
    yield clients
    for client in clients.values():
        client.close()


def echo_endpoint(name: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "deployments": [{"name": "e1", "backend": "echo"}], **extra}


def create(client: httpx.Client, body: dict[str, Any]) -> dict[str, Any]:
    response = client.post("/endpoints", json=body)
    assert response.status_code == 200, response.text
    created: dict[str, Any] = response.json()
    return created


def names(client: httpx.Client, path: str = "/endpoints") -> set[str]:
    response = client.get(path)
    assert response.status_code == 200, response.text
    return {item.get("name") or item["id"] for item in response.json()["data"]}


def model_ids(server: Server, key: str) -> set[str]:
    response = httpx.get(server.v1 + "/models", headers={"authorization": f"Bearer {key}"})
    assert response.status_code == 200, response.text
    return {m["id"] for m in response.json()["data"]}


def error(response: httpx.Response, status: int) -> dict[str, Any]:
    assert response.status_code == status, response.text
    found: dict[str, Any] = response.json()["error"]
    return found


def openai_batch(server: Server, key: str, model: str) -> Any:
    """A one-line chat batch of project `key`, waited for until it ends."""
    with OpenAI(base_url=server.v1, api_key=key, max_retries=0) as client:
        line = orjson.dumps({"custom_id": "r1", "method": "POST", "url": "/v1/chat/completions",
                             "body": {"model": model,
                                      "messages": [{"role": "user", "content": "hi"}]}})
        upload = client.files.create(file=("in.jsonl", line + b"\n"), purpose="batch")
        batch = client.batches.create(input_file_id=upload.id, completion_window="24h",
                                      endpoint="/v1/chat/completions")
        deadline = time.monotonic() + 60
        while batch.status not in ("completed", "failed") and time.monotonic() < deadline:
            time.sleep(0.2)
            batch = client.batches.retrieve(batch.id)
        return batch


def test_another_projects_endpoint_is_invisible_everywhere(
        server: Server, http: dict[str, httpx.Client]) -> None:
    created = create(http["admin-a"], echo_endpoint("a-ep"))
    assert created["project"] == "a"
    assert "a-ep" in names(http["member-a"])
    assert http["member-a"].get("/endpoints/a-ep").status_code == 200
    assert "a-ep" in model_ids(server, key_of("member-a"))

    b = http["member-b"]
    assert "a-ep" not in names(b)
    missing = error(b.get("/endpoints/ghost"), 404)
    hidden = error(b.get("/endpoints/a-ep"), 404)
    assert hidden["message"] == "No endpoint named 'a-ep'." == \
        missing["message"].replace("ghost", "a-ep")
    for method, path, body in [("GET", "/endpoints/a-ep/deployments", None),
                               ("PATCH", "/endpoints/a-ep", {"default_deployment": "e1"}),
                               ("DELETE", "/endpoints/a-ep", None),
                               ("POST", "/endpoints/a-ep/deployments",
                                {"name": "e2", "backend": "echo"}),
                               ("POST", "/endpoints/a-ep/jobs",
                                {"item_list": {"items": [1], "batch_size": 1}})]:
        assert error(b.request(method, path, json=body), 404)["message"] == \
            "No endpoint named 'a-ep'.", (method, path)
    # An admin of project b manages it (admins see every project's endpoints).
    assert http["admin-b"].get("/endpoints/a-ep").status_code == 200

    # As a model: unlisted, and a batch line naming it fails as an unknown model does.
    assert "a-ep" not in model_ids(server, key_of("member-b"))
    assert httpx.get(server.v1 + "/models/a-ep",
                     headers={"authorization": f"Bearer {key_of('member-b')}"}
                     ).status_code == 404
    refused = openai_batch(server, key_of("member-b"), "a-ep")
    unknown = openai_batch(server, key_of("member-b"), "no-such-model")
    assert refused.status == unknown.status == "failed"
    assert [e.code for e in refused.errors.data] == [e.code for e in unknown.errors.data] \
        == ["model_not_found"]
    assert openai_batch(server, key_of("member-a"), "a-ep").status == "completed"

    # Anthropic reports a model per request: the worker refuses it for project b.
    with anthropic.Anthropic(base_url=server.base_url, api_key=key_of("member-b"),
                             max_retries=0) as client:
        batch = client.messages.batches.create(requests=[
            {"custom_id": c, "params": {"model": m, "max_tokens": 16,
                                        "messages": [{"role": "user", "content": "hi"}]}}
            for c, m in (("theirs", "a-ep"), ("shared", "shared-echo"))])
        deadline = time.monotonic() + 60
        while client.messages.batches.retrieve(batch.id).processing_status != "ended":
            assert time.monotonic() < deadline
            time.sleep(0.2)
        results = {r.custom_id: r.result for r in client.messages.batches.results(batch.id)}
    assert results["shared"].type == "succeeded"
    assert results["theirs"].type == "errored"
    assert results["theirs"].error.error.type == "not_found_error"


def test_only_admins_manage_endpoints(http: dict[str, httpx.Client]) -> None:
    member = http["member-a"]
    denied = error(member.post("/endpoints", json=echo_endpoint("by-member")), 403)
    assert denied["code"] == "permission_denied"
    create(http["admin-a"], echo_endpoint("managed"))
    for method, path, body in [("PATCH", "/endpoints/managed", {"default_deployment": "e1"}),
                               ("DELETE", "/endpoints/managed", None),
                               ("POST", "/endpoints/managed/deployments",
                                {"name": "e2", "backend": "echo"})]:
        assert error(member.request(method, path, json=body), 403)["code"] == \
            "permission_denied", (method, path)
    admin = http["admin-a"]
    added = admin.post("/endpoints/managed/deployments", json={"name": "e2", "backend": "echo"})
    assert added.status_code == 200, added.text
    switched = admin.patch("/endpoints/managed", json={"default_deployment": "e2"})
    assert switched.json()["default_deployment"] == "e2"
    assert admin.delete("/endpoints/managed").status_code == 200
    assert admin.get("/endpoints/managed").status_code == 404


def test_an_admin_may_create_for_another_project_and_names_are_one_namespace(
        http: dict[str, httpx.Client]) -> None:
    created = create(http["admin-a"], echo_endpoint("for-b", project="b"))
    assert created["project"] == "b"
    assert "for-b" in names(http["member-b"]) and "for-b" not in names(http["member-a"])
    # Taken, by whichever project: the same answer, which does not say whose it is.
    for name in ("for-b", "conf-a", "shared-echo"):
        taken = error(http["admin-b"].post("/endpoints", json=echo_endpoint(name)), 409)
        assert taken["message"] == f"The name '{name}' {NOT_AVAILABLE}"
    bad = error(http["admin-a"].post("/endpoints", json=echo_endpoint("x", project="a b")),
                400)
    assert bad["param"] == "project"


def test_config_endpoints_are_changed_only_in_the_config_file(
        http: dict[str, httpx.Client]) -> None:
    admin = http["admin-a"]
    for method, path, body in [("PATCH", "/endpoints/conf-all", {"default_deployment": "e1"}),
                               ("DELETE", "/endpoints/conf-all", None),
                               ("POST", "/endpoints/conf-all/deployments",
                                {"name": "e2", "backend": "echo"})]:
        refused = error(admin.request(method, path, json=body), 403)
        assert "declared in the config file; change it there" in refused["message"]
    assert admin.get("/endpoints/conf-all").json()["source"] == "config"


def test_config_projects_limit_who_sees_an_endpoint(
        server: Server, http: dict[str, httpx.Client]) -> None:
    assert {"conf-all", "conf-a"} <= names(http["member-a"])
    assert "conf-all" in names(http["member-b"])
    assert "conf-a" not in names(http["member-b"])
    assert error(http["member-b"].get("/endpoints/conf-a"), 404)["message"] == \
        "No endpoint named 'conf-a'."
    of_a, of_b = model_ids(server, key_of("member-a")), model_ids(server, key_of("member-b"))
    assert {"conf-a", "conf-a/e1", "a-only-echo", "shared-echo"} <= of_a
    assert "shared-echo" in of_b and not {"conf-a", "conf-a/e1", "a-only-echo"} & of_b
    assert openai_batch(server, key_of("member-b"), "a-only-echo").errors.data[0].code == \
        "model_not_found"


@pytest.mark.parametrize(("deployment", "status", "names_in_message"), [
    ({"name": "e1", "backend": "echo", "workers": {"min": 0, "max": 5}}, 400,
     ["workers.max", "4"]),
    ({"name": "e1", "backend": "openai", "options": {
        "base_url": "https://api.openai.com/v1", "api_key_env": "BATCHERY_SECRET_KEY"}}, 403,
     ["options.api_key_env", "BATCHERY_SECRET_KEY"]),
    ({"name": "e1", "backend": "openai", "options": {
        "base_url": "https://api.openai.com/v1", "api_key_env": "HOME"}}, 403,
     ["options.api_key_env", "security.allowed_env"]),
    ({"name": "e1", "backend": "openai", "options": {"base_url": "http://127.0.0.1:1/v1"}},
     403, ["options.base_url", "127.0.0.1", "security.upstream_hosts"]),
    ({"name": "e1", "backend": "openai", "options": {"base_url": 123}}, 400,
     ["options.base_url", "expected a string"]),
    ({"name": "e1", "backend": "echo", "options": {"latency_ms": -5}}, 400, ["latency_ms"]),
    ({"name": "e1", "backend": "python", "options": {
        "predictor": "job_predictors:Doubler", "python_path": ["{data}/../projects-data"]}},
     403, ["options.python_path[0]"]),
])
def test_the_operators_policy_bounds_rest_deployments(
        server: Server, http: dict[str, httpx.Client], deployment: dict[str, Any],
        status: int, names_in_message: list[str]) -> None:
    options = deployment.get("options", {})
    if "python_path" in options:
        options["python_path"] = [p.format(data=server.data_dir) for p in options["python_path"]]
    refused = error(http["admin-a"].post("/endpoints", json={
        "name": "policy-test", "deployments": [deployment]}), status)
    for name in names_in_message:
        assert name in refused["message"], refused
    assert http["admin-a"].get("/endpoints/policy-test").status_code == 404
    # The same deployment, added to an existing endpoint, is refused the same way.
    create(http["admin-a"], echo_endpoint("policy-base"))
    try:
        again = http["admin-a"].post("/endpoints/policy-base/deployments",
                                     json={**deployment, "name": "e9"})
        assert again.status_code == status, again.text
    finally:
        assert http["admin-a"].delete("/endpoints/policy-base").status_code == 200


def test_deleting_an_endpoint_stops_its_workers(server: Server,
                                                http: dict[str, httpx.Client]) -> None:
    create(http["admin-a"], {"name": "pooled", "deployments": [{
        "name": "v1", "backend": "python", "workers": {"min": 2, "max": 2},
        "options": {"predictor": "job_predictors:Doubler", "python_path": [str(PREDICTORS)]},
    }]})
    deadline = time.monotonic() + 30
    while len(pids := pool_workers(server, "pooled/v1")) < 2:
        assert time.monotonic() < deadline, "the pool never started its 2 workers"
        time.sleep(0.2)
    assert http["admin-a"].delete("/endpoints/pooled").status_code == 200
    deadline = time.monotonic() + 60
    # Gone and reaped: a zombie would keep its /proc entry.
    while remaining := [p for p in pids if Path(f"/proc/{p}").exists()]:
        assert time.monotonic() < deadline, f"workers still there: {remaining}"
        time.sleep(0.1)
    assert not pool_workers(server, "pooled/v1")


def pool_workers(server: Server, deployment: str) -> set[int]:
    """The pids of the server's worker processes for `deployment`."""
    found = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            args = (entry / "cmdline").read_bytes().split(b"\0")
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if ppid == server.process.pid and deployment.encode() in args:
            found.add(int(entry.name))
    return found
