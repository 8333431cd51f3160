"""The security suite's server: a real `batchery serve` shared by every team of a company.

It runs with a keys file (members of projects `alpha` and `beta`, an admin of project
`ops`), a config file that grants `alpha` one input root and allows no upstream host and no
environment variable, and a secret in its environment. Every response any test receives
through these clients is checked: never a 5xx, and no secret, no key and no key hash.
"""

from __future__ import annotations

import hashlib
import os
import secrets
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anthropic
import httpx
import orjson
import pytest
import yaml
from openai import OpenAI

from tests.conftest import Server, start_server
from tests.helpers import Listener

PREDICTORS = Path(__file__).resolve().parent.parent / "predictors"
#: The server's BATCHERY_SECRET_KEY: it seals stored credentials, and must never leave.
SECRET = "batchery-secret-" + secrets.token_hex(16)
#: The test keys, by who holds them: (key, project, role).
KEYS = {
    "alpha": ("sk-alpha-" + secrets.token_hex(12), "alpha", "member"),
    "beta": ("sk-beta-" + secrets.token_hex(12), "beta", "member"),
    "admin": ("sk-ops-" + secrets.token_hex(12), "ops", "admin"),
}
#: What no response body may hold: the secret, every key, and every key's hash.
NEVER_SENT = (SECRET, *(k for k, _, _ in KEYS.values()),
              *(hashlib.sha256(k.encode()).hexdigest() for k, _, _ in KEYS.values()))
TERMINAL_BATCH = {"completed", "failed", "expired", "cancelled"}


def assert_no_leak(body: bytes, where: str = "a response") -> None:
    for value in NEVER_SENT:
        assert value.encode() not in body, f"{where} carries a secret or a key: {body[:300]!r}"


def _check_response(response: httpx.Response) -> None:
    """Every answer the suite gets: never a server error, never a secret."""
    response.read()
    where = f"{response.request.method} {response.request.url.path}"
    assert response.status_code < 500, f"{where} answered {response.status_code}: " \
                                       f"{response.text[:500]}"
    assert_no_leak(response.content, where)


def write_keys(path: Path) -> Path:
    entries = [{"name": who, "project": project, "role": role,
                "sha256": hashlib.sha256(key.encode()).hexdigest()}
               for who, (key, project, role) in KEYS.items()]
    path.write_text(yaml.safe_dump({"keys": entries}, sort_keys=False))
    return path


def write_config(path: Path, alpha_root: Path) -> Path:
    python = {"predictor": "job_predictors:Doubler", "python_path": [str(PREDICTORS)]}
    document = {
        "security": {"upstream_hosts": [], "allowed_env": []},
        "projects": {"alpha": {"input_roots": [str(alpha_root)]}},
        "deployments": [{"name": "echo", "backend": "echo"}],
        "endpoints": [{"name": "shared", "default_deployment": "py", "deployments": [
            {"name": "py", "backend": "python", "options": python,
             "workers": {"min": 0, "max": 1, "idle_seconds": 30}},
            {"name": "chat", "backend": "echo"}]}],
    }
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


def server_env() -> dict[str, str]:
    """The environment of a test server: none of the developer's BATCHERY_* or OPENAI_*
    settings, and the known secret."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BATCHERY_", "OPENAI_"))}
    env["BATCHERY_SECRET_KEY"] = SECRET
    return env


def launch(root: Path, name: str, *args: str) -> Server:
    """`batchery serve` on a free port, ready to answer."""
    return start_server(root, *args, name=name, base_env=server_env())


@dataclass
class Site:
    """The shared server and what the tests need to know about it."""

    server: Server
    root: Path
    alpha_root: Path
    config: Path
    keys_file: Path
    clients: dict[str, httpx.Client] = field(default_factory=dict)

    def client(self, who: str) -> httpx.Client:
        """An HTTP client holding `who`'s key; every response it gets is checked for leaks."""
        if who not in self.clients:
            self.clients[who] = httpx.Client(
                base_url=self.server.base_url, timeout=60,
                headers={"Authorization": f"Bearer {KEYS[who][0]}"},
                event_hooks={"response": [_check_response]})
        return self.clients[who]


def start_site(root: Path, name: str, *extra: str) -> Site:
    alpha_root = root / "alpha-data"
    alpha_root.mkdir(parents=True, exist_ok=True)
    (alpha_root / "items.jsonl").write_bytes(b'{"x": 1}\n{"x": 2}\n')
    config = write_config(root / f"{name}-config.yaml", alpha_root)
    keys_file = write_keys(root / f"{name}-keys.yaml")
    server = launch(root, name, "--keys-file", str(keys_file), "--config", str(config),
                    *extra)
    return Site(server=server, root=root, alpha_root=alpha_root, config=config,
                keys_file=keys_file)


@pytest.fixture(scope="session")
def site(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    root = tmp_path_factory.mktemp("security")
    found = start_site(root, "shared", "--workers", "1", "--lease-seconds", "5")
    yield found
    for client in found.clients.values():
        client.close()
    found.server.stop()


@pytest.fixture(scope="session")
def alpha(site: Site) -> httpx.Client:
    return site.client("alpha")


@pytest.fixture(scope="session")
def beta(site: Site) -> httpx.Client:
    return site.client("beta")


@pytest.fixture(scope="session")
def admin(site: Site) -> httpx.Client:
    return site.client("admin")


@pytest.fixture
def beta_openai(site: Site) -> Iterator[OpenAI]:
    with OpenAI(base_url=site.server.v1, api_key=KEYS["beta"][0], max_retries=0) as client:
        yield client


@pytest.fixture
def beta_anthropic(site: Site) -> Iterator[anthropic.Anthropic]:
    with anthropic.Anthropic(base_url=site.server.base_url, api_key=KEYS["beta"][0],
                             max_retries=0) as client:
        yield client


# -- helpers ---------------------------------------------------------------------------

def chat_line(custom_id: str, model: str = "echo") -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": "hi"}]}}


def jsonl(*lines: Any) -> bytes:
    return b"".join(orjson.dumps(line) + b"\n" for line in lines)


def upload(client: httpx.Client, content: bytes, *, purpose: str = "batch",
           filename: str = "in.jsonl") -> str:
    response = client.post("/v1/files", data={"purpose": purpose},
                           files={"file": (filename, content, "application/octet-stream")})
    assert response.status_code == 200, response.text
    file_id: str = response.json()["id"]
    return file_id


def create_batch(client: httpx.Client, content: bytes,
                 endpoint: str = "/v1/chat/completions") -> dict[str, Any]:
    response = client.post("/v1/batches", json={
        "input_file_id": upload(client, content), "endpoint": endpoint,
        "completion_window": "24h"})
    assert response.status_code == 200, response.text
    batch: dict[str, Any] = response.json()
    return batch


def wait_batch(client: httpx.Client, batch_id: str, timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/v1/batches/{batch_id}")
        assert response.status_code == 200, response.text
        batch: dict[str, Any] = response.json()
        if batch["status"] in TERMINAL_BATCH:
            return batch
        assert time.monotonic() < deadline, f"batch {batch_id} is still {batch['status']}"
        time.sleep(0.1)


def wait_message_batch(client: httpx.Client, batch_id: str,
                       timeout: float = 60) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/v1/messages/batches/{batch_id}")
        assert response.status_code == 200, response.text
        batch: dict[str, Any] = response.json()
        if batch["processing_status"] == "ended":
            return batch
        assert time.monotonic() < deadline, f"message batch {batch_id} has not ended"
        time.sleep(0.1)


def wait_job(client: httpx.Client, job_id: str, timeout: float = 90) -> dict[str, Any]:
    deadline = time.monotonic() + timeout
    while True:
        response = client.get(f"/api/v1/jobs/{job_id}")
        assert response.status_code == 200, response.text
        job: dict[str, Any] = response.json()
        if job["ended_at"] is not None:
            return job
        assert time.monotonic() < deadline, f"job {job_id} is still {job['status']}"
        time.sleep(0.2)


def openai_error(response: httpx.Response) -> dict[str, Any]:
    """The `error` object of an OpenAI-style error envelope (asserting its shape)."""
    body = response.json()
    assert set(body) == {"error"}, body
    error: dict[str, Any] = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    return error


@pytest.fixture
def listener() -> Iterator[Listener]:
    found = Listener()
    yield found
    found.close()
