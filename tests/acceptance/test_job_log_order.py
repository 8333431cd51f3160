"""A job's log in time order over REST, with and without `follow`, while two real workers
write interleaved lines and a third writer flushes its lines a second late."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import httpx
import pytest
import sqlalchemy as sa

from batchery.model.jobs import LogLine
from batchery.ports.jobs import NewLogLine
from batchery.stores.sql import engine as engines
from batchery.stores.sql.store import SqlStore
from batchery.stores.sql.tables import job_logs
from tests.acceptance.jobs_support import Jobs, deployment, write_config
from tests.conftest import Server, start_server

pytestmark = pytest.mark.slow

#: How late the slow writer's lines reach the database: well inside the settle window.
LAG_S = 1.0


@pytest.fixture(scope="module")
def database(tmp_path_factory: pytest.TempPathFactory) -> str:
    return engines.sqlite_url(tmp_path_factory.mktemp("log-order-db") / "batchery.db")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory, database: str) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("log-order")
    config = write_config(root / "config.yaml", [{"name": "nums", "deployments": [
        deployment("v1", "Doubler")]}])
    server = start_server(root, "--config", str(config), "--database-url", database,
                          "--workers", "1", "--lease-seconds", "2", name="log-order")
    yield server
    server.stop()


@pytest.fixture
def jobs(server: Server) -> Iterator[Jobs]:
    client = Jobs(server.base_url)
    yield client
    client.http.close()


@pytest.fixture
def store(server: Server, database: str) -> Iterator[SqlStore]:
    store = SqlStore.from_url(database)
    yield store
    store.close()


def write_late(store: SqlStore, job_id: str, jobs: Jobs, done: threading.Event) -> None:
    """A worker whose flushes lag: each line reaches the database `LAG_S` after its time,
    after newer lines of the real workers. It stops writing once the job has ended."""
    n = 0
    while not done.is_set() and jobs.get(job_id)["ended_at"] is None:
        store.append_logs([NewLogLine(job_id=job_id, ts=time.time() - LAG_S, level="INFO",
                                      source="laggard", message=f"late line {n}")])
        n += 1
        done.wait(0.15)


def in_time_order(store: SqlStore, job_id: str) -> list[str]:
    """Every line of the job, sorted here by (ts, id) from the raw table."""
    with store.engine.begin() as conn:
        rows = conn.execute(job_logs.select().where(job_logs.c.job_id == job_id)).mappings()
        lines = [LogLine(id=r["id"], job_id=r["job_id"], ts=r["ts"], level=r["level"],
                         source=r["source"], message=r["message"]) for r in rows]
    return [x.render() for x in sorted(lines, key=lambda x: (x.ts, x.id))]


def ids_in_time_order(store: SqlStore, job_id: str) -> list[int]:
    query = (sa.select(job_logs.c.id).where(job_logs.c.job_id == job_id)
             .order_by(job_logs.c.ts, job_logs.c.id))
    with store.engine.begin() as conn:
        return list(conn.execute(query).scalars())


def test_two_workers_and_a_late_writer_read_in_time_order(server: Server, jobs: Jobs,
                                                          store: SqlStore) -> None:
    job = jobs.submit("nums", {"item_list": {"items": list(range(24)), "batch_size": 1},
                               "workers": 2, "config": {"sleep": 0.3}})
    done = threading.Event()
    laggard = threading.Thread(target=write_late, args=(store, job["id"], jobs, done))
    laggard.start()
    try:
        with httpx.stream("GET", f"{server.base_url}/api/v1/jobs/{job['id']}/logs",
                          params={"follow": "true"}, timeout=120) as response:
            assert response.status_code == 200
            followed = list(response.iter_lines())
    finally:
        done.set()
        laggard.join()
    assert jobs.get(job["id"])["status"] == "succeeded", "\n".join(followed)

    # Workers still write a line as they leave the job: read once the log holds still.
    expected, whole = in_time_order(store, job["id"]), []
    for _ in range(100):
        whole = jobs.logs(job["id"]).splitlines()
        expected, before = in_time_order(store, job["id"]), expected
        if expected == before:
            break
    assert whole == expected
    # The follower saw every line once, in order, late ones in their place, up to the
    # end of the job (only lines written after it may follow).
    assert followed == expected[:len(followed)]
    assert any("job ended: succeeded" in x for x in followed)
    sources = {x.split()[2] for x in expected}
    assert "laggard:" in sources and len(sources) >= 3, sources
    # The writers' lines really interleave: reading by id would not give this order.
    ids = ids_in_time_order(store, job["id"])
    assert ids != sorted(ids)

    # `after` (a line's id) resumes after that line, in time order.
    middle = len(ids) // 2
    resumed = jobs.http.get(f"/jobs/{job['id']}/logs", params={"after": ids[middle]})
    assert resumed.text.splitlines() == expected[middle + 1:]
