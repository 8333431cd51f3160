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
from tests.acceptance.jobs_support import Jobs
from tests.conftest import Server
from tests.helpers import chat_file, chat_line, jsonl

pytestmark = pytest.mark.slow

PREDICTORS = Path(__file__).resolve().parent.parent / "predictors"




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

    def status(self, table: str, key: str) -> str:
        """A batch's status, or a job's stage. Read here rather than from the API: a
        paused worker may hold SQLite's write lock, which the server would wait for."""
        column = "status" if table == "batches" else "stage"
        return str(self._all(f"SELECT {column} AS s FROM {table} WHERE id = :k", k=key)[0].s)

    def file_ids(self) -> set[str]:
        return {row.id for row in self._all("SELECT id FROM files")}

    def batch_count(self, job_id: str) -> int:
        """How many batches of the job enqueuing has recorded."""
        return int(self._all("SELECT count(*) AS n FROM job_batches WHERE job_id = :j",
                             j=job_id)[0].n)

    def worker_state(self, worker_id: str) -> str:
        return str(self._all("SELECT state FROM workers WHERE id = :w", w=worker_id)[0].state)

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


def kill_the_enqueuer_twice(peek: Peek, jobs: Jobs, job_id: str) -> None:
    """SIGKILL the worker enqueuing the job twice, each time while it is still enqueuing
    with more batches recorded than at the kill before."""
    recorded: list[int] = []

    def enqueuing_with_progress() -> bool:
        if peek.status("jobs", job_id) != "enqueue":
            return False
        count = peek.batch_count(job_id)
        if count <= (recorded[-1] if recorded else 0):
            return False
        recorded.append(count)
        return True

    def killed() -> bool:
        pid = peek.holder("jobs", job_id, "enqueue")
        return pid is not None and kill_if(pid, enqueuing_with_progress)

    for _ in range(2):
        until(killed, 60, "the enqueuer to be caught with batches recorded", every=0.02,
              detail=lambda: jobs.logs(job_id)[-3000:])


#: Builds a server (`--workers 0`), `n` workers, a client and a `Peek`: see `batch_site`.
Build = Callable[..., tuple[Server, Workers, OpenAI, Peek]]


@pytest.fixture
def batch_site(db: Database, tmp_path: Path, workers_dir: Path,
          server_factory: Any) -> Iterator[Build]:
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

def test_sigkill_during_validation(batch_site: Build, db: Database) -> None:
    """A 200k-line file takes seconds to validate: its validating worker is killed twice
    in the middle of it; the validation starts again elsewhere and the batch ends whole."""
    server, workers, client, peek = batch_site([echo("echo", 0)], 2)
    n, rng = 200_000, random.Random(5)
    batch = _create(client, chat_file(n))

    def validating() -> bool:
        return peek.status("batches", batch.id) == "validating"

    # Kill the validating worker twice. How long validation takes depends on the machine's
    # load, so a try whose kill came too late (validation over) is not counted, and the
    # test only needs the kill to land in validation at least once.
    landed = 0
    for _ in range(2):
        pid = peek.holder("batches", batch.id, "validating") if validating() else None
        if pid is None:
            pid = until(lambda: peek.holder("batches", batch.id, "validating")
                        or (None if validating() else -1), 60,
                        "a worker to validate the batch", detail=lambda: workers.log()[-3000:])
        if pid == -1:
            break  # validation ended on its own: this batch has no more to kill
        time.sleep(rng.uniform(0.0, 0.2))  # into the reading of the file
        landed += kill_if(pid, validating)
        workers.replace_dead()
    assert landed >= 1, "no kill landed while the batch was validating"
    done = wait_batch(client, batch.id, 120)
    _each_once(client, done, n, workers.log())
    _nothing_left(client, files_root(server, db), batch.id)


def test_sigkill_during_finalization(batch_site: Build, db: Database) -> None:
    """50k answers of 1 kB: assembling the result files takes a moment, and the worker
    doing it is killed twice while it writes them. The batch still ends whole, and the
    result files the killed workers had begun are not left behind."""
    server, workers, client, peek = batch_site([echo("echo", 0)], 2)
    root = files_root(server, db)
    n, pad = 50_000, "lorem ipsum " * 85
    batch = _create(client, jsonl(chat_line(f"req-{i}", f"{pad}{i}") for i in range(n)))
    left: set[str] = set()  # result files begun by the workers killed so far

    def assembling() -> bool:
        """Still finalizing, with a result file begun that no record names yet."""
        if peek.status("batches", batch.id) != "finalizing":
            return False
        begun = set(unreferenced_blobs(root, peek.file_ids())) - left
        left.update(begun)
        return bool(begun)

    for _ in range(2):
        def stopped_while_assembling() -> bool:
            pid = peek.holder("batches", batch.id, "finalizing")
            return pid is not None and kill_if(pid, assembling)

        until(stopped_while_assembling, 90, "a worker to be caught writing the results",
              every=0.005, detail=lambda: workers.log()[-3000:])
        workers.replace_dead()
    done = wait_batch(client, batch.id, 60)
    _each_once(client, done, n, workers.log())
    _nothing_left(client, root, batch.id)


def test_sigkill_between_a_part_write_and_its_commit(batch_site: Build,
                                                     db: Database) -> None:
    """Lines of 20 ms on three workers: a running chunk writes a part file of its answers
    every half second, then commits it. The workers are paused again and again; one
    caught with a part file of its lease on disk that no record names yet (written, not
    committed) is killed there, three times. The batch ends whole; no part is left."""
    server, workers, client, peek = batch_site([echo("echo-slow", 20)], 3,
                                               "--chunk-size", "100")
    root = files_root(server, db)
    n, rng, hits = 3000, random.Random(18), 0
    batch = _create(client, chat_file(n, model="echo-slow"))
    prefix = f"parts/{batch.id}"

    def probe() -> bool:
        """Pause every worker, kill those between a write and its commit; True on a hit."""
        nonlocal hits
        paused = [pid for pid in workers.pids() if sigstop(pid)]
        try:
            running = peek.running_chunks(batch.id)
            committed = peek.committed(batch.id)
            on_disk = files_under(root, prefix)
            for pid, (_, token) in running.items():
                if pid in paused and any(token in key and key not in committed
                                         for key in on_disk):
                    hits += sigkill(pid)
        finally:
            for pid in paused:
                sigcont(pid)
        workers.replace_dead()
        time.sleep(rng.uniform(0.0, 0.05))
        return hits >= 3 or peek.status("batches", batch.id) not in ("validating",
                                                                      "in_progress")

    until(probe, 120, "three workers caught between a part's write and its commit",
          every=0.0, detail=lambda: workers.log()[-3000:])
    assert hits >= 3, f"the batch ended after {hits} hits"
    done = wait_batch(client, batch.id, 120)
    _each_once(client, done, n, workers.log())
    _nothing_left(client, root, batch.id)


def _pause_outside_a_transaction(pid: int, peek: Peek) -> bool:
    """SIGSTOP `pid` at a moment no transaction is open: paused inside one, it would keep
    its locks, and the others would wait for it rather than take its work over."""
    if not sigstop(pid):
        return False
    if peek.writing():
        sigcont(pid)
        return False
    return True


def test_a_worker_paused_past_its_lease_is_fenced_out(batch_site: Build,
                                                      db: Database) -> None:
    """A worker in the middle of a chunk is paused (SIGSTOP) until its lease has run out
    and another worker has taken the chunk over, then woken (SIGCONT): whatever it still
    commits is refused, and the batch ends with every request exactly once."""
    server, workers, client, peek = batch_site([echo("echo-slow", 20)], 2,
                                               "--chunk-size", "100")
    n = 600
    batch = _create(client, chat_file(n, model="echo-slow"))

    def mid_chunk() -> tuple[int, int] | None:
        """A worker with some of its chunk committed, and more to run."""
        committed = peek.committed(batch.id)
        for pid, (chunk_id, token) in peek.running_chunks(batch.id).items():
            if any(token in key for key in committed):
                return pid, chunk_id
        return None

    pid, chunk_id = until(mid_chunk, 60, "a worker in the middle of a chunk",
                          detail=lambda: workers.log()[-3000:])
    paused_id = peek.worker_id(pid)
    until(lambda: _pause_outside_a_transaction(pid, peek), 30,
          "a moment to pause the worker outside a transaction", every=0.01)
    try:
        def taken_over() -> bool:
            state, owner = peek.chunk_owner(chunk_id)
            return state == "done" or owner not in (None, paused_id)

        until(taken_over, 60, "another worker to take the chunk over",
              detail=lambda: workers.log()[-3000:])
    finally:
        sigcont(pid)
    done = wait_batch(client, batch.id, 120)
    _each_once(client, done, n, workers.log())
    # The woken worker lives on, and has let go of the chunk it lost.
    until(lambda: peek.worker_state(paused_id) == "idle", 30, "the woken worker to idle")
    assert is_batchery_worker(pid)
    _nothing_left(client, files_root(server, db), batch.id)


# -- jobs ----------------------------------------------------------------------------

#: Two pool workers, always there: a killed one is replaced.
POOL = {"min": 2, "max": 2, "idle_seconds": 30}


@pytest.fixture
def job_site(db: Database, tmp_path: Path,
             server_factory: Any) -> Iterator[tuple[Server, Jobs, Peek]]:
    """A server whose endpoint `work` runs `crash_predictors.SlowToComplete` on a pool of
    two workers holding short leases."""
    deployment = {"name": "v1", "backend": "python", "workers": POOL, "options": {
        "predictor": "crash_predictors:SlowToComplete", "python_path": [str(PREDICTORS)]}}
    config = write_config(tmp_path / "config.yaml",
                          endpoints=[{"name": "work", "deployments": [deployment]}])
    server = serve(server_factory, db, config, "--workers", "1",
                   "--lease-seconds", str(LEASE_S))
    jobs, peek = Jobs(server.base_url), Peek(store_url(server, db))
    yield server, jobs, peek
    jobs.http.close()
    peek.close()


def _results(job: dict[str, Any]) -> list[dict[str, Any]]:
    """The rows of the job's results file, read where it was written."""
    data = Path(job["results_url"]).read_bytes()
    return [orjson.loads(line) for line in data.splitlines() if line]


def _job_ended_whole(jobs: Jobs, job: dict[str, Any], n: int) -> dict[str, Any]:
    """The job, once it has succeeded with every item exactly once in its results."""
    done = jobs.wait(job["id"], timeout=120)
    assert done["status"] == "succeeded", (done, jobs.logs(job["id"])[-3000:])
    assert done["item_counts"] == {"total": n, "succeeded": n, "failed": 0}
    indexes = sorted(row["index"] for row in _results(done))
    assert indexes == list(range(n)), f"{len(indexes)} rows for {n} items"
    return done


def _no_job_leftovers(server: Server, db: Database, done: dict[str, Any]) -> None:
    """No segment or part file of the job is left in the file store, and no half-written
    results file beside its results."""
    assert files_under(files_root(server, db), f"jobs/{done['id']}") == []
    assert sorted(p.name for p in Path(done["output_path"]).iterdir()) == ["results.jsonl"]


def _file_input(tmp_path: Path, n: int) -> dict[str, Any]:
    """A job over a file of `n` items, in batches of 2000."""
    source = tmp_path / "items.jsonl"
    source.write_bytes(b"".join(b'{"i": %d}\n' % i for i in range(n)))
    return {"delimited_files": {"paths": [str(source)], "batch_size": 2000}, "workers": 2}


def test_sigkill_of_a_jobs_enqueuer(job_site: tuple[Server, Jobs, Peek], db: Database,
                                    tmp_path: Path) -> None:
    """A file of 1M items takes seconds to cut into batches: the worker doing it is
    killed twice, after it has recorded some batches. Enqueuing resumes where it stopped,
    and every item is in the results exactly once."""
    server, jobs, peek = job_site
    n = 1_000_000
    job = jobs.submit("work", _file_input(tmp_path, n))
    kill_the_enqueuer_twice(peek, jobs, job["id"])
    done = _job_ended_whole(jobs, job, n)
    assert "resuming enqueuing after" in jobs.logs_with(job["id"], "resuming enqueuing after")
    _no_job_leftovers(server, db, done)


def test_sigkill_of_a_jobs_completer(job_site: tuple[Server, Jobs, Peek], db: Database,
                                     tmp_path: Path) -> None:
    """500k result rows take a moment to write: the worker completing the job is killed
    twice while it writes them. The next one writes them again, and the job ends with
    every item in its results exactly once."""
    server, jobs, peek = job_site
    n = 500_000
    job = jobs.submit("work", _file_input(tmp_path, n))
    partial = Path(job["output_path"]) / "results.jsonl.partial"
    kills, last_write = 0, 0

    def writing_results() -> bool:
        """Completing, with a results file being written since the last kill."""
        nonlocal last_write
        if peek.status("jobs", job["id"]) != "complete" or not partial.exists():
            return False
        written = partial.stat().st_mtime_ns
        if written <= last_write:
            return False
        last_write = written
        return True

    def killed() -> bool:
        nonlocal kills
        pid = peek.holder("jobs", job["id"], "complete")
        kills += pid is not None and kill_if(pid, writing_results)
        return kills == 2

    until(killed, 90, "the completer to be caught writing the results, twice",
          every=0.005, detail=lambda: jobs.logs(job["id"])[-3000:])
    done = _job_ended_whole(jobs, job, n)
    _no_job_leftovers(server, db, done)


def test_sigkill_during_on_job_complete(job_site: tuple[Server, Jobs, Peek], db: Database,
                                        tmp_path: Path) -> None:
    """The worker inside `on_job_complete` is killed: the next worker to complete the job
    runs it again (it ran once to its end), and the job ends with every item once."""
    server, jobs, peek = job_site
    n, marks = 40, tmp_path / "marks" / "on_job_complete"
    job = jobs.submit("work", {"item_list": {"items": list(range(n)), "batch_size": 4},
                               "workers": 2, "config": {"marks": str(marks),
                                                        "complete_sleep": 60}})

    def inside() -> int | None:
        """The pid of the worker inside the first call of `on_job_complete`."""
        lines = marks.read_text().split() if marks.exists() else []
        return int(lines[1]) if lines else None

    pid = until(inside, 60, "on_job_complete to start",
                detail=lambda: jobs.logs(job["id"])[-3000:])
    assert kill_if(pid, lambda: peek.status("jobs", job["id"]) == "complete")
    done = _job_ended_whole(jobs, job, n)
    calls = marks.read_text().splitlines()
    assert len(calls) == 3 and calls[0] == f"start {pid}", calls
    assert calls[1].split()[0] == "start" and calls[2] == calls[1].replace("start", "end")
    _no_job_leftovers(server, db, done)
