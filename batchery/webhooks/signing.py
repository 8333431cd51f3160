"""Signing deliveries the Standard Webhooks way, which OpenAI's webhooks follow.

`webhook-signature` is `v1,<base64 HMAC-SHA256(key, "{id}.{timestamp}.{body}")>`, where the
key is the base64 decoding of the secret after `whsec_`. While an endpoint rotates with the
old secret kept active, each delivery carries both signatures, space-separated, so a receiver
holding either secret verifies it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import os
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Protocol

from standardwebhooks import Webhook

from batchery.security.secrets import KEY_ENV

SECRET_PREFIX = "whsec_"


def signature(secrets: Sequence[str], msg_id: str, timestamp: int, body: str) -> str:
    """The `webhook-signature` value: one `v1,…` per secret, space-separated."""
    when = datetime.fromtimestamp(timestamp, tz=UTC)
    return " ".join(Webhook(secret).sign(msg_id, when, body) for secret in secrets)


def headers(secrets: Sequence[str], msg_id: str, timestamp: int, body: str) -> dict[str, str]:
    """The headers of one delivery attempt."""
    return {"webhook-id": msg_id, "webhook-timestamp": str(timestamp),
            "webhook-signature": signature(secrets, msg_id, timestamp, body),
            "content-type": "application/json", "user-agent": "Batchery-Webhooks/1"}


def project_secret(server_secret: str, project: str) -> str:
    """The project's signing secret for per-object callbacks (`webhook_url` at create):
    `whsec_` + base64(HMAC-SHA256(server secret, "project-webhook:" + project))."""
    digest = hmac.new(server_secret.encode(), f"project-webhook:{project}".encode(),
                      hashlib.sha256).digest()
    return SECRET_PREFIX + base64.b64encode(digest).decode()


class _SecretSource(Protocol):
    def get_or_create_server_secret(self) -> str: ...


def server_secret(store: _SecretSource) -> str:
    """`BATCHERY_SECRET_KEY` if set, else the random secret the database keeps."""
    return os.environ.get(KEY_ENV) or store.get_or_create_server_secret()


def project_signing_secret(store: _SecretSource, project: str) -> str:
    return project_secret(server_secret(store), project)
