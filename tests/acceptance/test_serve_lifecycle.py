"""`batchery serve` owns its worker processes: they never outlive it."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Server
from tests.helpers import alive, children


def wait_gone(pids: set[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while any(alive(p) for p in pids):
        assert time.monotonic() < deadline, f"still running: {[p for p in pids if alive(p)]}"
        time.sleep(0.1)


def pool_of(server: Server, size: int) -> set[int]:
    deadline = time.monotonic() + 20
    while len(pids := children(server.process.pid)) < size:
        assert time.monotonic() < deadline
        time.sleep(0.1)
    return pids


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_stopping_serve_stops_its_workers(server_factory: Any, sig: signal.Signals) -> None:
    server: Server = server_factory("--workers", "2")
    workers = pool_of(server, 2)
    server.process.send_signal(sig)
    server.process.wait(40)
    wait_gone(workers, 10)


def test_a_killed_serve_takes_its_workers_along(server_factory: Any, tmp_path: Path) -> None:
    server: Server = server_factory("--workers", "2")
    workers = pool_of(server, 2)
    os.kill(server.process.pid, signal.SIGKILL)
    server.process.wait(10)
    wait_gone(workers, 40)
