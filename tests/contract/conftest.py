"""Fixtures of the store contract suite: one `Store` per adapter, on an empty database."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

from batchery.stores.sql.store import SqlStore
from batchery.stores.sql.tables import metadata

#: Every adapter of the `Store` port; each contract test runs once per entry.
BACKENDS = ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(scope="session")
def pg_contract_url(pg_admin: sa.Engine) -> Iterator[str]:
    """One PostgreSQL database for the contract tests, emptied before each of them:
    creating a database per test would cost most of the suite's time."""
    name = f"batchery_contract_{secrets.token_hex(6)}"
    with pg_admin.connect() as conn:
        conn.execute(sa.text(f'CREATE DATABASE "{name}"'))
    yield pg_admin.url.set(database=name).render_as_string(hide_password=False)
    with pg_admin.connect() as conn:
        conn.execute(sa.text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))


@pytest.fixture(params=BACKENDS)
def store(request: pytest.FixtureRequest) -> Iterator[SqlStore]:
    """A migrated store on an empty database: a new SQLite file, or the contract suite's
    PostgreSQL database with every table emptied."""
    if request.param == "sqlite":
        store = SqlStore.from_url(request.getfixturevalue("sqlite_url"))
    else:
        store = SqlStore.from_url(request.getfixturevalue("pg_contract_url"))
        names = ", ".join(f'"{table.name}"' for table in metadata.sorted_tables)
        with store.engine.begin() as conn:
            conn.execute(sa.text(f"TRUNCATE {names} RESTART IDENTITY"))
    try:
        yield store
    finally:
        store.close()


@pytest.fixture
def store_url(store: SqlStore) -> str:
    """The URL of `store`'s database, for other processes or engines to open."""
    return store.engine.url.render_as_string(hide_password=False)


@pytest.fixture(params=BACKENDS)
def fresh_url(request: pytest.FixtureRequest) -> str:
    """A new, empty database of its own (not even migrated), for the migration tests."""
    return str(request.getfixturevalue("sqlite_url" if request.param == "sqlite" else "pg_url"))
