"""Settings: read once by the entry points and passed down explicitly."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from batchery.model.batches import DEFAULT_CHUNK_SIZE, DEFAULT_MAX_TASKS
from batchery.model.leases import DEFAULT_LEASE_S, DEFAULT_MAX_ATTEMPTS
from batchery.queue.worker import WorkerConfig
from batchery.stores.sql.engine import sqlite_url

DEFAULT_DATA_DIR = Path("data")


@dataclass(frozen=True, kw_only=True)
class Settings:
    data_dir: Path = DEFAULT_DATA_DIR
    #: SQLAlchemy URL; a SQLite file in the data dir when unset.
    database_url: str | None = None
    #: fsspec URL of the file store; `<data dir>/files` when unset.
    files_url: str | None = None
    #: YAML file declaring deployments; the `echo` deployment alone when unset.
    config: Path | None = None
    #: YAML file of hashed API keys and their projects; any key is accepted when unset.
    keys_file: Path | None = None
    chunk_size: int = DEFAULT_CHUNK_SIZE
    lease_s: float = DEFAULT_LEASE_S
    max_attempts: int = DEFAULT_MAX_ATTEMPTS
    max_tasks: int = DEFAULT_MAX_TASKS
    #: How long an Anthropic message batch may run before it expires, in seconds.
    message_batch_window_s: int = 86_400
    #: Whether admins may create `python` (code) deployments over REST.
    allow_code_deployments: bool = False

    @property
    def db_url(self) -> str:
        return self.database_url or sqlite_url(self.data_dir.resolve() / "batchery.db")

    @property
    def file_store_url(self) -> str:
        return self.files_url or str(self.data_dir.resolve() / "files")

    @property
    def outputs_url(self) -> str:
        """Where jobs write results unless they name an `output_path`."""
        return f"{self.file_store_url.rstrip('/')}/outputs"

    def worker_config(self) -> WorkerConfig:
        return WorkerConfig(lease_s=self.lease_s, max_attempts=self.max_attempts)
