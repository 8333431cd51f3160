"""The file store port: where file bodies live. Metadata lives in the `Store`."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import IO


class FileStore(ABC):
    """Byte blobs under keys such as `files/file-abc`.

    A blob becomes visible to users only once a metadata row points at it, so writers may
    write straight to the final key: a half-written blob is never reachable.
    """

    @abstractmethod
    def open_write(self, key: str) -> IO[bytes]:
        """A binary stream that creates or replaces the blob at `key`."""

    @abstractmethod
    def open_read(self, key: str) -> IO[bytes]:
        """A binary stream over the blob at `key`."""

    @abstractmethod
    def read_range(self, key: str, start: int, end: int) -> bytes:
        """Bytes `[start, end)` of the blob."""

    @abstractmethod
    def size(self, key: str) -> int:
        """Size of the blob in bytes."""

    @abstractmethod
    def delete(self, key: str) -> None:
        """Remove the blob; a missing blob is not an error."""

    @abstractmethod
    def delete_prefix(self, prefix: str) -> None:
        """Remove every blob under `prefix`."""

    def url(self, key: str) -> str:
        """The blob's URL, as a job's worker or predictor opens it."""
        raise NotImplementedError(f"{type(self).__name__} cannot name its blobs by URL")
