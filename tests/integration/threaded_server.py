"""The part every threaded test HTTP server shares: start, stop, and what it saw."""

from __future__ import annotations

import threading
from http.server import ThreadingHTTPServer
from types import TracebackType
from typing import Any, Self


class ThreadedServer:
    """A `ThreadingHTTPServer` run in a thread; use as a context manager.

    Its `state` must have `stopping` (an Event), `lock`, `calls` (with a `key` each),
    `max_in_flight` and `errors`.
    """

    label = "test server"

    def __init__(self, server: ThreadingHTTPServer, state: Any, name: str) -> None:
        self.state = state
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever,
                                        kwargs={"poll_interval": 0.05}, name=name,
                                        daemon=True)

    @property
    def base_url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    def close(self) -> None:
        self.state.stopping.set()
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(10)
        if self.state.errors:
            raise AssertionError(f"the {self.label} failed: {self.state.errors!r}")

    @property
    def calls(self) -> list[Any]:
        with self.state.lock:
            return list(self.state.calls)

    def calls_for(self, key: str) -> list[Any]:
        return [c for c in self.calls if c.key == key]

    @property
    def max_in_flight(self) -> int:
        return int(self.state.max_in_flight)
