"""Settings: read once by the entry points and passed down explicitly."""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import socket
from dataclasses import dataclass
from pathlib import Path

from batchery.model.batches import DEFAULT_CHUNK_SIZE, DEFAULT_MAX_TASKS
from batchery.model.leases import DEFAULT_LEASE_S, DEFAULT_MAX_ATTEMPTS
from batchery.model.owners import ServerIdentity
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
    #: Whether `serve` may take over what another running server declared.
    take_over: bool = False

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

    def server_identity(self) -> ServerIdentity:
        """This server as the owner of its config's declarations: an id generated once and
        kept in the data directory (`server-id`), with the config file's path, so that a
        restart is the same server and another config on the same store is not."""
        config = str(self.config.resolve()) if self.config is not None else None
        where = hashlib.sha256((config or "").encode()).hexdigest()[:16]
        return ServerIdentity(id=f"{_server_id(self.data_dir)}-{where}",
                              host=socket.gethostname(), config=config, pid=os.getpid())


def _server_id(data_dir: Path) -> str:
    path = data_dir / "server-id"
    with contextlib.suppress(FileNotFoundError):
        found = path.read_text().strip()
        if found:
            return found
    data_dir.mkdir(parents=True, exist_ok=True)
    made = secrets.token_hex(8)
    try:  # the first of two servers starting at once wins; the other reads its id
        with path.open("x") as f:
            f.write(made + "\n")
    except FileExistsError:
        return path.read_text().strip() or made
    return made
