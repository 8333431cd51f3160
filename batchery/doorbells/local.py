"""A doorbell for one host: each listening worker binds a Unix datagram socket in a shared
directory (the data directory's `doorbell/`), and a ring sends one byte to each."""

from __future__ import annotations

import contextlib
import os
import secrets
import select
import socket
from pathlib import Path


class LocalDoorbell:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._socket: socket.socket | None = None
        self._path: Path | None = None

    def _listening(self) -> socket.socket:
        if self._socket is None:
            self.directory.mkdir(parents=True, exist_ok=True)
            # Short names: a Unix socket path has room for about a hundred bytes.
            self._path = self.directory / f"{os.getpid()}-{secrets.token_hex(3)}"
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
            sock.bind(str(self._path))
            sock.setblocking(False)
            self._socket = sock
        return self._socket

    def ring(self) -> None:
        try:
            names = os.listdir(self.directory)
        except OSError:
            return  # no worker has listened yet
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sender:
            sender.setblocking(False)
            for name in names:
                path = self.directory / name
                try:
                    sender.sendto(b"!", str(path))
                except (ConnectionRefusedError, FileNotFoundError):
                    # A worker that died without closing: its socket is stale.
                    with contextlib.suppress(OSError):
                        path.unlink()
                except OSError:
                    pass  # a full queue: that worker has rings waiting already

    def wait(self, timeout: float) -> bool:
        sock = self._listening()
        ready, _, _ = select.select([sock], [], [], timeout)
        if not ready:
            return False
        with contextlib.suppress(BlockingIOError):
            while sock.recv(16):  # drain: many rings wake once
                pass
        return True

    def close(self) -> None:
        if self._socket is not None:
            self._socket.close()
            self._socket = None
        if self._path is not None:
            with contextlib.suppress(OSError):
                self._path.unlink()
            self._path = None
