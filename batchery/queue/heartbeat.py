"""A thread that keeps a lease alive while the work it guards runs."""

from __future__ import annotations

import threading
from collections.abc import Callable
from types import TracebackType


class Heartbeat:
    """Calls `renew` every `interval` seconds; on a False return, marks the lease lost and
    calls `on_lost` once. Also calls `on_overdue` once `deadline()` returns True, which is
    how a stopping worker hands back work that outlasts its grace period."""

    def __init__(self, renew: Callable[[], bool], interval: float, *,
                 on_lost: Callable[[], None] = lambda: None,
                 overdue: Callable[[], bool] = lambda: False,
                 on_overdue: Callable[[], None] = lambda: None) -> None:
        self._renew = renew
        self._interval = interval
        self._on_lost = on_lost
        self._overdue = overdue
        self._on_overdue = on_overdue
        self._stop = threading.Event()
        self.lost = False
        self.overdue = False
        self._thread = threading.Thread(target=self._run, name="heartbeat", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        # Check for overdue work often, renew at the interval.
        tick = min(0.2, self._interval)
        waited = 0.0
        while not self._stop.wait(tick):
            waited += tick
            if not self.overdue and self._overdue():
                self.overdue = True
                self._on_overdue()
            if waited < self._interval:
                continue
            waited = 0.0
            try:
                alive = self._renew()
            except Exception:
                # A database hiccup: keep trying until the lease would run out.
                continue
            if not alive:
                self.lost = True
                self._on_lost()
                return
