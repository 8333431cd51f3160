"""Idempotent creates (extension): a client's key names one create within a project, so a
retried request (a lost answer, a crashed client) returns the object the first one made
instead of making another.

A key is stored with a fingerprint of the request's parameters: the same key with other
parameters is a mistake that the caller is told about (409), never silently answered."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from batchery.model.exceptions import Conflict, InvalidRequest

#: The header and the body field that carry a key (the convention of OpenAI-compatible
#: servers); the body field is what `extra_body` sends.
HEADER = "Idempotency-Key"
BODY_FIELD = "idempotency_key"
#: Keys are kept at least this long; older ones are forgotten (and pruned lazily).
KEY_TTL_S = 24 * 3600
MAX_KEY_LENGTH = 256
#: What a key may hold: no control characters (PostgreSQL text cannot hold NUL).
KEY_PATTERN = re.compile(f"[^\\x00-\\x1f\\x7f]{{1,{MAX_KEY_LENGTH}}}")

#: What a key creates; a key is unique per project and kind.
BATCH, MESSAGE_BATCH, JOB = "batch", "message_batch", "job"


@dataclass(frozen=True, kw_only=True, slots=True)
class IdempotencyKey:
    project: str
    kind: str
    key: str
    #: `fingerprint(...)` of the parameters of the create that took the key.
    fingerprint: str
    object_id: str
    created_at: float


@dataclass(frozen=True, slots=True)
class Idempotency:
    """What a create request asks: its key, and the fingerprint of its parameters."""

    key: str
    fingerprint: str

    def record(self, project: str, kind: str, object_id: str, now: float) -> IdempotencyKey:
        return IdempotencyKey(project=project, kind=kind, key=self.key,
                              fingerprint=self.fingerprint, object_id=object_id,
                              created_at=now)


def from_request(header: str | None, body: Mapping[str, Any],
                 **more: Any) -> Idempotency | None:
    """The request's key (header or body field) with the fingerprint of its body and of
    `more` (parameters given outside the body, such as a path's name); None without a key."""
    key = key_of(header, body)
    return None if key is None else Idempotency(key, fingerprint({**body, **more}))


def fingerprint(params: Mapping[str, Any]) -> str:
    """A hash of the request's parameters, the same whatever the order of their keys.
    Absent and null top-level fields are the same request."""
    canonical = {k: v for k, v in params.items() if v is not None and k != BODY_FIELD}
    return hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()


def key_of(header: str | None, body: Mapping[str, Any]) -> str | None:
    """The key a request gives, checked: the header's, else the body field's."""
    given = body.get(BODY_FIELD)
    if given is not None and not isinstance(given, str):
        raise InvalidRequest(f"Invalid type for '{BODY_FIELD}': expected a string.",
                             param=BODY_FIELD, code="invalid_type")
    key = header if header is not None else given
    if key is None:
        return None
    if not KEY_PATTERN.fullmatch(key):
        raise InvalidRequest(f"An idempotency key must be 1 to {MAX_KEY_LENGTH} characters, "
                             f"none of them a control character.", param=BODY_FIELD,
                             code="invalid_value")
    return key


def replayed(found: IdempotencyKey, asked: Idempotency, what: str) -> str:
    """The id of the object a replay returns (`what`: "batch", "job"…); Conflict when the
    key was used for a request with other parameters."""
    if found.fingerprint != asked.fingerprint:
        raise Conflict(f"The idempotency key '{found.key}' was already used to create the "
                       f"{what} '{found.object_id}' with different parameters; send the same "
                       f"parameters to get that {what} again, or use a new key.",
                       code="conflict")
    return found.object_id


def gone(found: IdempotencyKey, what: str) -> Conflict:
    """The answer to a replay whose object has been deleted since."""
    return Conflict(f"The idempotency key '{found.key}' was used to create the {what} "
                    f"'{found.object_id}', which has been deleted since; use a new key.",
                    code="conflict")


class Pruner:
    """Forgets expired keys now and then (lazily, on creates), not on every request."""

    EVERY_S = 3600.0

    def __init__(self) -> None:
        self.last = 0.0

    def due(self, now: float) -> bool:
        if now - self.last < self.EVERY_S:
            return False
        self.last = now
        return True
