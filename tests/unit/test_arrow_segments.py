"""Arrow segments (issue #15): a job over CSV, TSV and Parquet files is enqueued as Arrow IPC
streams, and the items a worker reads back are exactly those a JSON line per row gave:
same values, same types (dates, timestamps and decimals as strings, NaN as null). Split
batches keep their byte range and read only their rows; an interrupted enqueue resumes
without loss or repeat; NDJSON keeps JSON lines. On a real SQLite store and file store."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import time
from pathlib import Path
from typing import Any

import orjson
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from batchery.filestores.fsspec_store import FsspecFileStore
from batchery.jobs import enqueue, inputs
from batchery.jobs.joblog import JobLog
from batchery.model.jobs import InputKind, Job, JobInput, JobOptions, job_id
from batchery.queue.lease import LeaseLost
from batchery.stores.sql.store import SqlStore

Parts = tuple[SqlStore, FsspecFileStore, JobLog]

MIXED_CSV = (
    "id,score,name,ok,missing,day,at,note\n"
    "1,0.5,alpha,true,,2026-01-02,2026-01-02 03:04:05,x\n"
    "2,inf,\"b, c\",false,,2026-02-03,2026-02-03T04:05:06,\n"
    "3,nan,gamma,true,,2026-03-04,2026-03-04 05:06:07,\"multi\nline\"\n"
    "4,-1e300,é,false,,2026-04-05,2026-04-05 06:07:08,z\n")


@pytest.fixture
def parts(tmp_path: Path, sqlite_url: str) -> Parts:
    store = SqlStore.from_url(sqlite_url)
    return store, FsspecFileStore(str(tmp_path / "files")), JobLog(store, "test")


def _parquet(path: Path) -> Path:
    """A Parquet file with a column of most of Arrow's types, NaN, infinities and nulls."""
    pq.write_table(pa.table({
        "i8": pa.array([1, None, -3], pa.int8()),
        "u64": pa.array([2**64 - 1, 0, None], pa.uint64()),
        "f32": pa.array([0.1, float("nan"), None], pa.float32()),
        "f64": pa.array([1.0, float("-inf"), 2.5]),
        "flag": [True, False, None],
        "text": ["a", None, "ü"],
        "big": pa.array(["x", "y", "z"], pa.large_string()),
        "day": [datetime.date(2026, 1, 2), None, datetime.date(1999, 12, 31)],
        "at": pa.array([datetime.datetime(2026, 1, 2, 3, 4, 5), None,
                        datetime.datetime(2026, 1, 2, 3, 4, 5, 6)], pa.timestamp("us")),
        "at_utc": pa.array([datetime.datetime(2026, 1, 2, 3, 4, 5)] * 3,
                           pa.timestamp("ms", tz="UTC")),
        "clock": [datetime.time(3, 4, 5), None, datetime.time(0, 0)],
        "price": pa.array([decimal.Decimal("1.50"), None, decimal.Decimal("-0.01")]),
        "blob": [b"\xff\x00", None, b"ok"],
        "tags": [[1, 2], [], None],
        "point": [{"x": 1.5, "when": datetime.date(2026, 1, 1)}, None, {"x": float("nan"),
                                                                       "when": None}],
        "nothing": pa.array([None, None, None], pa.null()),
        "label": pa.array(["p", "q", "p"]).dictionary_encode(),
        "span": [datetime.timedelta(seconds=3), None, datetime.timedelta(days=1)],
    }), path)
    return path


def _job(store: SqlStore, paths: list[Path], batch_size: int) -> Job:
    job = Job(id=job_id(), project="p", endpoint="ep", deployment="v1",
              input=JobInput(kind=InputKind.DELIMITED_FILES, batch_size=batch_size,
                             paths=tuple(str(p) for p in paths)),
              options=JobOptions(), output_path="/tmp/x", created_at=time.time())
    store.insert_job(job)
    return job


def _run_enqueue(parts: Parts, job: Job) -> None:
    store, files, log = parts
    lease = store.claim_job_phase("w", 60, None)
    assert lease is not None and lease.job.id == job.id
    enqueue.enqueue(store, files, lease, lambda: False, log)


def _json_route(paths: list[Path]) -> list[Any]:
    """The items as a JSON line per row gave them (the route before Arrow segments)."""
    return [orjson.loads(enqueue.dump(row)) for path in paths
            for row in inputs.iter_records(str(path))]


def _read_back(parts: Parts, job: Job) -> list[Any]:
    """Every batch's items, as a worker reads them, checked to follow on one another."""
    store, files, _ = parts
    found: list[Any] = []
    for batch in store.list_job_batches(job.id):
        spec = batch.spec
        data = files.read_range(spec.segment_key, spec.start_offset, spec.end_offset)
        items = enqueue.read_items(spec, data)
        assert len(items) == spec.n_items and spec.first_item == len(found)
        found += items
    return found


def _typed(items: list[Any]) -> bytes:
    """Items as JSON text, where 1, 1.0 and true differ (== would call them equal)."""
    return orjson.dumps(items)


def test_csv_and_parquet_items_are_those_of_json_lines(parts: Parts, tmp_path: Path) -> None:
    (tmp_path / "1-mixed.csv").write_text(MIXED_CSV)
    (tmp_path / "3-tabs.tsv").write_text("id\tname\n7\tseven\n8\teight\n")
    # In the order a job reads them: its files are listed in order of their names.
    paths = [tmp_path / "1-mixed.csv", _parquet(tmp_path / "2-types.parquet"),
             tmp_path / "3-tabs.tsv"]
    job = _job(parts[0], paths, batch_size=3)
    _run_enqueue(parts, job)
    batches = parts[0].list_job_batches(job.id)
    assert {b.spec.segment_key.rsplit(".", 1)[1] for b in batches} == {"arrows"}
    assert [b.spec.n_items for b in batches] == [3, 3, 3]  # across the files' bounds
    items = _read_back(parts, job)
    assert _typed(items) == _typed(_json_route(paths))
    # What that is, spelled out: JSON's types, strings for what JSON has none of.
    assert items[0] == {"id": 1, "score": 0.5, "name": "alpha", "ok": True, "missing": None,
                        "day": "2026-01-02", "at": "2026-01-02T03:04:05", "note": "x"}
    assert [items[i]["score"] for i in range(4)] == [0.5, None, None, -1e300]
    assert items[2]["note"] == "multi\nline" and items[3]["name"] == "é"
    assert items[4]["price"] == "1.50" and items[4]["blob"] == "b'\\xff\\x00'"
    assert items[4]["at_utc"] == "2026-01-02T03:04:05+00:00"
    assert items[4]["point"] == {"x": 1.5, "when": "2026-01-01"}
    assert items[5]["f32"] is None and items[5]["f64"] is None and items[6]["point"] == {
        "x": None, "when": None}
    assert items[7:] == [{"id": 7, "name": "seven"}, {"id": 8, "name": "eight"}]


def test_a_batch_spanning_files_of_two_schemas_holds_a_stream_each(
        parts: Parts, tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("n\n1\n2\n3\n")
    (tmp_path / "b.csv").write_text("word,n\nx,1.5\ny,2.5\n")
    paths = [tmp_path / "a.csv", tmp_path / "b.csv"]
    job = _job(parts[0], paths, batch_size=4)
    _run_enqueue(parts, job)
    assert _typed(_read_back(parts, job)) == _typed(_json_route(paths))
    store, files, _ = parts
    first = store.list_job_batches(job.id)[0].spec
    data = files.read_range(first.segment_key, first.start_offset, first.end_offset)
    source = pa.BufferReader(pa.py_buffer(data))
    starts = []
    while source.tell() < len(data):
        stream = pa.ipc.open_stream(source)
        starts.append((int(stream.schema.metadata[b"first_item"]), stream.read_all().num_rows))
    assert starts == [(0, 3), (3, 1)]


def test_a_split_batch_keeps_its_range_and_reads_only_its_rows(parts: Parts,
                                                               tmp_path: Path) -> None:
    """As the runner splits an Arrow batch: same bytes, narrower first_item and n_items."""
    (tmp_path / "a.csv").write_text("n\n" + "".join(f"{i}\n" for i in range(5)))
    (tmp_path / "b.csv").write_text("n,s\n" + "".join(f"{i},t{i}\n" for i in range(5, 9)))
    job = _job(parts[0], [tmp_path / "a.csv", tmp_path / "b.csv"], batch_size=8)
    _run_enqueue(parts, job)
    store, files, _ = parts
    spec = store.list_job_batches(job.id)[0].spec
    data = files.read_range(spec.segment_key, spec.start_offset, spec.end_offset)
    whole = enqueue.read_items(spec, data)
    assert [item["n"] for item in whole] == list(range(8))
    for first, count in [(0, 4), (4, 4), (4, 2), (6, 2), (5, 1), (7, 1), (0, 1)]:
        half = dataclasses.replace(spec, first_item=first, n_items=count)
        assert enqueue.read_items(half, data) == whole[first:first + count]


def test_an_interrupted_enqueue_of_csv_files_resumes_without_loss_or_repeat(
        parts: Parts, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    store, files, log = parts
    monkeypatch.setattr(enqueue, "SEGMENT_BATCHES", 2)
    paths = []
    for f in range(3):
        path = tmp_path / f"part-{f}.csv"
        path.write_text("n,text\n" + "".join(f"{f * 7 + i},r{i}\n" for i in range(7)))
        paths.append(path)
    job = _job(store, paths, batch_size=3)
    first = store.claim_job_phase("w1", 60, None)
    assert first is not None
    flushes = 0

    def lost_after_two_segments() -> bool:
        nonlocal flushes
        flushes += 1
        return flushes > 2

    with pytest.raises(LeaseLost):
        enqueue.enqueue(store, files, first, lost_after_two_segments, log)
    store.release_job_phase(first)
    second = store.claim_job_phase("w2", 60, None)
    # 4 batches of 3: the resume starts inside the second file, mid record batch.
    assert second is not None and second.job.total_items == 12
    enqueue.enqueue(store, files, second, lambda: False, log)
    assert [item["n"] for item in _read_back(parts, job)] == list(range(21))
    assert _typed(_read_back(parts, job)) == _typed(_json_route(paths))
    log.flush()
    assert "resuming enqueuing after 4 batches (12 items)" in [
        x.message for x in store.read_logs(job.id, after=0, limit=100)]


def test_inputs_with_ndjson_keep_json_lines(parts: Parts, tmp_path: Path) -> None:
    (tmp_path / "a.csv").write_text("n\n1\n")
    (tmp_path / "b.jsonl").write_text('{"n": 2}\n')
    paths = [tmp_path / "a.csv", tmp_path / "b.jsonl"]
    job = _job(parts[0], paths, batch_size=5)
    _run_enqueue(parts, job)
    (batch,) = parts[0].list_job_batches(job.id)
    assert batch.spec.segment_key.endswith(".jsonl")
    assert _read_back(parts, job) == [{"n": 1}, {"n": 2}]


def test_an_unreadable_value_fails_enqueuing_as_json_lines_did(parts: Parts,
                                                                tmp_path: Path) -> None:
    """A nanosecond timestamp Python cannot hold: the same error, at the same step."""
    path = tmp_path / "ns.parquet"
    pq.write_table(pa.table({"at": pa.array([1_700_000_000_123_456_789],
                                            pa.timestamp("ns"))}), path)
    with pytest.raises(ValueError) as before:
        _json_route([path])
    job = _job(parts[0], [path], batch_size=2)
    with pytest.raises(ValueError) as now:
        _run_enqueue(parts, job)
    assert type(now.value) is type(before.value)
    assert str(now.value) == str(before.value) and "Nanosecond" in str(now.value)
