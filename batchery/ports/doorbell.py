"""The doorbell port: the API rings when it has made work (a batch, a job, a resume), and
idle workers wake at once instead of at their next poll.

A ring is a hint, never a message: a worker that misses one still finds the work at its
next poll, so a doorbell may drop rings (a worker that was busy, a network hiccup) without
losing anything.
"""

from __future__ import annotations

import time
from typing import Protocol


class Doorbell(Protocol):
    def ring(self) -> None:
        """Wake the idle workers. Never raises: a ring that cannot be sent is dropped."""

    def wait(self, timeout: float) -> bool:
        """Sleep until a ring or `timeout` seconds; True if rung."""

    def close(self) -> None: ...


class Silent:
    """No doorbell: workers find work by polling alone."""

    def ring(self) -> None:
        pass

    def wait(self, timeout: float) -> bool:
        time.sleep(timeout)
        return False

    def close(self) -> None:
        pass
