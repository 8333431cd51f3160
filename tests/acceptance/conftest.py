"""Fixtures the engine's acceptance suites share: each test on SQLite and PostgreSQL, and
a folder for the logs of the workers a test starts itself."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.acceptance.engine_support import DATABASES, Database, database


@pytest.fixture(params=DATABASES)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    return database(request, tmp_path)


@pytest.fixture
def workers_dir(tmp_path: Path) -> Path:
    path = tmp_path / "workers"
    path.mkdir()
    return path
