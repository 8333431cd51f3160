"""API keys end to end: `batchery keys` and `/api/v1/keys` against a running server that
picks up changes to its keys file without a restart."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import Server, start_server

#: How long a change of the keys file may take to reach a running server.
TAKES_EFFECT_S = 5.0


def batchery(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "batchery", *args], capture_output=True,
                          text=True, timeout=60, env=env)


def create_key(keys: Path, project: str, *extra: str) -> str:
    result = batchery("keys", "create", "--project", project, "--keys-file", str(keys), *extra)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


@dataclass
class Shared:
    server: Server
    keys: Path
    admin: str

    def get(self, path: str, key: str) -> httpx.Response:
        return httpx.get(self.server.base_url + path, headers=_bearer(key))

    def post(self, path: str, key: str, body: Any) -> httpx.Response:
        return httpx.post(self.server.base_url + path, headers=_bearer(key), json=body)

    def delete(self, path: str, key: str) -> httpx.Response:
        return httpx.delete(self.server.base_url + path, headers=_bearer(key))


def _bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Shared]:
    tmp = tmp_path_factory.mktemp("keys")
    keys = tmp / "keys.yaml"
    admin = create_key(keys, "ops", "--role", "admin", "--name", "root")
    server = start_server(tmp, "--keys-file", str(keys), "--workers", "0")
    yield Shared(server=server, keys=keys, admin=admin)
    server.stop()


def eventually(check: Callable[[], bool]) -> float:
    """Seconds until `check()` held; fails when it never does. The reload period itself
    (`TAKES_EFFECT_S`) is held by tests/unit/test_auth.py, with a clock of its own: a
    deadline here far past it only fails when the change is never seen."""
    start = time.monotonic()
    while not check():
        assert time.monotonic() - start < 12 * TAKES_EFFECT_S, "the change never took effect"
        time.sleep(0.1)
    return time.monotonic() - start


def test_cli_keys_take_effect_on_a_running_server(shared: Shared) -> None:
    key = create_key(shared.keys, "team-a", "--name", "live")
    eventually(lambda: shared.get("/v1/models", key).status_code == 200)
    result = batchery("keys", "revoke", "live", "--keys-file", str(shared.keys))
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("\n") == 1 and "revoked" in result.stdout
    eventually(lambda: shared.get("/v1/models", key).status_code == 401)
    error = shared.get("/v1/models", key).json()["error"]
    assert error["code"] == "invalid_api_key" and "revoked" in error["message"]


def test_members_may_not_manage_keys(shared: Shared) -> None:
    member = create_key(shared.keys, "team-b")
    eventually(lambda: shared.get("/v1/models", member).status_code == 200)
    for response in (shared.get("/api/v1/keys", member),
                     shared.post("/api/v1/keys", member, {"project": "team-b"}),
                     shared.delete("/api/v1/keys/root", member)):
        assert response.status_code == 403
        assert response.json()["error"]["code"] == "permission_denied"
    assert shared.get("/api/v1/keys", "sk-unknown").status_code == 401


def test_admin_creates_lists_and_revokes_over_rest(shared: Shared) -> None:
    created = shared.post("/api/v1/keys", shared.admin,
                          {"project": "team-c", "role": "member", "name": "rest-made"})
    assert created.status_code == 200, created.text
    body = created.json()
    key = body.pop("key")
    assert body["object"] == "api_key" and body["name"] == "rest-made"
    assert body["role"] == "member" and body["project"] == "team-c"
    assert body["revoked_at"] is None and isinstance(body["created_at"], int)
    assert shared.get("/v1/models", key).status_code == 200  # at once on this server
    listing = shared.get("/api/v1/keys", shared.admin)
    assert listing.status_code == 200 and listing.json()["object"] == "list"
    rows = {row["name"]: row for row in listing.json()["data"]}
    assert rows["rest-made"] == body and rows["root"]["role"] == "admin"
    assert "sha256" not in listing.text and key not in listing.text
    assert shared.admin not in listing.text
    assert set(rows["root"]) == {"name", "project", "role", "created_at", "revoked_at",
                                 "object"}
    revoked = shared.delete("/api/v1/keys/rest-made", shared.admin)
    assert revoked.status_code == 200 and isinstance(revoked.json()["revoked_at"], int)
    assert shared.get("/v1/models", key).status_code == 401
    again = shared.delete("/api/v1/keys/rest-made", shared.admin)
    assert again.json()["revoked_at"] == revoked.json()["revoked_at"]
    missing = shared.delete("/api/v1/keys/nope", shared.admin)
    assert missing.status_code == 404


def test_the_last_admin_key_cannot_be_revoked_over_rest(shared: Shared) -> None:
    refused = shared.delete("/api/v1/keys/root", shared.admin)
    assert refused.status_code == 409 and "last active admin" in refused.text
    second = shared.post("/api/v1/keys", shared.admin,
                         {"project": "ops", "role": "admin", "name": "root-2"}).json()
    assert shared.delete("/api/v1/keys/root-2", shared.admin).status_code == 200
    assert shared.get("/api/v1/keys", second["key"]).status_code == 401
    assert shared.get("/api/v1/keys", shared.admin).status_code == 200


@pytest.mark.parametrize(("body", "param"), [
    ({"project": "team-a", "colour": "red"}, "colour"),
    ({"project": "team-a", "role": "owner"}, "role"),
    ({"project": "team a"}, "project"),
    ({"project": "x" * 65}, "project"),
    ({"project": 7}, "project"),
    ({"role": "member"}, "project"),
    ({"project": "team-a", "name": "a/b"}, "name"),
    ({"project": "team-a", "name": ""}, "name"),
])
def test_create_bodies_are_validated(shared: Shared, body: dict[str, Any], param: str) -> None:
    response = shared.post("/api/v1/keys", shared.admin, body)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


def test_a_taken_name_is_a_conflict(shared: Shared) -> None:
    response = shared.post("/api/v1/keys", shared.admin, {"project": "ops", "name": "root"})
    assert response.status_code == 409


def test_open_mode_has_no_keys_to_manage(server_factory: Callable[..., Server]) -> None:
    server = server_factory("--workers", "0")
    for response in (httpx.get(server.base_url + "/api/v1/keys"),
                     httpx.post(server.base_url + "/api/v1/keys", json={"project": "a"}),
                     httpx.delete(server.base_url + "/api/v1/keys/a")):
        assert response.status_code == 409
        assert "--keys-file" in response.json()["error"]["message"]


def test_cli_output_contracts(tmp_path: Path) -> None:
    keys = tmp_path / "keys.yaml"
    created = batchery("keys", "create", "--project", "team-a", "--keys-file", str(keys))
    assert created.returncode == 0
    assert created.stdout.count("\n") == 1 and created.stdout.startswith("sk-batchery-")
    key = created.stdout.strip()
    assert key not in keys.read_text()
    by_env = batchery("keys", "create", "--project", "team-a", "--role", "admin",
                      env={**os.environ, "BATCHERY_KEYS_FILE": str(keys)})
    assert by_env.returncode == 0, by_env.stderr
    listed = batchery("keys", "list", "--keys-file", str(keys))
    assert listed.returncode == 0
    assert "team-a-1" in listed.stdout and "team-a-2" in listed.stdout
    assert "admin" in listed.stdout and key not in listed.stdout
    as_json = json.loads(batchery("keys", "list", "--json", "--keys-file", str(keys)).stdout)
    assert [(k["name"], k["role"]) for k in as_json] == [("team-a-1", "member"),
                                                         ("team-a-2", "admin")]
    assert all("sha256" not in k for k in as_json)


@pytest.mark.parametrize(("args", "message"), [
    (("list",), "does not exist"),
    (("revoke", "ci"), "does not exist"),
    (("revoke", "nope"), "No key named 'nope'"),
    (("create", "--project", "team-a", "--role", "owner"), "'admin' or 'member'"),
    (("create", "--project", "team a"), "'project'"),
    (("create", "--project", "team-a", "--name", "ci"), "already exists"),
])
def test_cli_errors_are_one_line_and_exit_2(tmp_path: Path, args: tuple[str, ...],
                                            message: str) -> None:
    keys = tmp_path / "keys.yaml"
    if args[:2] != ("list",) and args != ("revoke", "ci"):
        create_key(keys, "team-a", "--name", "ci")
    result = batchery("keys", *args, "--keys-file", str(keys))
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def test_a_keys_file_in_a_new_folder_is_created_with_its_folder(tmp_path: Path) -> None:
    keys = tmp_path / "not-yet" / "keys.yaml"
    created = batchery("keys", "create", "--project", "team-a", "--keys-file", str(keys))
    assert created.returncode == 0, created.stderr
    assert created.stdout.startswith("sk-batchery-") and keys.exists()
