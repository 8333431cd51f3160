"""A doorbell for workers on any host: PostgreSQL's LISTEN/NOTIFY on one channel."""

from __future__ import annotations

import contextlib
import logging
import time
from typing import Any

from sqlalchemy.engine import make_url

log = logging.getLogger("batchery.doorbell")

CHANNEL = "batchery_work"


def _dsn(url: str) -> str:
    """A libpq connection string from a SQLAlchemy URL."""
    parsed = make_url(url)
    return parsed.set(drivername="postgresql").render_as_string(hide_password=False)


class PostgresDoorbell:
    def __init__(self, database_url: str) -> None:
        self.dsn = _dsn(database_url)
        self._listener: Any = None

    def ring(self) -> None:
        import psycopg

        try:
            with psycopg.connect(self.dsn, autocommit=True, connect_timeout=5) as conn:
                conn.execute(f"NOTIFY {CHANNEL}")
        except psycopg.Error as exc:
            log.debug("could not ring the doorbell: %s", exc)

    def wait(self, timeout: float) -> bool:
        import psycopg

        try:
            if self._listener is None:
                self._listener = psycopg.connect(self.dsn, autocommit=True, connect_timeout=5)
                self._listener.execute(f"LISTEN {CHANNEL}")
            rung = False
            for _ in self._listener.notifies(timeout=timeout, stop_after=1):
                rung = True
            return rung
        except psycopg.Error:
            # The connection went away: poll for now, listen again next time.
            self.close()
            time.sleep(timeout)
            return False

    def close(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(Exception):
                self._listener.close()
            self._listener = None
