"""API keys: each belongs to a project. Only SHA-256 hashes of keys are ever stored."""

from __future__ import annotations

import hashlib
import secrets
from pathlib import Path

import yaml

from batchery.exceptions import ConfigError, Unauthorized

DEFAULT_PROJECT = "default"


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def new_key() -> str:
    return "sk-batchery-" + secrets.token_urlsafe(24)


class KeyRing:
    """Resolves a presented key to its project. With no keys file, any key is accepted
    (the SDKs refuse to run without one) and everything lives in the default project."""

    def __init__(self, hashes: dict[str, str] | None) -> None:
        self._hashes = hashes

    @classmethod
    def load(cls, path: Path | None) -> KeyRing:
        if path is None:
            return cls(None)
        if not path.exists():
            raise ConfigError(f"keys file {path} does not exist: create it with "
                              f"`batchery keys create --project NAME --keys-file {path}`")
        return cls(read_keys_file(path))

    @property
    def open(self) -> bool:
        return self._hashes is None

    def project_for(self, key: str | None) -> str:
        if self._hashes is None:
            return DEFAULT_PROJECT
        if not key:
            raise Unauthorized("You didn't provide an API key. Provide it in the "
                               "Authorization header as 'Bearer YOUR_KEY'.")
        project = self._hashes.get(hash_key(key))
        if project is None:
            raise Unauthorized(f"Incorrect API key provided: {_redact(key)}.")
        return project


def _redact(key: str) -> str:
    return key[:6] + "*" * 8 + key[-4:] if len(key) > 12 else "*" * len(key)


def read_keys_file(path: Path) -> dict[str, str]:
    try:
        data = yaml.safe_load(path.read_text()) if path.exists() else {"keys": []}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from exc
    entries = (data or {}).get("keys", [])
    if not isinstance(entries, list):
        raise ConfigError(f"{path}: 'keys' must be a list")
    hashes: dict[str, str] = {}
    for i, entry in enumerate(entries):
        if not isinstance(entry, dict) or not isinstance(entry.get("sha256"), str) \
                or not isinstance(entry.get("project"), str):
            raise ConfigError(f"{path}: keys[{i}]: expected 'sha256' and 'project' strings")
        hashes[entry["sha256"]] = entry["project"]
    return hashes


def add_key(path: Path, project: str, name: str | None = None) -> str:
    """Create a key for `project`, append its hash to the keys file, and return the key."""
    key = new_key()
    data = yaml.safe_load(path.read_text()) if path.exists() else None
    data = data or {"keys": []}
    data.setdefault("keys", []).append({"project": project, "name": name or project,
                                        "sha256": hash_key(key)})
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return key
