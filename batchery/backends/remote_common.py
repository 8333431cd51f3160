"""What the provider connectors share: an httpx client with credentials, and error mapping."""

from __future__ import annotations

import os
from typing import Any

import httpx

from batchery.model.exceptions import BackendError, ConfigError


def api_key(api_key_env: str | None, key: str | None) -> str | None:
    if api_key_env:
        if api_key_env not in os.environ:
            raise ConfigError(f"options.api_key_env: the environment variable {api_key_env} "
                              f"is not set; export it where Batchery runs, or give api_key")
        return os.environ[api_key_env]
    return key


def checked(response: httpx.Response) -> Any:
    """The JSON of a successful answer; anything else becomes a BackendError."""
    if response.is_success:
        try:
            return response.json()
        except ValueError:
            raise BackendError(f"{response.request.method} {response.request.url.path}: the "
                               "provider answered with a body that is not JSON") from None
    status = response.status_code
    raise BackendError(f"{response.request.method} {response.request.url.path}: the provider "
                       f"answered {status}: {response.text[:500]}",
                       permanent=400 <= status < 500 and status not in (408, 409, 429))


def call(client: httpx.Client, method: str, url: str, **kwargs: Any) -> Any:
    try:
        return checked(client.request(method, url, **kwargs))
    except httpx.HTTPError as exc:
        raise BackendError(f"{method} {url}: {type(exc).__name__}: {exc}") from exc
