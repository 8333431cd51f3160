"""Identifiers in the shapes the hosted APIs use (`file-…`, `batch_…`, `batch_req_…`)."""

from __future__ import annotations

import os
import secrets
import string

_BASE62 = string.digits + string.ascii_letters


def _base62(n: int) -> str:
    return "".join(secrets.choice(_BASE62) for _ in range(n))


def file_id() -> str:
    return "file-" + _base62(22)


def batch_id() -> str:
    return "batch_" + secrets.token_hex(16)


# The two ids of every output line (and of every API request) read the OS's random source
# straight away: `secrets.token_hex` draws from the same `os.urandom` through three calls.

def request_line_id() -> str:
    return "batch_req_" + os.urandom(12).hex()


def request_id() -> str:
    return "req_" + os.urandom(12).hex()


def lease_token() -> str:
    return secrets.token_hex(12)
