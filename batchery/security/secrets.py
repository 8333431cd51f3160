"""Credentials in deployment options are stored encrypted, with a key from the environment.

Any option named in `SECRET_OPTIONS` (at any depth) is sealed with Fernet before the server
records deployments in the database, and opened again only inside a worker building its
backend. No API renders options, so a credential never leaves the server.
"""

from __future__ import annotations

import base64
import hashlib
import os
from typing import Any

from cryptography.fernet import Fernet, InvalidToken

from batchery.model.exceptions import ConfigError

#: Environment variable holding the key (any passphrase, or a Fernet key).
KEY_ENV = "BATCHERY_SECRET_KEY"
#: Option names (compared in lower case) whose values are credentials, headers included.
SECRET_OPTIONS = frozenset({"api_key", "password", "token", "secret", "authorization",
                            "x-api-key", "api-key", "proxy-authorization"})
_SEALED = "$sealed"


class SecretBox:
    def __init__(self, passphrase: str) -> None:
        digest = hashlib.sha256(passphrase.encode()).digest()
        self._fernet = Fernet(base64.urlsafe_b64encode(digest))

    @classmethod
    def from_env(cls) -> SecretBox | None:
        value = os.environ.get(KEY_ENV)
        return cls(value) if value else None

    def seal(self, value: str) -> dict[str, str]:
        return {_SEALED: self._fernet.encrypt(value.encode()).decode()}

    def open(self, sealed: dict[str, str]) -> str:
        try:
            return self._fernet.decrypt(sealed[_SEALED].encode()).decode()
        except InvalidToken:
            raise ConfigError(f"cannot decrypt a stored credential: {KEY_ENV} differs from "
                              "the key the server used") from None


def _secret(name: str, value: Any) -> bool:
    # A templated value ("Bearer ${credential.token}") names a credential, it holds none.
    return name.lower() in SECRET_OPTIONS and isinstance(value, str) and "${" not in value


def has_secrets(options: Any) -> bool:
    if isinstance(options, dict):
        return any(_secret(k, v) or has_secrets(v)
                   for k, v in options.items())
    if isinstance(options, list):
        return any(has_secrets(v) for v in options)
    return False


def seal_options(options: Any, box: SecretBox | None, where: str) -> Any:
    """A copy of `options` with every credential sealed. Without a key, refuses to store."""
    if isinstance(options, dict):
        sealed: dict[str, Any] = {}
        for key, value in options.items():
            if _secret(key, value):
                if box is None:
                    raise ConfigError(f"{where}.{key}: a credential in the config needs "
                                      f"{KEY_ENV} set, to be stored encrypted (or use "
                                      f"{key}_env to name an environment variable)")
                sealed[key] = box.seal(value)
            else:
                sealed[key] = seal_options(value, box, f"{where}.{key}")
        return sealed
    if isinstance(options, list):
        return [seal_options(v, box, f"{where}[{i}]") for i, v in enumerate(options)]
    return options


def open_options(options: Any, box: SecretBox | None) -> Any:
    """A copy of `options` with sealed credentials decrypted, for building a backend."""
    if isinstance(options, dict):
        if set(options) == {_SEALED}:
            if box is None:
                raise ConfigError(f"a deployment has a stored credential but {KEY_ENV} is "
                                  "not set in this worker's environment")
            return box.open(options)
        return {k: open_options(v, box) for k, v in options.items()}
    if isinstance(options, list):
        return [open_options(v, box) for v in options]
    return options
