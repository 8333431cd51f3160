"""The port of a provider's batch API, to which a whole batch is handed
(`batchery.batchapi.remote` drives it)."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any

from batchery.model.batches import Batch, BatchError


@dataclass(frozen=True, kw_only=True, slots=True)
class Progress:
    ended: bool
    completed: int = 0
    failed: int = 0
    #: The provider refused the whole batch (its validation failed): the reasons.
    errors: list[BatchError] | None = None


class RemoteBatchBackend(ABC):
    """A provider's batch API. Methods raise `BackendError` when the provider fails."""

    #: The batch endpoints this provider accepts.
    endpoints: frozenset[str] = frozenset()

    @abstractmethod
    def submit(self, batch: Batch, lines: Iterator[bytes]) -> dict[str, Any]:
        """Upload the requests and create the provider's batch; returns its job object."""

    @abstractmethod
    def refresh(self, job: dict[str, Any]) -> dict[str, Any]: ...

    @abstractmethod
    def cancel(self, job: dict[str, Any]) -> dict[str, Any]: ...

    @abstractmethod
    def progress(self, job: dict[str, Any]) -> Progress: ...

    @abstractmethod
    def fetch(self, job: dict[str, Any], out: IO[bytes], err: IO[bytes]) -> None:
        """Copy the results, as lines of our own format, into `out` (and `err`)."""

    def rejected_line(self, raw: bytes) -> bytes | None:
        """The result line of a request `submit` did not send because it is invalid for this
        provider, or None. Asked only of requests the provider gave no result."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
