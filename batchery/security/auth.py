"""API keys: each has a name, a project and a role. Only SHA-256 hashes of keys are stored.

The keys file is YAML, a `keys:` list of entries (`name`, `project`, `role`, `sha256`,
`created_at`, `revoked_at`). `batchery keys …` and `/api/v1/keys` write it under a lock,
atomically; a running server notices a change within a second or two (`KeyRing`).
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import yaml

from batchery.model.exceptions import ConfigError, Conflict, InvalidRequest, NotFound, Unauthorized
from batchery.security import trust
from batchery.security.trust import Principal, Role

log = logging.getLogger("batchery.security.auth")

#: Kept for older callers: the project of every object in open mode.
DEFAULT_PROJECT = trust.DEFAULT_PROJECT
#: Names of projects and keys: what is safe in a path, a log line and a URL.
NAME_PATTERN = re.compile(r"[A-Za-z0-9._-]{1,64}")
#: How often a `KeyRing` looks at its file, in seconds.
RELOAD_CHECK_S = 1.0
_FIELDS = ("name", "project", "role", "sha256", "created_at", "revoked_at")
_SHA256 = re.compile(r"[0-9a-fA-F]{64}")
_HEADER = ("# Batchery API keys. Only SHA-256 hashes of keys are stored here.\n"
           "# Managed by `batchery keys` and /api/v1/keys; a running server reloads it.\n")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "sk-batchery-" + secrets.token_urlsafe(24)


def iso_time(ts: int | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat(timespec="seconds")


@dataclass(frozen=True, kw_only=True, slots=True)
class KeyEntry:
    """One key of the keys file: never the key itself, only its hash."""

    name: str
    project: str
    role: Role
    sha256: str
    created_at: int | None = None
    revoked_at: int | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None

    def public(self) -> dict[str, Any]:
        """What may be shown to an admin: everything but the hash."""
        return {"name": self.name, "project": self.project, "role": self.role.value,
                "created_at": self.created_at, "revoked_at": self.revoked_at}

    def stored(self) -> dict[str, Any]:
        return {**self.public(), "sha256": self.sha256}


# -- reading ---------------------------------------------------------------------------

def check_name(value: Any, param: str) -> str:
    """A project or key name: letters, digits, `._-`, 1 to 64 characters."""
    if not isinstance(value, str) or not NAME_PATTERN.fullmatch(value):
        raise InvalidRequest(f"'{param}' must be 1 to 64 letters, digits, '.', '_' or '-'; "
                             f"got {value!r}.", param=param)
    return value


def parse_role(value: Any, param: str = "role") -> Role:
    try:
        return Role(value)
    except ValueError:
        raise InvalidRequest(f"'{param}' must be 'admin' or 'member'; got {value!r}.",
                             param=param) from None


def read_keys(path: Path) -> list[KeyEntry]:
    """The entries of the keys file; ConfigError, naming the entry and field, if malformed."""
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"keys file {path} does not exist: create it with "
                          f"`batchery keys create --project NAME --role admin "
                          f"--keys-file {path}`") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"keys file {path}: cannot read it: {exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"keys file {path}: not valid YAML: {exc}") from exc
    if data is None:
        return []
    if not isinstance(data, Mapping) or not isinstance(data.get("keys", []), list):
        raise ConfigError(f"keys file {path}: expected a mapping with a 'keys' list")
    raw: list[Any] = data.get("keys") or []
    entries = [_parse_entry(item, f"keys file {path}: keys[{i}]") for i, item in enumerate(raw)]
    _check_unique_hashes(entries, path)
    return _unique_names(entries)


def _parse_entry(item: Any, where: str) -> KeyEntry:
    if not isinstance(item, Mapping):
        raise ConfigError(f"{where}: expected a mapping of {', '.join(_FIELDS)}")
    if isinstance(item.get("name"), str) and item["name"]:
        where = f"{where} (name '{item['name']}')"
    unknown = sorted(str(k) for k in item if k not in _FIELDS)
    if unknown:
        raise ConfigError(f"{where}: {unknown[0]}: unknown field (known: {', '.join(_FIELDS)})")
    project = _text(item, "project", where, None)
    sha256 = _text(item, "sha256", where, None)
    if not _SHA256.fullmatch(sha256):
        raise ConfigError(f"{where}: sha256: expected 64 hexadecimal digits "
                          f"(`printf %s \"$KEY\" | sha256sum`)")
    role = item.get("role", Role.MEMBER.value)
    if role not in (Role.ADMIN.value, Role.MEMBER.value):
        raise ConfigError(f"{where}: role: expected 'admin' or 'member', got {role!r}")
    return KeyEntry(name=_text(item, "name", where, project), project=project, role=Role(role),
                    sha256=sha256.lower(), created_at=_time(item, "created_at", where),
                    revoked_at=_time(item, "revoked_at", where))


def _text(item: Mapping[str, Any], key: str, where: str, default: str | None) -> str:
    value = item.get(key, default)
    if not isinstance(value, str) or not value.strip():
        raise ConfigError(f"{where}: {key}: expected a non-empty string")
    return value


def _time(item: Mapping[str, Any], key: str, where: str) -> int | None:
    value = item.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigError(f"{where}: {key}: expected unix seconds or null")
    return value


def _check_unique_hashes(entries: list[KeyEntry], path: Path) -> None:
    seen: dict[str, int] = {}
    for i, entry in enumerate(entries):
        if entry.sha256 in seen:
            raise ConfigError(f"keys file {path}: keys[{i}] (name '{entry.name}'): sha256: "
                              f"the same key as keys[{seen[entry.sha256]}]")
        seen[entry.sha256] = i


def _unique_names(entries: list[KeyEntry]) -> list[KeyEntry]:
    """Older files named keys after their project; later clashing names get a suffix."""
    taken = {e.name for e in entries}
    seen: set[str] = set()
    out: list[KeyEntry] = []
    for entry in entries:
        if entry.name in seen:
            entry = replace(entry, name=_free_name(entry.name, taken))
            taken.add(entry.name)
        seen.add(entry.name)
        out.append(entry)
    return out


def _free_name(base: str, taken: set[str], start: int = 2) -> str:
    n = start
    while f"{base}-{n}" in taken:
        n += 1
    return f"{base}-{n}"


# -- the ring the server asks ----------------------------------------------------------

def _stamp(path: Path) -> tuple[int, int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_mtime_ns, st.st_size, st.st_ino)


class KeyRing:
    """Resolves a presented key to a `Principal`. With no keys file (open mode) any key is
    accepted (the SDKs refuse to run without one) and the caller is the local admin.

    The file is looked at again at most once every `RELOAD_CHECK_S` seconds and re-read
    when it changed, so keys created or revoked take effect without a restart. A file that
    turns bad (a hand edit gone wrong) is logged and the last good keys stay in force."""

    def __init__(self, path: Path | None, *, check_every_s: float = RELOAD_CHECK_S,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.path = path
        self._check_every_s = check_every_s
        self._clock = clock
        self._lock = threading.Lock()
        self._stamp = _stamp(path) if path is not None else None
        self._checked_at = clock()
        self._by_hash: dict[str, KeyEntry] = {}
        self._entries: list[KeyEntry] = []
        if path is not None:
            self._set(read_keys(path))

    @classmethod
    def load(cls, path: Path | None) -> KeyRing:
        """The ring of `path` (None: open mode); ConfigError if the file is missing or bad."""
        return cls(path)

    @property
    def open(self) -> bool:
        return self.path is None

    def _set(self, entries: list[KeyEntry]) -> None:
        self._entries = entries
        self._by_hash = {e.sha256: e for e in entries}

    def refresh(self, *, force: bool = False) -> None:
        """Re-read the file if it changed; unless `force`, look at most once a period."""
        if self.path is None:
            return
        with self._lock:
            now = self._clock()
            if not force and now - self._checked_at < self._check_every_s:
                return
            self._checked_at = now
            stamp = _stamp(self.path)
            if stamp == self._stamp and not force:
                return
            self._stamp = stamp
            try:
                entries = read_keys(self.path)
            except ConfigError as exc:
                log.error("keeping the keys read before: %s", exc)
                return
            self._set(entries)
            log.info("keys file %s reloaded: %d key(s), %d active", self.path, len(entries),
                     sum(e.active for e in entries))

    def entries(self) -> list[KeyEntry]:
        self.refresh()
        return list(self._entries)

    def principal_for(self, key: str | None) -> Principal:
        if self.path is None:
            return trust.OPEN_PRINCIPAL
        if not key:
            raise Unauthorized("You didn't provide an API key. Provide it in the "
                               "Authorization header as 'Bearer YOUR_KEY'.")
        self.refresh()
        # A lookup by the key's hash: the comparison never sees the stored hashes one by one.
        entry = self._by_hash.get(hash_key(key))
        if entry is None:
            raise Unauthorized(f"Incorrect API key provided: {_redact(key)}.")
        if not entry.active:
            raise Unauthorized(f"The API key {_redact(key)} was revoked at "
                               f"{iso_time(entry.revoked_at)}; ask an admin for a new one.")
        return Principal(project=entry.project, role=entry.role, key_name=entry.name)

    def project_for(self, key: str | None) -> str:
        return self.principal_for(key).project


def _redact(key: str) -> str:
    return key[:6] + "*" * 8 + key[-4:] if len(key) > 12 else "*" * len(key)


# -- writing ---------------------------------------------------------------------------

@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    """Holds an exclusive lock on `<file>.lock`, so that writers take turns."""
    fd = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def _write(path: Path, entries: list[KeyEntry]) -> None:
    """Replace the file atomically: readers see the old file or the new one, never half."""
    text = _HEADER + yaml.safe_dump({"keys": [e.stored() for e in entries]}, sort_keys=False)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:  # mkstemp made it 0600
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise


def add_key(path: Path, project: str, *, role: Role | str = Role.MEMBER,
            name: str | None = None) -> tuple[KeyEntry, str]:
    """Create a key, store its hash in the keys file (created if need be), and return the
    entry and the key: the only time the key exists outside the caller's hands."""
    check_name(project, "project")
    role = parse_role(role)
    if name is not None:
        check_name(name, "name")
    key = new_key()
    path.parent.mkdir(parents=True, exist_ok=True)  # a new keys file may start a new folder
    with _locked(path):
        entries = read_keys(path) if path.exists() else []
        taken = {e.name for e in entries}
        if name in taken:
            raise Conflict(f"A key named '{name}' already exists; choose another name.")
        entry = KeyEntry(name=name or _free_name(project, taken, start=1), project=project,
                         role=role, sha256=hash_key(key), created_at=int(time.time()))
        _write(path, [*entries, entry])
    return entry, key


def list_keys(path: Path) -> list[KeyEntry]:
    return read_keys(path)


def revoke_key(path: Path, name: str, *, keep_an_admin: bool = False) -> KeyEntry:
    """Revoke the key `name`; revoking it again keeps the first `revoked_at`. With
    `keep_an_admin`, refuse (Conflict) to revoke the last active admin key."""
    with _locked(path):
        entries = read_keys(path)
        index = next((i for i, e in enumerate(entries) if e.name == name), None)
        if index is None:
            raise NotFound(f"No key named '{name}'.", param="name")
        entry = entries[index]
        if not entry.active:
            return entry
        admins = [e for e in entries if e.active and e.role is Role.ADMIN]
        if keep_an_admin and admins == [entry]:
            raise Conflict(f"'{name}' is the last active admin key; create another admin "
                           f"key first, or revoke it with `batchery keys revoke`.")
        entries[index] = entry = replace(entry, revoked_at=int(time.time()))
        _write(path, entries)
    return entry
