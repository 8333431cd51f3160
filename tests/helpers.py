"""Builders of batch input files for tests, and small network helpers shared by suites."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TypeVar

import orjson

#: Deployments for the SDK suites: a fast model, and a slow one to catch batches mid-run.
SDK_DEPLOYMENTS = """
deployments:
  - name: echo
    backend: echo
  - name: echo-slow
    backend: echo
    options: {latency_ms: 40}
"""


T = TypeVar("T")


def eventually(read: Callable[[], T | None], what: str, timeout: float = 30.0,
               every: float = 0.05) -> T:
    """The first value `read()` gives that is not None nor False: a wait for an event, with
    a deadline far past any machine's load, that fails only when the event never comes."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if value is not None and value is not False:
            return value
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:.0f} s"
        time.sleep(every)


#: /metrics as samples: (name, labels sorted) to value.
Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def metric_samples(base_url: str) -> Samples:
    """Every sample a server's /metrics shows, by name and labels."""
    import httpx
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base_url}/metrics", timeout=10).text
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text) for sample in family.samples}


def by_label(samples: Samples, name: str, label: str) -> dict[str, float]:
    """The samples of one metric, by the value of one label."""
    return {dict(labels)[label]: value for (metric, labels), value in samples.items()
            if metric == name}


def chat_line(custom_id: str, text: str = "hello", model: str = "echo",
              **body: Any) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": "/v1/chat/completions",
            "body": {"model": model, "messages": [{"role": "user", "content": text}], **body}}


def jsonl(lines: Iterable[Any]) -> bytes:
    """One line per item: strings and bytes as they are, anything else as JSON."""
    out = bytearray()
    for line in lines:
        if isinstance(line, str):
            out += line.encode()
        elif isinstance(line, bytes):
            out += line
        else:
            out += orjson.dumps(line)
        out += b"\n"
    return bytes(out)


def chat_file(n: int, prefix: str = "req", model: str = "echo") -> bytes:
    return jsonl(chat_line(f"{prefix}-{i}", f"hello number {i}", model=model) for i in range(n))


class Listener:
    """A TCP port that records every connection made to it: an internal service a caller
    might try to make the server reach."""

    def __init__(self) -> None:
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self._socket.listen(16)
        self._socket.settimeout(0.2)
        self.port: int = self._socket.getsockname()[1]
        self.connections = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._accept, name="listener", daemon=True)
        self._thread.start()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._socket.accept()
            except (TimeoutError, OSError):
                continue
            self.connections += 1
            conn.close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self._socket.close()


class Recorder:
    """Keeps every response a client saw, to check that a credential never shows."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    def hook(self, response: Any) -> None:
        response.read()
        self.bodies.append(response.content + str(response.headers).encode())

    def assert_never_contains(self, secret: str) -> None:
        assert self.bodies
        assert not any(secret.encode() in body for body in self.bodies)


# -- processes, read from /proc ------------------------------------------------------------

def _parent_and_state(entry: Path) -> tuple[int, str] | None:
    """(ppid, state) of the process whose /proc folder is `entry`; None once it is gone.
    The command name may hold spaces and parentheses: the fields follow the last ')'."""
    try:
        fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None
    return int(fields[1]), fields[0]


def process_tree() -> dict[int, list[int]]:
    """parent pid -> the pids of its children, for every process now running."""
    tree: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (found := _parent_and_state(entry)) is not None:
            tree.setdefault(found[0], []).append(int(entry.name))
    return tree


def children(pid: int) -> set[int]:
    """The pids of the processes whose parent is `pid`."""
    return set(process_tree().get(pid, []))


def descendants(pid: int) -> list[int]:
    """Every process below `pid`."""
    tree, found, todo = process_tree(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie has exited)."""
    found = _parent_and_state(Path("/proc") / str(pid))
    return found is not None and found[1] != "Z"
