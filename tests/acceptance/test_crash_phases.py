"""Kill a process at every phase of the work (issue #18, item 3): in validation, in
finalization, between a part's write and its commit, a worker paused past its lease, and
a job's enqueuer, completer and `on_job_complete`. On SQLite and on PostgreSQL, each ends
with every request or item exactly once, and no part, segment or result file left behind.

The tests find the worker at each phase in the store itself (who holds the lease), pause
it (SIGSTOP), check that it is still inside the phase, and only then SIGKILL it: a kill
that came too late is never counted as one that landed."""

from __future__ import annotations

import random
import sqlite3
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
import sqlalchemy as sa
from openai import OpenAI

from tests.acceptance.engine_support import (
    DATABASES,
    LEASE_S,
    Database,
    Workers,
    custom_ids,
    echo,
    file_lines,
    files_root,
    files_under,
    is_batchery_worker,
    serve,
    sigcont,
    sigkill,
    sigstop,
    store_url,
    unreferenced_blobs,
    until,
    wait_batch,
    write_config,
)
from tests.acceptance.engine_support import database as database_of
from tests.acceptance.jobs_support import Jobs
from tests.conftest import Server
from tests.helpers import chat_file, chat_line, jsonl

pytestmark = pytest.mark.slow

PREDICTORS = Path(__file__).resolve().parent.parent / "predictors"


@pytest.fixture(params=DATABASES)
def db(request: pytest.FixtureRequest, tmp_path: Path) -> Database:
    return database_of(request, tmp_path)


@pytest.fixture
def workers_dir(tmp_path: Path) -> Path:
    path = tmp_path / "workers"
    path.mkdir()
    return path


# -- looking into the store ----------------------------------------------------------

class Peek:
    """Reads the store that the server and its workers share: which worker process holds
    which lease, and what has been committed. Reads only, in short transactions."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.engine = sa.create_engine(url)

    def close(self) -> None:
        self.engine.dispose()

    def _all(self, sql: str, **params: Any) -> list[sa.Row[Any]]:
        with self.engine.connect() as conn:
            return list(conn.execute(sa.text(sql), params))

    def holder(self, table: str, key: str, phase: str) -> int | None:
        """The pid of the live worker holding the lease on batch or job `key` while it is
        in `phase` (a batch's status, a job's stage), if one does."""
        column = "status" if table == "batches" else "stage"
        rows = self._all(f"SELECT w.pid FROM {table} t JOIN workers w ON w.id = t.lease_owner "
                         f"WHERE t.id = :key AND t.{column} = :phase "
                         f"AND t.lease_token IS NOT NULL", key=key, phase=phase)
        pids = [row.pid for row in rows if is_batchery_worker(row.pid)]
        return pids[0] if pids else None

    def running_chunks(self, batch_id: str) -> dict[int, tuple[int, str]]:
        """The live workers running a chunk of the batch: pid -> (chunk id, lease token)."""
        rows = self._all("SELECT w.pid, c.id, c.lease_token FROM chunks c JOIN workers w "
                         "ON w.id = c.lease_owner WHERE c.batch_id = :b AND c.state = 'leased'",
                         b=batch_id)
        return {row.pid: (row.id, row.lease_token) for row in rows
                if is_batchery_worker(row.pid)}

    def chunk_owner(self, chunk_id: int) -> tuple[str, str | None]:
        """A chunk's state, and the worker id holding it (None: no one)."""
        row = self._all("SELECT state, lease_owner FROM chunks WHERE id = :c", c=chunk_id)[0]
        return row.state, row.lease_owner

    def committed(self, batch_id: str) -> set[str]:
        """The part files that committed records of the batch name."""
        rows = self._all("SELECT out_key, err_key FROM chunk_parts WHERE batch_id = :b "
                         "UNION ALL SELECT out_key, err_key FROM chunks WHERE batch_id = :b",
                         b=batch_id)
        return {key for row in rows for key in row if key}

    def worker_id(self, pid: int) -> str:
        return str(self._all("SELECT id FROM workers WHERE pid = :p", p=pid)[0].id)

    def writing(self) -> bool:
        """Whether some process is inside a write transaction now."""
        if self.engine.dialect.name == "sqlite":
            path = self.url.removeprefix("sqlite:///")
            conn = sqlite3.connect(path, timeout=0, isolation_level=None)
            try:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute("ROLLBACK")
                return False
            except sqlite3.OperationalError:
                return True
            finally:
                conn.close()
        rows = self._all("SELECT count(*) AS n FROM pg_stat_activity WHERE datname = "
                         "current_database() AND pid <> pg_backend_pid() "
                         "AND xact_start IS NOT NULL")
        return bool(rows[0].n)


def kill_if(pid: int, still: Callable[[], bool]) -> bool:
    """SIGKILL `pid` if `still()` holds once it is paused (SIGSTOP): a kill that lands
    where the test wants it. Otherwise let it go on; returns whether it was killed."""
    if not sigstop(pid):
        return False
    if still():
        return sigkill(pid)
    sigcont(pid)
    return False


@pytest.fixture
def setup(db: Database, tmp_path: Path, workers_dir: Path,
          server_factory: Any) -> Iterator[Callable[..., Any]]:
    """Builds (server, workers, client, peek) for a test; closes them at the end."""
    made: list[Any] = []

    def build(deployments: list[dict[str, Any]], n_workers: int,
              *server_args: str) -> tuple[Server, Workers, OpenAI, Peek]:
        config = write_config(tmp_path / "config.yaml", deployments)
        server = serve(server_factory, db, config, "--workers", "0", *server_args)
        workers = Workers(server, db, workers_dir)
        workers.start(n_workers)
        client = OpenAI(base_url=server.v1, api_key="k", max_retries=3)
        peek = Peek(store_url(server, db))
        made.extend([workers, client, peek])
        return server, workers, client, peek

    yield build
    for thing in made:
        thing.close()


def _create(client: OpenAI, data: bytes) -> Any:
    upload = client.files.create(file=("in.jsonl", data), purpose="batch")
    return client.batches.create(input_file_id=upload.id, endpoint="/v1/chat/completions",
                                 completion_window="24h")


def _each_once(client: OpenAI, done: Any, n: int, log: str) -> None:
    """The batch completed with every request answered exactly once."""
    assert done.status == "completed", (done.status, done.errors, log[-3000:])
    errors = file_lines(client, done.error_file_id)
    assert errors == [], f"{len(errors)} error lines, first: {errors[:1]}"
    out = custom_ids(file_lines(client, done.output_file_id))
    assert len(out) == n, f"{len(out)} output lines for {n} requests"
    assert sorted(out) == sorted(f"req-{i}" for i in range(n))
    counts = done.request_counts
    assert (counts.total, counts.completed, counts.failed) == (n, n, 0)


def _nothing_left(client: OpenAI, root: Path, batch_id: str) -> None:
    """No part file of the batch remains, and every blob under `files/` is a file's."""
    assert files_under(root, f"parts/{batch_id}") == []
    known = {f.id for f in client.files.list()}
    assert unreferenced_blobs(root, known) == []


# -- batches -------------------------------------------------------------------------

def test_sigkill_during_validation(setup: Callable[..., Any], db: Database) -> None:
    """A 200k-line file takes seconds to validate: its validating worker is killed twice
    in the middle of it; the validation starts again elsewhere and the batch ends whole."""
    server, workers, client, peek = setup([echo("echo", 0)], 2)
    n, rng = 200_000, random.Random(5)
    batch = _create(client, chat_file(n))

    def validating() -> bool:
        return client.batches.retrieve(batch.id).status == "validating"

    for _ in range(2):
        pid = until(lambda: peek.holder("batches", batch.id, "validating"), 60,
                    "a worker to validate the batch", detail=lambda: workers.log()[-3000:])
        time.sleep(rng.uniform(0.1, 0.5))  # into the reading of the file (about 1 s)
        assert kill_if(pid, validating), "validation ended before the kill landed"
        workers.replace_dead()
    done = wait_batch(client, batch.id, 120)
    _each_once(client, done, n, workers.log())
    _nothing_left(client, files_root(server, db), batch.id)


def test_sigkill_during_finalization(setup: Callable[..., Any], db: Database) -> None:
    """50k answers of 1 kB: assembling the result files takes a moment, and the worker
    doing it is killed twice in the middle of it. The batch still ends whole, and the
    result files the killed workers had begun are not left behind."""
    server, workers, client, peek = setup([echo("echo", 0)], 2)
    n, pad = 50_000, "lorem ipsum " * 85
    batch = _create(client, jsonl(chat_line(f"req-{i}", f"{pad}{i}") for i in range(n)))

    def finalizing() -> bool:
        return client.batches.retrieve(batch.id).status == "finalizing"

    for _ in range(2):
        pid = until(lambda: peek.holder("batches", batch.id, "finalizing"), 90,
                    "a worker to assemble the results", every=0.01,
                    detail=lambda: workers.log()[-3000:])
        assert kill_if(pid, finalizing), "finalization ended before the kill landed"
        workers.replace_dead()
    done = wait_batch(client, batch.id, 60)
    _each_once(client, done, n, workers.log())
    _nothing_left(client, files_root(server, db), batch.id)
