"""Running one unit of work under its lease.

`Leased` is what a chunk and a job batch share: a heartbeat renews the lease, and the
coroutine doing the work is cancelled as soon as the lease is lost (a cancel, a stop, an
expiry) or a stopping worker's grace period is over. The caller then learns which it was
from `Cancelled.lost`: a lost lease leaves the work to whoever holds it now, an overdue
stop hands it back without counting an attempt.
"""

from __future__ import annotations

import asyncio
import contextvars
from collections.abc import Callable, Coroutine
from types import TracebackType
from typing import Any, TypeVar

from batchery.queue.heartbeat import Heartbeat

T = TypeVar("T")


class Cancelled(Exception):
    """The work was cut short: its lease was lost (`lost`), or its worker is stopping."""

    def __init__(self, *, lost: bool) -> None:
        super().__init__("lease lost" if lost else "handed back: the worker is stopping")
        self.lost = lost


class Leased:
    """Holds a lease for the duration of a `with` block, and runs coroutines that a lost
    lease or an overdue stop cancels."""

    def __init__(self, renew: Callable[[], bool], interval: float, *,
                 overdue: Callable[[], bool] = lambda: False,
                 runner: asyncio.Runner | None = None) -> None:
        self._runner = runner
        self._task: asyncio.Task[Any] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._cancel_asked = False
        self.heartbeat = Heartbeat(renew, interval, on_lost=self._cancel, overdue=overdue,
                                   on_overdue=self._cancel)

    @property
    def lost(self) -> bool:
        return self.heartbeat.lost

    def __enter__(self) -> Leased:
        self.heartbeat.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.heartbeat.__exit__(exc_type, exc, tb)

    def check(self) -> None:
        """Between synchronous steps: stop if the lease is gone or the stop is overdue."""
        if self._cancel_asked:
            raise Cancelled(lost=self.lost)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run `coro` to its end, or raise `Cancelled` once the lease is lost or overdue.
        In a copy of the caller's context: a Runner otherwise keeps the context it first
        ran in, and log records of later work would carry the first work's context."""
        assert self._runner is not None, "Leased.run needs an asyncio.Runner"
        try:
            return self._runner.run(self._guarded(coro), context=contextvars.copy_context())
        except asyncio.CancelledError:
            raise Cancelled(lost=self.lost) from None

    async def _guarded(self, coro: Coroutine[Any, Any, T]) -> T:
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        try:
            if self._cancel_asked:  # asked before this task existed
                coro.close()
                raise asyncio.CancelledError
            return await coro
        finally:
            self._task = None

    def _cancel(self) -> None:
        # Called from the heartbeat thread: hand the cancel to the loop's own thread.
        self._cancel_asked = True
        loop, task = self._loop, self._task
        if loop is not None and task is not None:
            loop.call_soon_threadsafe(task.cancel)
