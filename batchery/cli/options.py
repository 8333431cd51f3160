"""Options shared by the commands that open the stores directly."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

DataDir = Annotated[Path, typer.Option("--data-dir", envvar="BATCHERY_DATA_DIR",
                                       help="Where the embedded database and files live.")]
DatabaseUrl = Annotated[str | None, typer.Option(
    "--database-url", envvar="BATCHERY_DATABASE_URL",
    help="SQLAlchemy URL, e.g. postgresql://user@host/db. Default: SQLite in the data dir.")]
FilesUrl = Annotated[str | None, typer.Option(
    "--files-url", envvar="BATCHERY_FILES_URL",
    help="fsspec URL for file bodies. Default: <data dir>/files.")]
ChunkSize = Annotated[int, typer.Option("--chunk-size", envvar="BATCHERY_CHUNK_SIZE", min=1,
                                        help="Requests per chunk.")]
LeaseSeconds = Annotated[float, typer.Option("--lease-seconds", envvar="BATCHERY_LEASE_SECONDS",
                                             min=1.0, help="Lease length; heartbeats renew "
                                                           "it every third of it.")]
MaxTasks = Annotated[int, typer.Option("--max-tasks", envvar="BATCHERY_MAX_TASKS", min=1,
                                       help="Most requests one batch may hold.")]
