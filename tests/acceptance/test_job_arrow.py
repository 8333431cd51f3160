"""Jobs over CSV and Parquet files run on Arrow segments (issue #15), end to end: a real
`batchery serve`, its pool of workers, plain HTTP. A predictor sees the items, value and
type, that the JSON-lines route gives it; a batch whose item kills its worker is split
and the item fails alone; an enqueuer killed mid-way resumes, and every row runs once."""

from __future__ import annotations

import datetime
import decimal
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import fsspec
import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from tests.acceptance.engine_support import LEASE_S, Database, store_url
from tests.acceptance.jobs_support import Jobs, write_config
from tests.acceptance.test_crash_phases import Peek, kill_the_enqueuer_twice
from tests.conftest import Server, start_server

pytestmark = pytest.mark.slow

PREDICTOR = '''
import os


class Typed:
    """Answers each item with the Python type of each of its values, as predict got them.
    config `poison`: an item whose `name` is that ends its process, every time."""

    def __init__(self, config):
        self.poison = config.get("poison")

    def predict(self, batch):
        if self.poison is not None and any(item.get("name") == self.poison for item in batch):
            os._exit(86)
        return [{key: type(value).__name__ for key, value in item.items()} for item in batch]
'''

CSV = (
    "id,score,name,ok,missing,day,at\n"
    "1,0.5,alpha,true,,2026-01-02,2026-01-02 03:04:05\n"
    "2,inf,\"b, c\",false,,2026-02-03,2026-02-03 04:05:06\n"
    "3,nan,gamma,true,,2026-03-04,2026-03-04 05:06:07\n"
    "4,-2.25,é,false,,2026-04-05,2026-04-05 06:07:08\n")


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("arrow-jobs")
    (root / "typed_predictor.py").write_text(PREDICTOR)
    config = write_config(root / "config.yaml", [{"name": "typed", "deployments": [{
        "name": "v1", "backend": "python",
        "options": {"predictor": "typed_predictor:Typed", "python_path": [str(root)]},
        "workers": {"min": 2, "max": 2, "idle_seconds": 30}}]}])
    # Short leases: a killed worker's batch or enqueuing comes back within seconds.
    server = start_server(root, "--config", str(config), "--workers", "1",
                          "--lease-seconds", str(LEASE_S), name="arrow")
    yield server
    server.stop()


@pytest.fixture
def jobs(server: Server) -> Iterator[Jobs]:
    client = Jobs(server.base_url)
    yield client
    client.http.close()


def _rows(jobs: Jobs, job_id: str) -> list[dict[str, Any]]:
    return sorted(jobs.results(job_id), key=lambda row: row["index"])


def _seen(rows: list[dict[str, Any]]) -> bytes:
    """Each item and the types predict saw, as JSON text (where 1, 1.0 and true differ)."""
    return orjson.dumps([[row["item"], row["prediction"]] for row in rows])


def _parquet(path: Path) -> None:
    pq.write_table(pa.table({
        "id": pa.array([5, 6], pa.int32()),
        "score": pa.array([float("-inf"), 1.0], pa.float32()),
        "name": ["delta", None],
        "ok": [None, True],
        "price": pa.array([decimal.Decimal("1.50"), decimal.Decimal("-0.01")]),
        "day": [datetime.date(2026, 5, 6), None],
        "at": pa.array([datetime.datetime(2026, 5, 6, 7, 8, 9, 10), None],
                       pa.timestamp("us", tz="UTC")),
        "tags": [["a"], []],
        "blob": [b"\x00\xff", b"ok"],
    }), path)


def test_csv_and_parquet_items_match_the_json_route(jobs: Jobs, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.csv").write_text(CSV)
    _parquet(data / "b.parquet")
    columnar = ["**.csv", "**.parquet"]
    job = jobs.submit("typed", {"delimited_files": {
        "paths": [str(data)], "includes": columnar, "batch_size": 3}})
    # An NDJSON file among the inputs (an empty one: no items) keeps the JSON lines.
    (data / "c.jsonl").write_text("")
    same = jobs.submit("typed", {"delimited_files": {
        "paths": [str(data)], "includes": [*columnar, "**.jsonl"], "batch_size": 3}})
    for submitted in (job, same):
        ended = jobs.wait(submitted["id"])
        assert ended["status"] == "succeeded", (ended, jobs.logs(submitted["id"])[-3000:])
    rows, reference = _rows(jobs, job["id"]), _rows(jobs, same["id"])
    assert [row["index"] for row in rows] == list(range(6))
    assert _seen(rows) == _seen(reference)
    assert [row["batch_id"].rsplit(":", 1)[1] for row in rows] == ["0"] * 3 + ["1"] * 3
    # Spelled out: JSON's types, strings for what JSON has none of, NaN and inf as null.
    first, fifth = rows[0], rows[4]
    assert first["item"] == {"id": 1, "score": 0.5, "name": "alpha", "ok": True,
                             "missing": None, "day": "2026-01-02", "at": "2026-01-02T03:04:05"}
    assert first["prediction"] == {"id": "int", "score": "float", "name": "str", "ok": "bool",
                                   "missing": "NoneType", "day": "str", "at": "str"}
    assert [row["item"]["score"] for row in rows] == [0.5, None, None, -2.25, None, 1.0]
    assert fifth["item"] == {"id": 5, "score": None, "name": "delta", "ok": None,
                             "price": "1.50", "day": "2026-05-06",
                             "at": "2026-05-06T07:08:09.000010+00:00", "tags": ["a"],
                             "blob": "b'\\x00\\xff'"}
    assert fifth["prediction"]["tags"] == "list" and fifth["prediction"]["price"] == "str"


def test_an_arrow_batch_is_split_until_its_poison_row_fails_alone(jobs: Jobs,
                                                                  tmp_path: Path) -> None:
    n, poison = 20, 7
    source = tmp_path / "rows.csv"
    source.write_text("n,name\n" + "".join(f"{i},row-{i}\n" for i in range(n)))
    job = jobs.submit("typed", {"delimited_files": {"paths": [str(source)], "batch_size": 4},
                                "workers": 2, "config": {"poison": f"row-{poison}"}})
    # Isolating one row takes several crashes, each a lease of LEASE_S to run out.
    done = jobs.wait(job["id"], timeout=120)
    dead = jobs.listing(f"/jobs/{job['id']}/failed_batches")
    assert done["status"] == "completed_with_failures", (done, dead)
    assert [(d["first_item"], d["item_count"]) for d in dead] == [(poison, 1)], dead
    assert done["item_counts"] == {"total": n, "succeeded": n - 1, "failed": 1}
    with fsspec.open(f"{done['output_path']}/failed_batches.jsonl", "rb") as saved:
        letters = [orjson.loads(line) for line in saved.read().splitlines() if line]
    assert [d["items"] for d in letters] == [[{"n": poison, "name": f"row-{poison}"}]]
    rows = _rows(jobs, job["id"])
    assert [row["index"] for row in rows] == [i for i in range(n) if i != poison]
    assert all(row["item"] == {"n": row["index"], "name": f"row-{row['index']}"}
               for row in rows)
    assert "split it in two" in jobs.logs_with(job["id"], "split it in two")


def test_an_enqueuer_killed_mid_way_resumes_and_every_row_runs_once(
        jobs: Jobs, server: Server, tmp_path: Path) -> None:
    """A CSV of 600,000 rows (with a timestamp column, which is stored as JSON texts, so
    cutting it takes seconds): the worker cutting it is killed twice, each time after it
    has recorded more batches. Enqueuing resumes mid-file where it stopped."""
    n = 600_000
    source = tmp_path / "big.csv"
    start = datetime.datetime(2026, 1, 1)
    with source.open("w") as out:
        out.write("i,at\n")
        for block in range(0, n, 50_000):
            out.write("".join(f"{i},{start + datetime.timedelta(seconds=i)}\n"
                              for i in range(block, block + 50_000)))
    job = jobs.submit("typed", {"delimited_files": {"paths": [str(source)],
                                                    "batch_size": 1000}, "workers": 2})
    peek = Peek(store_url(server, Database("sqlite")))
    try:
        kill_the_enqueuer_twice(peek, jobs, job["id"])
    finally:
        peek.close()
    done = jobs.wait(job["id"], timeout=300)
    assert done["status"] == "succeeded", (done, jobs.logs(job["id"])[-3000:])
    assert done["item_counts"] == {"total": n, "succeeded": n, "failed": 0}
    rows = _rows(jobs, job["id"])
    assert [row["index"] for row in rows] == list(range(n))  # each exactly once
    assert all(row["item"] == {"i": row["index"], "at": (start + datetime.timedelta(
        seconds=row["index"])).isoformat()} for row in rows)
    assert "resuming enqueuing after" in jobs.logs_with(job["id"], "resuming enqueuing after")
