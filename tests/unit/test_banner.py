"""What `batchery serve` prints of where its state lives: never a password."""

from __future__ import annotations

import pytest

from batchery.cli.server import redacted


@pytest.mark.parametrize(("url", "shown"), [
    ("postgresql+psycopg://bob:s3cr3t@db.example:5432/batchery",
     "postgresql+psycopg://bob:***@db.example:5432/batchery"),
    ("s3://AKIA123:wJalr/XUtn@bucket/prefix", "s3://AKIA123:***@bucket/prefix"),
    ("postgresql://bob@db/batchery", "postgresql://bob@db/batchery"),
    ("sqlite:////srv/batchery/batchery.db", "sqlite:////srv/batchery/batchery.db"),
    ("/data/files", "/data/files"),
])
def test_credentials_are_redacted(url: str, shown: str) -> None:
    assert redacted(url) == shown
    assert "s3cr3t" not in redacted(url) and "wJalr" not in redacted(url)
