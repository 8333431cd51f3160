"""The doorbell port, one suite for both adapters: a ring wakes a worker waiting in another
process; waiting without a ring times out; rings to workers gone are dropped."""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from batchery.doorbells import LocalDoorbell, PostgresDoorbell
from batchery.ports.doorbell import Doorbell

Factory = Callable[[], Doorbell]


@pytest.fixture(params=["local", pytest.param("postgres", marks=pytest.mark.postgres)])
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Factory]:
    if request.param == "local":
        yield lambda: LocalDoorbell(tmp_path / "doorbell")
    else:
        url = request.getfixturevalue("pg_url")
        yield lambda: PostgresDoorbell(url)


def _listen(make: Factory, ready: object, result: object) -> None:
    bell = make()
    bell.wait(0.01)  # starts listening
    ready.set()  # type: ignore[attr-defined]
    result.put(bell.wait(30))  # type: ignore[attr-defined]
    bell.close()


def test_a_ring_wakes_a_waiting_worker_in_another_process(make: Factory) -> None:
    context = multiprocessing.get_context("fork")
    ready, result = context.Event(), context.Queue()
    listener = context.Process(target=_listen, args=(make, ready, result))
    listener.start()
    try:
        assert ready.wait(30)
        ringer = make()
        ringer.ring()
        assert result.get(timeout=30) is True  # woken by the ring, long before its 30 s
        ringer.close()
    finally:
        listener.join(30)
        result.close()
        result.join_thread()
    assert listener.exitcode == 0


def test_without_a_ring_a_wait_times_out(make: Factory) -> None:
    bell = make()
    try:
        assert bell.wait(0.05) is False
        bell.ring()  # its own ring wakes it too: one bell per process is enough
        assert bell.wait(30) is True
        assert bell.wait(0.05) is False  # rings are drained, not counted
    finally:
        bell.close()


def test_a_ring_with_nobody_listening_is_dropped(tmp_path: Path) -> None:
    gone = LocalDoorbell(tmp_path / "doorbell")
    gone.wait(0.01)
    assert gone._socket is not None
    gone._socket.close()  # a worker that died without closing its bell
    LocalDoorbell(tmp_path / "doorbell").ring()  # neither raises nor blocks
    assert list((tmp_path / "doorbell").iterdir()) == []  # the stale socket was removed
