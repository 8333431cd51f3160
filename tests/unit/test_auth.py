"""The keys file and the `KeyRing`: hashes at rest, roles, revocation, hot reload."""

from __future__ import annotations

import os
import stat
import threading
from pathlib import Path

import pytest
import yaml

from batchery.model.exceptions import ConfigError, Conflict, InvalidRequest, NotFound, Unauthorized
from batchery.security import auth, trust
from batchery.security.auth import KeyRing
from batchery.security.trust import Role


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_keys_resolve_to_principals_and_only_hashes_are_stored(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    admin, admin_key = auth.add_key(path, "ops", role="admin", name="root")
    member, member_key = auth.add_key(path, "team-a")
    text = path.read_text()
    assert admin_key not in text and member_key not in text
    assert auth.hash_key(admin_key) in text and auth.hash_key(member_key) in text
    assert member.name == "team-a-1" and member.role is Role.MEMBER
    assert admin.created_at is not None and admin.revoked_at is None
    ring = KeyRing.load(path)
    assert ring.principal_for(admin_key) == trust.Principal(project="ops", role=Role.ADMIN,
                                                            key_name="root")
    assert ring.principal_for(member_key).role is Role.MEMBER
    assert ring.project_for(member_key) == "team-a"
    with pytest.raises(Unauthorized, match="Incorrect API key"):
        ring.principal_for("sk-batchery-not-a-key")
    with pytest.raises(Unauthorized, match="didn't provide"):
        ring.principal_for(None)


def test_open_mode_is_the_local_admin() -> None:
    ring = KeyRing.load(None)
    assert ring.open
    assert ring.principal_for(None) is trust.OPEN_PRINCIPAL
    assert ring.project_for("anything") == auth.DEFAULT_PROJECT == trust.DEFAULT_PROJECT


def test_default_names_are_unique_and_names_clash(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    names = [auth.add_key(path, "team-a")[0].name for _ in range(3)]
    assert names == ["team-a-1", "team-a-2", "team-a-3"]
    with pytest.raises(Conflict, match="'team-a-2' already exists"):
        auth.add_key(path, "team-a", name="team-a-2")
    with pytest.raises(InvalidRequest) as info:
        auth.add_key(path, "team a")
    assert info.value.param == "project"
    with pytest.raises(InvalidRequest) as info:
        auth.add_key(path, "team-a", role="owner")
    assert info.value.param == "role"
    assert len(auth.list_keys(path)) == 3


def test_file_is_written_atomically_with_mode_0600(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    auth.add_key(path, "team-a")
    first_inode = path.stat().st_ino
    auth.add_key(path, "team-a")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert path.stat().st_ino != first_inode  # replaced, not rewritten in place
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keys.yaml", "keys.yaml.lock"]


def test_concurrent_writers_lose_no_key(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    keys: list[str] = []

    def create() -> None:
        for _ in range(10):
            keys.append(auth.add_key(path, "team-a")[1])

    threads = [threading.Thread(target=create) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    ring = KeyRing.load(path)
    assert len(auth.list_keys(path)) == 40
    assert {ring.project_for(k) for k in keys} == {"team-a"}


def test_revoke_keeps_the_first_time_and_refuses_unknown_names(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    _, key = auth.add_key(path, "team-a", name="ci")
    first = auth.revoke_key(path, "ci")
    assert first.revoked_at is not None
    data = yaml.safe_load(path.read_text())
    data["keys"][0]["revoked_at"] -= 100  # as if revoked earlier
    path.write_text(yaml.safe_dump(data))
    assert auth.revoke_key(path, "ci").revoked_at == first.revoked_at - 100
    with pytest.raises(NotFound, match="'nope'"):
        auth.revoke_key(path, "nope")
    with pytest.raises(Unauthorized, match="was revoked"):
        KeyRing.load(path).principal_for(key)


def test_the_last_admin_may_be_kept(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    auth.add_key(path, "ops", role="admin", name="a1")
    auth.add_key(path, "ops", role="admin", name="a2")
    auth.revoke_key(path, "a1", keep_an_admin=True)
    with pytest.raises(Conflict, match="last active admin"):
        auth.revoke_key(path, "a2", keep_an_admin=True)
    assert auth.revoke_key(path, "a2").revoked_at is not None  # the operator may


def test_ring_reloads_changes_at_most_once_a_period(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    _, old = auth.add_key(path, "team-a", name="old")
    clock = Clock()
    ring = KeyRing(path, clock=clock)
    _, new = auth.add_key(path, "team-b")
    with pytest.raises(Unauthorized):
        ring.principal_for(new)  # not looked at yet: the period has not passed
    clock.now += auth.RELOAD_CHECK_S
    assert ring.project_for(new) == "team-b"
    auth.revoke_key(path, "old")
    clock.now += auth.RELOAD_CHECK_S
    with pytest.raises(Unauthorized, match="was revoked"):
        ring.principal_for(old)


def test_ring_keeps_the_last_good_keys_when_the_file_turns_bad(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    _, key = auth.add_key(path, "team-a")
    clock = Clock()
    ring = KeyRing(path, clock=clock)
    path.write_text("keys: [{project: team-a}]\n")
    clock.now += auth.RELOAD_CHECK_S
    assert ring.project_for(key) == "team-a"
    os.unlink(path)
    clock.now += auth.RELOAD_CHECK_S
    assert ring.project_for(key) == "team-a"


def test_older_entries_are_members_named_after_their_project(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    a, b, c = "sk-a-key-000000", "sk-b-key-000000", "sk-c-key-000000"
    path.write_text(yaml.safe_dump({"keys": [
        {"project": "team-a", "sha256": auth.hash_key(a)},
        {"project": "team-a", "name": "team-a", "sha256": auth.hash_key(b)},
        {"project": "team-b", "name": "ci", "sha256": auth.hash_key(c).upper()},
    ]}))
    entries = auth.list_keys(path)
    assert [e.name for e in entries] == ["team-a", "team-a-2", "ci"]
    assert {e.role for e in entries} == {Role.MEMBER}
    assert {e.created_at for e in entries} == {None}
    ring = KeyRing.load(path)
    assert ring.principal_for(b).key_name == "team-a-2"
    assert ring.project_for(c) == "team-b"
    auth.revoke_key(path, "team-a-2")  # names are written back, unique
    assert [e.name for e in auth.list_keys(path)] == ["team-a", "team-a-2", "ci"]
    assert auth.list_keys(path)[1].revoked_at is not None


@pytest.mark.parametrize(("text", "message"), [
    ("keys: {}\n", "'keys' list"),
    ("keys: [[1]]\n", r"keys\[0\]: expected a mapping"),
    ("keys:\n  - {name: ci, sha256: " + "a" * 64 + "}\n", r"keys\[0\] \(name 'ci'\): project"),
    ("keys:\n  - {project: p, sha256: abc}\n", r"keys\[0\]: sha256: expected 64"),
    ("keys:\n  - {project: p, sha256: " + "a" * 64 + ", role: owner}\n", "role: expected"),
    ("keys:\n  - {project: p, sha256: " + "a" * 64 + ", revoked_at: soon}\n",
     "revoked_at: expected unix seconds"),
    ("keys:\n  - {project: p, sha256: " + "a" * 64 + ", revoked: 1}\n",
     "revoked: unknown field"),
    ("keys:\n  - {project: p, sha256: " + "a" * 64 + "}\n  - {project: q, sha256: "
     + "A" * 64 + "}\n", r"keys\[1\] \(name 'q'\): sha256: the same key as keys\[0\]"),
    ("keys: [\n", "not valid YAML"),
])
def test_malformed_files_name_the_entry_and_field(tmp_path: Path, text: str,
                                                  message: str) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        KeyRing.load(path)


def test_a_missing_file_says_how_to_create_one(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="batchery keys create"):
        KeyRing.load(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="does not exist"):
        auth.revoke_key(tmp_path / "nope.yaml", "ci")
