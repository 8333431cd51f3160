"""`FsspecFileStore`: file bodies under any fsspec URL (a local directory by default)."""

from __future__ import annotations

import contextlib
from typing import IO, Any, cast

import fsspec

from batchery.ports.filestore import FileStore


class FsspecFileStore(FileStore):
    def __init__(self, url: str, **storage_options: Any) -> None:
        fs, root = fsspec.core.url_to_fs(url, **storage_options)
        self.fs = fs
        self.root = root.rstrip("/")
        self._local = "file" in (fs.protocol if isinstance(fs.protocol, tuple)
                                 else (fs.protocol,))
        if self._local:
            fs.makedirs(self.root, exist_ok=True)

    def _path(self, key: str) -> str:
        return f"{self.root}/{key}"

    def open_write(self, key: str) -> IO[bytes]:
        path = self._path(key)
        if self._local:
            self.fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
        return cast(IO[bytes], self.fs.open(path, "wb"))

    def open_read(self, key: str) -> IO[bytes]:
        return cast(IO[bytes], self.fs.open(self._path(key), "rb"))

    def read_range(self, key: str, start: int, end: int) -> bytes:
        with self.fs.open(self._path(key), "rb") as f:
            f.seek(start)
            return cast(bytes, f.read(end - start))

    def size(self, key: str) -> int:
        return int(self.fs.size(self._path(key)))

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path(key))

    def delete_prefix(self, prefix: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.fs.rm(self._path(prefix), recursive=True)

    def url(self, key: str) -> str:
        path = self._path(key)
        return path if self._local else str(self.fs.unstrip_protocol(path))
