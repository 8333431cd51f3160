"""The idempotency keys port (extension): which object a project's key made.

A key is taken in the same transaction that inserts its object (`insert_batch(…, key=…)`,
`insert_job(…, key=…)`), so two concurrent creates with one key make one object: the second
finds the key taken and gets the first one's record back instead."""

from __future__ import annotations

from abc import abstractmethod
from typing import Protocol

from batchery.model.idempotency import IdempotencyKey


class IdempotencyKeys(Protocol):
    @abstractmethod
    def find_key(self, project: str, kind: str, key: str, *,
                 newer_than: float) -> IdempotencyKey | None:
        """The key's record, if it was taken after `newer_than` (older ones are forgotten)."""

    @abstractmethod
    def prune_keys(self, older_than: float) -> int:
        """Forget keys taken before `older_than`; returns how many."""
