"""Doorbell adapters: how idle workers learn at once that there is work."""

from __future__ import annotations

from pathlib import Path

from batchery.doorbells.local import LocalDoorbell
from batchery.doorbells.postgres import PostgresDoorbell
from batchery.ports.doorbell import Doorbell

__all__ = ["LocalDoorbell", "PostgresDoorbell", "for_store"]


def for_store(database_url: str, data_dir: Path) -> Doorbell:
    """PostgreSQL's LISTEN/NOTIFY where the store is PostgreSQL (workers on any host);
    else sockets in the data directory (the API and its workers on one host)."""
    if database_url.startswith(("postgresql", "postgres")):
        return PostgresDoorbell(database_url)
    return LocalDoorbell(data_dir / "doorbell")
