"""Attacks on a shared server, replayed against a real `batchery serve`: each must fail
with a clear 4xx and leak nothing (every response is also checked by the clients of
`conftest.py`: never a 5xx, never a secret, a key or a key hash)."""

from __future__ import annotations

import io
import os
import re
import shutil
import subprocess
import sys
import time
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anthropic
import httpx
import pytest
from openai import OpenAI

from tests.security.conftest import (
    PREDICTORS,
    Listener,
    Site,
    assert_no_leak,
    chat_line,
    create_batch,
    jsonl,
    openai_error,
    server_env,
    start_site,
    upload,
    wait_batch,
    wait_job,
    wait_message_batch,
)

pytestmark = pytest.mark.slow
MIB = 1024 * 1024
SHARED_JOBS = "/api/v1/endpoints/shared/jobs"


def _stored_path(data_dir: Path, file_id: str) -> Path:
    """Where the server keeps an uploaded file's bytes: what an attacker would guess."""
    found = [p for p in data_dir.rglob(file_id) if p.is_file()]
    assert found, f"the upload {file_id} is not stored under {data_dir}"
    return found[0]


def _evil_zip(marker: Path) -> bytes:
    """A zip that, put on a worker's `sys.path` and imported, proves it ran."""
    source = (f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n\n"
              "class Evil:\n    def predict(self, batch):\n        return batch\n")
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("evil_predictor.py", source)
    return buffer.getvalue()


def _code_endpoint(name: str, python_path: str) -> dict[str, Any]:
    return {"name": name, "deployments": [{
        "name": "x", "backend": "python",
        "options": {"predictor": "evil_predictor:Evil", "python_path": [python_path]}}]}


def _absent(client: httpx.Client, endpoint: str) -> None:
    assert client.get(f"/api/v1/endpoints/{endpoint}").status_code == 404


def _delete_if_created(admin: httpx.Client, response: httpx.Response, name: str) -> None:
    """A refused attack creates nothing; one that got through must not linger."""
    if response.status_code == 200:
        admin.delete(f"/api/v1/endpoints/{name}")


# -- code deployments ------------------------------------------------------------------

def test_an_uploaded_zip_cannot_become_a_code_deployment(site: Site, alpha: httpx.Client,
                                                         admin: httpx.Client) -> None:
    marker = site.root / "evil-ran"
    file_id = upload(alpha, _evil_zip(marker), purpose="user_data", filename="evil.zip")
    body = _code_endpoint("evil", str(_stored_path(site.server.data_dir, file_id)))

    by_member = alpha.post("/api/v1/endpoints", json=body)
    _delete_if_created(admin, by_member, "evil")
    assert by_member.status_code == 403, by_member.text
    assert openai_error(by_member)["code"] == "permission_denied"

    by_admin = admin.post("/api/v1/endpoints", json=body)  # no --allow-code-deployments
    _delete_if_created(admin, by_admin, "evil")
    assert by_admin.status_code == 403, by_admin.text
    assert openai_error(by_admin)["code"] == "permission_denied"
    _absent(admin, "evil")
    assert not marker.exists()


@pytest.fixture(scope="module")
def code_site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    """A second server whose operator allows code deployments; the API alone."""
    found = start_site(tmp_path_factory.mktemp("code-server"), "code", "--workers", "0",
                       "--allow-code-deployments")
    yield found
    for client in found.clients.values():
        client.close()
    found.server.stop()


def _into_data_dir(site: Site, stored: Path) -> list[str]:
    """Ways to name an uploaded file: plainly, through `..`, through a symlink; and the
    data directory itself."""
    link = site.root / "innocent-looking"
    if not link.exists():
        link.symlink_to(site.server.data_dir)
    relative = stored.relative_to(site.server.data_dir)
    return [str(stored), f"{PREDICTORS}/../{os.path.relpath(stored, PREDICTORS.parent)}",
            str(link / relative), str(site.server.data_dir)]


def test_python_path_into_the_data_dir_is_refused_even_with_code_allowed(
        code_site: Site) -> None:
    alpha, admin = code_site.client("alpha"), code_site.client("admin")
    marker = code_site.root / "evil-ran"
    file_id = upload(alpha, _evil_zip(marker), purpose="user_data", filename="evil.zip")
    stored = _stored_path(code_site.server.data_dir, file_id)
    for i, path in enumerate(_into_data_dir(code_site, stored)):
        name = f"evil{i}"
        answer = admin.post("/api/v1/endpoints", json=_code_endpoint(name, path))
        _delete_if_created(admin, answer, name)
        assert answer.status_code in (400, 403), (path, answer.text)
        assert "python_path" in openai_error(answer)["message"], answer.text
        _absent(admin, name)
    # The same admin may deploy code that lives outside the data directory.
    allowed = admin.post("/api/v1/endpoints", json={"name": "fine", "deployments": [{
        "name": "x", "backend": "python",
        "options": {"predictor": "job_predictors:Doubler", "python_path": [str(PREDICTORS)]}}]})
    assert allowed.status_code == 200, allowed.text
    assert admin.delete("/api/v1/endpoints/fine").status_code == 200
    assert not marker.exists()


def test_an_upload_filename_is_only_a_label(site: Site, alpha: httpx.Client) -> None:
    """The uploader's filename neither picks where the bytes go nor reaches a header
    unescaped."""
    for name in ("../../../evil-upload.jsonl", 'q"; filename="evil.sh', "/etc/cron.d/evil"):
        file_id = upload(alpha, b'{"x": 1}\n', purpose="user_data", filename=name)
        content = alpha.get(f"/v1/files/{file_id}/content")
        assert content.content == b'{"x": 1}\n'
        disposition = content.headers["content-disposition"]
        assert disposition.startswith("attachment; filename*=UTF-8''"), disposition
        assert not set('"/; ') & set(disposition.split("''", 1)[1]), disposition
    assert not list(site.root.rglob("evil-upload.jsonl"))
    assert not Path("/etc/cron.d/evil").exists()


# -- connectors: secrets and internal hosts ---------------------------------------------

def _connector(name: str, backend: str, options: dict[str, Any]) -> dict[str, Any]:
    return {"name": name, "deployments": [{"name": "o", "backend": backend,
                                           "options": options}]}


def test_connectors_cannot_read_server_secrets_or_reach_internal_hosts(
        admin: httpx.Client, listener: Listener) -> None:
    base = f"http://127.0.0.1:{listener.port}/v1"
    attempts = [
        ("leak-secret", "openai", {"base_url": base, "api_key_env": "BATCHERY_SECRET_KEY"},
         "api_key_env"),
        ("leak-env", "openai", {"base_url": base, "api_key_env": "HOME"},
         "may not name the environment variable 'HOME'"),
        ("leak-host", "openai", {"base_url": base}, "upstream_hosts"),
        ("leak-v6", "openai", {"base_url": f"http://[::1]:{listener.port}/v1"},
         "upstream_hosts"),
        ("leak-name", "http", {"url": f"http://localhost:{listener.port}/predict"},
         "upstream_hosts"),
    ]
    for name, backend, options, words in attempts:
        answer = admin.post("/api/v1/endpoints", json=_connector(name, backend, options))
        _delete_if_created(admin, answer, name)
        assert answer.status_code == 403, (name, answer.text)
        error = openai_error(answer)
        assert error["code"] == "permission_denied" and words in error["message"], error
        _absent(admin, name)
    # Refused before anything was built: nothing was ever asked to reach the listener.
    assert listener.connections == 0


# -- job inputs and outputs ------------------------------------------------------------

def _dry_run(client: httpx.Client, body: dict[str, Any]) -> httpx.Response:
    return client.post(SHARED_JOBS, params={"dry_run": "true"}, json=body, timeout=30)


def _stop_if_created(client: httpx.Client, answer: httpx.Response) -> None:
    if answer.status_code == 200 and answer.json().get("object") == "job":
        client.delete(f"/api/v1/jobs/{answer.json()['id']}")


def _listed(path: str) -> list[str]:
    """What a listing of `path` would show: the names of what is there, as full paths."""
    try:
        names = os.listdir(path)
    except OSError:
        return []
    return [f"{path.rstrip('/')}/{n}" for n in names if len(n) >= 3 and n != "tmp"]


@pytest.mark.parametrize("path", ["/root", "/", "/etc"])
def test_file_listing_outside_the_project_roots_is_refused(alpha: httpx.Client,
                                                            path: str) -> None:
    answer = _dry_run(alpha, {"file_path_lister": {"paths": [path], "batch_size": 1}})
    assert answer.status_code == 400, answer.text[:500]
    assert openai_error(answer)["param"].startswith("file_path_lister"), answer.text
    for name in _listed(path):
        assert name not in answer.text, name


@dataclass
class BetaJob:
    id: str
    results: Path
    output_root: Path


@pytest.fixture(scope="module")
def beta_job(site: Site, beta: httpx.Client) -> BetaJob:
    """A finished job of project beta, and where its results lie on disk."""
    answer = beta.post(SHARED_JOBS, json={"item_list": {"items": [1, 2], "batch_size": 2}})
    assert answer.status_code == 200, answer.text
    job = wait_job(beta, answer.json()["id"])
    assert job["status"] == "succeeded", job
    results = Path(job["output_path"]) / "results.jsonl"
    assert results.is_file(), f"no results at {results}"
    return BetaJob(id=job["id"], results=results,
                   output_root=site.server.data_dir / "files" / "outputs" / "beta")


def test_a_job_cannot_read_another_projects_results(site: Site, alpha: httpx.Client,
                                                     beta_job: BetaJob) -> None:
    sneaky = site.alpha_root / "sneaky"
    sneaky.mkdir(exist_ok=True)
    link = sneaky / "results.jsonl"
    if not link.exists():
        link.symlink_to(beta_job.results)
    climb = f"{site.alpha_root}/../{beta_job.results.relative_to(site.root)}"
    for path in (str(beta_job.results), climb, str(link), str(sneaky)):
        body = {"delimited_files": {"paths": [path], "batch_size": 1}}
        for answer in (_dry_run(alpha, body), alpha.post(SHARED_JOBS, json=body)):
            _stop_if_created(alpha, answer)
            assert answer.status_code == 400, (path, answer.text)
            assert openai_error(answer)["param"].startswith("delimited_files"), answer.text
            assert '"item"' not in answer.text and '"prediction"' not in answer.text
    # What the operator granted alpha stays readable.
    granted = _dry_run(alpha, {"delimited_files": {
        "paths": [str(site.alpha_root / "items.jsonl")], "batch_size": 1}})
    assert granted.status_code == 200, granted.text
    assert granted.json()["total_items"] == 2


def test_another_projects_file_id_is_as_unknown_as_a_missing_one(
        alpha: httpx.Client, beta: httpx.Client) -> None:
    theirs = upload(beta, b'{"x": 1}\n', purpose="user_data", filename="theirs.jsonl")
    missing = "file-" + "0" * 24
    answers = []
    for file_id in (theirs, missing):
        answer = _dry_run(alpha, {"delimited_files": {"file_ids": [file_id], "batch_size": 1}})
        assert answer.status_code in (400, 404), answer.text
        answers.append((answer.status_code, openai_error(answer)["message"].replace(
            file_id, "<id>")))
    assert answers[0] == answers[1]


@pytest.mark.parametrize("scheme", ["webhdfs", "ftp", "http"])
@pytest.mark.parametrize("kind", ["file_path_lister", "delimited_files"])
def test_remote_urls_are_refused_before_any_connection(alpha: httpx.Client,
                                                        listener: Listener, scheme: str,
                                                        kind: str) -> None:
    url = f"{scheme}://127.0.0.1:{listener.port}/x/data.jsonl"
    body = {kind: {"paths": [url], "batch_size": 1}}
    for answer in (_dry_run(alpha, body), alpha.post(SHARED_JOBS, json=body, timeout=30)):
        _stop_if_created(alpha, answer)
        assert answer.status_code == 400, answer.text
        assert openai_error(answer)["param"].startswith(kind), answer.text
    time.sleep(0.2)
    assert listener.connections == 0


def _output_targets(site: Site, beta_job: BetaJob) -> list[str]:
    return ["/tmp/evil-" + site.root.name, f"{site.server.data_dir}/../x",
            str(beta_job.output_root), str(beta_job.output_root / "mine"),
            f"{site.server.data_dir}/files/outputs/alpha/../beta/x", str(site.alpha_root)]


def test_jobs_write_only_under_their_own_output_root(site: Site, alpha: httpx.Client,
                                                     beta_job: BetaJob) -> None:
    item = {"item_list": {"items": [1], "batch_size": 1}}
    evil = Path("/tmp/evil-" + site.root.name)
    try:
        for target in _output_targets(site, beta_job):
            answer = alpha.post(SHARED_JOBS, json={**item, "output_path": target})
            _stop_if_created(alpha, answer)
            assert answer.status_code in (400, 403), (target, answer.text)
            assert openai_error(answer)["param"] == "output_path", answer.text
    finally:
        shutil.rmtree(evil, ignore_errors=True)
    own = site.server.data_dir / "files" / "outputs" / "alpha" / "chosen"
    answer = alpha.post(SHARED_JOBS, json={**item, "output_path": str(own)})
    assert answer.status_code == 200, answer.text
    job = wait_job(alpha, answer.json()["id"])
    assert job["status"] == "succeeded" and Path(job["output_path"]).parent == own, job


# -- endpoints that belong to a project ------------------------------------------------

@pytest.fixture(scope="module")
def alpha_ep(admin: httpx.Client) -> Iterator[str]:
    answer = admin.post("/api/v1/endpoints", json={
        "name": "alpha-ep", "project": "alpha",
        "deployments": [{"name": "e", "backend": "echo"}]})
    assert answer.status_code == 200, answer.text
    yield "alpha-ep"
    admin.delete("/api/v1/endpoints/alpha-ep")


def _answer(response: httpx.Response, name: str) -> tuple[int, str]:
    return response.status_code, openai_error(response)["message"].replace(name, "<name>")


@pytest.mark.parametrize(("method", "suffix", "body"), [
    ("GET", "", None),
    ("GET", "/deployments", None),
    ("PATCH", "", {"default_deployment": "e"}),
    ("POST", "/deployments", {"name": "mine", "backend": "echo"}),
    ("DELETE", "", None),
    ("POST", "/jobs", {"item_list": {"items": [1], "batch_size": 1}}),
])
def test_another_projects_endpoint_is_as_absent_as_a_missing_one(
        alpha: httpx.Client, beta: httpx.Client, alpha_ep: str, method: str, suffix: str,
        body: dict[str, Any] | None) -> None:
    theirs = beta.request(method, f"/api/v1/endpoints/{alpha_ep}{suffix}", json=body)
    missing = beta.request(method, f"/api/v1/endpoints/no-such-ep{suffix}", json=body)
    assert theirs.status_code == 404, theirs.text
    assert _answer(theirs, alpha_ep) == _answer(missing, "no-such-ep")
    seen = alpha.get(f"/api/v1/endpoints/{alpha_ep}")
    assert seen.status_code == 200, seen.text
    assert [d["name"] for d in seen.json()["deployments"]] == ["e"]
    listed = beta.get("/api/v1/endpoints").json()["data"]
    assert alpha_ep not in {e["name"] for e in listed}
    assert alpha_ep not in {m["id"] for m in beta.get("/v1/models").json()["data"]}


def test_another_projects_endpoint_is_no_model_for_batches(
        beta_openai: OpenAI, beta_anthropic: anthropic.Anthropic, alpha_ep: str) -> None:
    for model in (alpha_ep, f"{alpha_ep}/e"):
        line = jsonl(chat_line("r1", model=model))
        upload_ = beta_openai.files.create(file=("in.jsonl", line), purpose="batch")
        batch = beta_openai.batches.create(input_file_id=upload_.id, completion_window="24h",
                                           endpoint="/v1/chat/completions")
        while batch.status not in ("completed", "failed", "expired", "cancelled"):
            time.sleep(0.1)
            batch = beta_openai.batches.retrieve(batch.id)
        assert batch.status == "failed", batch
        assert batch.errors is not None and batch.errors.data, batch
        assert [(e.code, e.line) for e in batch.errors.data] == [("model_not_found", 1)]
        assert alpha_ep not in (batch.model or "")
        assert_no_leak(batch.to_json().encode(), "a batch read through the SDK")
    results = _anthropic_results(beta_anthropic, [alpha_ep, "no-such-model"])
    assert results[0] == results[1] and results[0][0] == "errored", results


def _anthropic_results(client: anthropic.Anthropic,
                       models: list[str]) -> list[tuple[str, str | None, str]]:
    """Per model: the result type, error type and message (the model named `<model>`)."""
    requests: Any = [{"custom_id": f"r{i}", "params": {
        "model": model, "max_tokens": 8, "messages": [{"role": "user", "content": "hi"}]}}
        for i, model in enumerate(models)]
    batch = client.messages.batches.create(requests=requests)
    while client.messages.batches.retrieve(batch.id).processing_status != "ended":
        time.sleep(0.1)
    found: dict[str, tuple[str, str | None, str]] = {}
    for item in client.messages.batches.results(batch.id):
        error = getattr(item.result, "error", None)
        inner = error.error if error is not None else None
        model = models[int(item.custom_id[1:])]
        message = inner.message.replace(model, "<model>") if inner is not None else ""
        found[item.custom_id] = (item.result.type, inner.type if inner else None, message)
    return [found[f"r{i}"] for i in range(len(models))]


@pytest.mark.parametrize(("method", "path", "body"), [
    ("PATCH", "/api/v1/endpoints/shared", {"default_deployment": "chat"}),
    ("DELETE", "/api/v1/endpoints/shared", None),
    ("POST", "/api/v1/endpoints/shared/deployments", {"name": "more", "backend": "echo"}),
])
def test_config_endpoints_cannot_be_changed_over_rest(admin: httpx.Client, method: str,
                                                      path: str,
                                                      body: dict[str, Any] | None) -> None:
    answer = admin.request(method, path, json=body)
    assert answer.status_code == 403, answer.text
    assert openai_error(answer)["code"] == "permission_denied"
    shared = admin.get("/api/v1/endpoints/shared").json()
    assert shared["default_deployment"] == "py"
    assert sorted(d["name"] for d in shared["deployments"]) == ["chat", "py"]


@pytest.mark.parametrize("workers", [{"min": 4, "max": 100_000}, {"min": 100},
                                     {"min": 0, "max": 17}, {"max": 10**18}])
def test_worker_pools_are_capped(admin: httpx.Client, alpha_ep: str,
                                 workers: dict[str, int]) -> None:
    deployment = {"name": "big", "backend": "echo", "workers": workers}
    created = admin.post("/api/v1/endpoints", json={"name": "big-ep",
                                                    "deployments": [deployment]})
    _delete_if_created(admin, created, "big-ep")
    added = admin.post(f"/api/v1/endpoints/{alpha_ep}/deployments", json=deployment)
    for answer in (created, added):
        assert answer.status_code == 400, answer.text
        error = openai_error(answer)
        assert "workers.max" in (error["param"] or "") + error["message"], error
    _absent(admin, "big-ep")
    names = [d["name"] for d in admin.get(f"/api/v1/endpoints/{alpha_ep}").json()["deployments"]]
    assert names == ["e"]


# -- request size ----------------------------------------------------------------------

def _huge_body(prefix: bytes, suffix: bytes, total: int = 300 * MIB) -> Iterator[bytes]:
    """A JSON document of `total` bytes, produced a MiB at a time, never held whole."""
    yield prefix
    block = b"a" * MIB
    for _ in range(total // MIB):
        yield block
    yield suffix


@pytest.mark.parametrize(("path", "prefix", "suffix"), [
    ("/v1/batches", b'{"endpoint": "/v1/chat/completions", "input_file_id": "', b'"}'),
    ("/v1/messages/batches",
     b'{"requests": [{"custom_id": "a", "params": {"model": "echo", "max_tokens": 1, '
     b'"messages": [{"role": "user", "content": "', b'"}]}}]}'),
])
def test_a_huge_json_body_is_refused_with_413(alpha: httpx.Client, path: str, prefix: bytes,
                                              suffix: bytes) -> None:
    answer = alpha.post(path, content=_huge_body(prefix, suffix),
                        headers={"content-type": "application/json"}, timeout=120)
    assert answer.status_code == 413, answer.text[:500]
    body = answer.json()
    if path.startswith("/v1/messages"):
        assert body["type"] == "error" and body["error"]["type"] == "request_too_large", body
    else:
        assert openai_error(answer)["code"] == "request_too_large"


# -- open mode -------------------------------------------------------------------------

def test_open_mode_refuses_to_listen_beyond_loopback(tmp_path: Path) -> None:
    cmd = [sys.executable, "-m", "batchery", "serve", "--host", "0.0.0.0", "--port",
           "0", "--data-dir", str(tmp_path / "data"), "--workers", "0"]
    process = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               env=server_env())
    try:
        output, _ = process.communicate(timeout=30)
    except subprocess.TimeoutExpired:
        process.kill()
        process.communicate()
        pytest.fail("`serve --host 0.0.0.0` without a keys file kept running")
    text = " ".join(output.decode(errors="replace").split())
    assert process.returncode not in (0, None), text
    assert "--insecure" in text and "--keys-file" in text, text
    assert "Traceback" not in text, text


# -- roles -----------------------------------------------------------------------------

@pytest.mark.parametrize(("method", "path", "body"), [
    ("POST", "/api/v1/endpoints", {"name": "mine", "deployments": [
        {"name": "e", "backend": "echo"}]}),
    ("POST", "/api/v1/keys", {"project": "beta", "role": "admin"}),
    ("GET", "/api/v1/keys", None),
    ("DELETE", "/api/v1/keys/admin", None),
    ("PATCH", "/api/v1/endpoints/shared", {"default_deployment": "chat"}),
    ("DELETE", "/api/v1/endpoints/shared", None),
    ("POST", "/api/v1/endpoints/shared/deployments", {"name": "e", "backend": "echo"}),
])
def test_members_are_refused_every_admin_route(beta: httpx.Client, admin: httpx.Client,
                                               method: str, path: str,
                                               body: dict[str, Any] | None) -> None:
    answer = beta.request(method, path, json=body)
    assert answer.status_code == 403, answer.text
    error = openai_error(answer)
    assert error["code"] == "permission_denied", error
    keys = admin.get("/api/v1/keys")
    assert keys.status_code == 200, keys.text
    assert [(k["name"], k["role"], k["revoked_at"]) for k in keys.json()["data"]] == [
        ("alpha", "member", None), ("beta", "member", None), ("admin", "admin", None)]
    _absent(admin, "mine")


# -- cross-project reads ---------------------------------------------------------------

@dataclass
class Owned:
    """One object of each kind: alpha's, and beta's made before and after it."""

    file: str
    batch: str
    message_batch: str
    job: str


def _make_file(client: httpx.Client, tag: str) -> str:
    return upload(client, jsonl(chat_line(tag)), filename=f"{tag}.jsonl")


def _make_batch(client: httpx.Client, tag: str) -> str:
    batch_id: str = create_batch(client, jsonl(chat_line(tag)))["id"]
    return batch_id


def _make_message_batch(client: httpx.Client, tag: str) -> str:
    answer = client.post("/v1/messages/batches", json={"requests": [{
        "custom_id": tag, "params": {"model": "echo", "max_tokens": 8,
                                     "messages": [{"role": "user", "content": "hi"}]}}]})
    assert answer.status_code == 200, answer.text
    batch_id: str = answer.json()["id"]
    return batch_id


def _make_job(client: httpx.Client, tag: str) -> str:
    answer = client.post(SHARED_JOBS, json={"item_list": {"items": [tag], "batch_size": 1}})
    assert answer.status_code == 200, answer.text
    job_id: str = answer.json()["id"]
    return job_id


def _make(client: httpx.Client, tag: str) -> Owned:
    return Owned(file=_make_file(client, tag), batch=_make_batch(client, tag),
                 message_batch=_make_message_batch(client, tag), job=_make_job(client, tag))


@pytest.fixture(scope="module")
def owned(alpha: httpx.Client, beta: httpx.Client) -> dict[str, Owned]:
    """Beta's older objects, alpha's, then beta's newer ones, all finished."""
    made = {"beta-old": _make(beta, "old"), "alpha": _make(alpha, "a"),
            "beta-new": _make(beta, "new")}
    for who, objects in made.items():
        client = alpha if who == "alpha" else beta
        assert wait_batch(client, objects.batch)["status"] == "completed"
        wait_message_batch(client, objects.message_batch)
        assert wait_job(client, objects.job)["status"] == "succeeded"
    return made


_OTHERS_OBJECTS = [
    ("GET", "/v1/files/{file}"), ("GET", "/v1/files/{file}/content"),
    ("DELETE", "/v1/files/{file}"),
    ("GET", "/v1/batches/{batch}"), ("POST", "/v1/batches/{batch}/cancel"),
    ("GET", "/v1/messages/batches/{message_batch}"),
    ("POST", "/v1/messages/batches/{message_batch}/cancel"),
    ("GET", "/v1/messages/batches/{message_batch}/results"),
    ("DELETE", "/v1/messages/batches/{message_batch}"),
    ("GET", "/api/v1/jobs/{job}"), ("DELETE", "/api/v1/jobs/{job}"),
    ("GET", "/api/v1/jobs/{job}/logs"), ("GET", "/api/v1/jobs/{job}/results"),
    ("GET", "/api/v1/jobs/{job}/workers"), ("GET", "/api/v1/jobs/{job}/failed_batches"),
]
_GARBAGE = Owned(file="file-" + "x" * 22, batch="batch_" + "0" * 32,
                 message_batch="msgbatch_" + "x" * 24, job="job-" + "0" * 20)


def _fill(template: str, objects: Owned) -> str:
    return template.format(**vars(objects))


def _error_text(answer: httpx.Response, object_id: str) -> str:
    body = answer.json()
    error = body["error"]
    return str(error.get("message", "")).replace(object_id, "<id>")


@pytest.mark.parametrize(("method", "template"), _OTHERS_OBJECTS)
def test_another_projects_objects_are_not_found(alpha: httpx.Client, beta: httpx.Client,
                                                owned: dict[str, Owned], method: str,
                                                template: str) -> None:
    theirs = beta.request(method, _fill(template, owned["alpha"]))
    missing = beta.request(method, _fill(template, _GARBAGE))
    assert theirs.status_code == missing.status_code == 404, (theirs.text, missing.text)
    kind = re.search(r"\{(\w+)\}", template)
    assert kind is not None
    assert _error_text(theirs, getattr(owned["alpha"], kind.group(1))) == \
        _error_text(missing, getattr(_GARBAGE, kind.group(1)))
    if template.startswith("/v1/messages"):
        assert theirs.json()["error"]["type"] == "not_found_error"
    _alpha_objects_untouched(alpha, owned["alpha"])


def _alpha_objects_untouched(alpha: httpx.Client, objects: Owned) -> None:
    assert alpha.get(f"/v1/files/{objects.file}").status_code == 200
    assert alpha.get(f"/v1/batches/{objects.batch}").json()["status"] == "completed"
    message_batch = alpha.get(f"/v1/messages/batches/{objects.message_batch}").json()
    assert message_batch["cancel_initiated_at"] is None, message_batch
    assert alpha.get(f"/api/v1/jobs/{objects.job}").json()["status"] == "succeeded"


_LISTINGS = [("/v1/files", "after", "file"), ("/v1/batches", "after", "batch"),
             ("/v1/messages/batches", "after_id", "message_batch"),
             ("/v1/messages/batches", "before_id", "message_batch"),
             ("/api/v1/jobs", "after", "job")]


@pytest.mark.parametrize(("path", "cursor", "kind"), _LISTINGS)
def test_listings_and_cursors_reveal_nothing_of_another_project(
        beta: httpx.Client, owned: dict[str, Owned], path: str, cursor: str,
        kind: str) -> None:
    theirs, old, new = (getattr(owned[w], kind) for w in ("alpha", "beta-old", "beta-new"))
    listed = [item["id"] for item in beta.get(path).json()["data"]]
    assert theirs not in listed and old in listed and new in listed, listed
    pages = []
    for anchor in (theirs, getattr(_GARBAGE, kind), "garbage"):
        answer = beta.get(path, params={cursor: anchor, "limit": 5})
        assert answer.status_code in (200, 400, 404), answer.text
        body = answer.json()
        pages.append((answer.status_code, [i["id"] for i in body.get("data", [])],
                      body.get("has_more")) if answer.status_code == 200
                     else (answer.status_code, _error_text(answer, anchor)))
    assert pages[0] == pages[1] == pages[2], pages
