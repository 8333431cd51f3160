"""Engines for SQLite and PostgreSQL, and the few places where the two dialects differ."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy import event
from sqlalchemy.engine import Engine


def normalize_url(url: str) -> str:
    """Accept plain `postgresql://` URLs and pick the psycopg 3 driver for them."""
    for prefix in ("postgres://", "postgresql://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix):]
    return url


def sqlite_url(path: Path) -> str:
    return f"sqlite:///{path}"


def create(url: str) -> Engine:
    url = normalize_url(url)
    if url.startswith("sqlite"):
        return _sqlite_engine(url)
    return sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)


def _sqlite_engine(url: str) -> Engine:
    engine = sa.create_engine(url, connect_args={"check_same_thread": False, "timeout": 60})

    @event.listens_for(engine, "connect")
    def _on_connect(dbapi_conn: Any, _record: Any) -> None:
        # Take transactions into our own hands so that every one starts with
        # BEGIN IMMEDIATE: a deferred transaction that later writes can fail at once with
        # SQLITE_BUSY when another process wrote in between, busy timeout or not.
        dbapi_conn.isolation_level = None
        cursor = dbapi_conn.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=NORMAL")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.close()

    @event.listens_for(engine, "begin")
    def _on_begin(conn: Any) -> None:
        # A reader (`reader(engine)`) takes no lock: in WAL mode it reads a snapshot while
        # writers go on.
        # Straight to the driver: SQLAlchemy's statement machinery cost more than the
        # statement, and every transaction of every process runs this.
        conn.connection.driver_connection.execute(
            "BEGIN" if conn.get_execution_options().get(_READ_ONLY) else "BEGIN IMMEDIATE")

    return engine


_READ_ONLY = "batchery_read_only"


def reader(engine: Engine) -> Engine:
    """`engine` for transactions that only read (same pool): on SQLite they start with a
    plain `BEGIN`, so they never wait for, or hold up, a writer."""
    return engine.execution_options(**{_READ_ONLY: True})


def db_now(engine: Engine) -> sa.ColumnElement[float]:
    """The database's clock in Unix seconds: leases never trust a worker's clock."""
    if engine.dialect.name == "postgresql":
        return sa.literal_column("extract(epoch from clock_timestamp())::float8")
    return sa.literal_column("((julianday('now') - 2440587.5) * 86400.0)")
