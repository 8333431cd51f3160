"""Identifiers in the shapes the hosted APIs use (`file-…`, `batch_…`, `batch_req_…`)."""

from __future__ import annotations

import secrets
import string

_BASE62 = string.digits + string.ascii_letters


def _base62(n: int) -> str:
    return "".join(secrets.choice(_BASE62) for _ in range(n))


def file_id() -> str:
    return "file-" + _base62(22)


def batch_id() -> str:
    return "batch_" + secrets.token_hex(16)


def request_line_id() -> str:
    return "batch_req_" + secrets.token_hex(12)


def request_id() -> str:
    return "req_" + secrets.token_hex(12)


def lease_token() -> str:
    return secrets.token_hex(12)
