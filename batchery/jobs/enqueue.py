"""Enqueuing: streaming a job's input into batches, written to segment files of the file
store; each batch is recorded as a byte range of one. Memory holds one segment at most,
whatever the dataset's size. Enqueuing resumes where it stopped: the input is read in the
same order again, and what was recorded is skipped.

Two segment formats, told apart by the key's suffix:

* `.jsonl`: a JSON line per item (item lists, file paths, NDJSON files, and any input
  that mixes NDJSON with other files);
* `.arrows`: for inputs of CSV, TSV and Parquet files only, each batch's rows are Arrow
  IPC streams (schema and LZ4-compressed record batches; one stream per schema, when the
  batch spans files that differ), never turned into Python objects here. Each stream's schema
  metadata `first_item` is the job-wide index of its first row, so that a batch split in
  two keeps its byte range and narrows its items. Columns are stored as `inputs.jsonable`
  makes them, so the items a worker reads are those the JSON lines would have given.
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson

from batchery.jobs import inputs
from batchery.jobs.joblog import JobLog
from batchery.model.jobs import BatchSpec, InputKind, Job, JobInput, JobLease
from batchery.ports.filestore import FileStore
from batchery.ports.jobs import JobPhaseQueue
from batchery.ports.store import FileRecords
from batchery.queue.lease import LeaseLost

#: A segment file is cut after this many batches or bytes, whichever comes first.
SEGMENT_BATCHES = 100
SEGMENT_BYTES = 8 << 20
JSON_SUFFIX = ".jsonl"
ARROW_SUFFIX = ".arrows"
#: The schema metadata key of an Arrow segment stream: the index of its first row.
FIRST_ITEM = b"first_item"


class EnqueueError(Exception):
    """The input cannot be enqueued, and trying again will not help."""


#: Finds a project's uploaded file by id, as a source to read.
Resolver = Callable[[str], inputs.Source]


def iter_items(job_input: JobInput, resolve: Resolver | None = None) -> Iterator[Any]:
    """Every item of the input, always in the same order: the files the paths list,
    then the uploaded files given by id (which `resolve` finds)."""
    yield from _items(job_input, _sources(job_input, resolve))


def _items(job_input: JobInput, found: list[inputs.Source]) -> Iterator[Any]:
    if job_input.kind is InputKind.ITEM_LIST:
        yield from job_input.items or []
    elif job_input.kind is InputKind.FILE_PATH_LISTER:
        yield from (source.url for source in found)
    else:
        for source in found:
            yield from inputs.iter_records(source)


def _sources(job_input: JobInput, resolve: Resolver | None) -> list[inputs.Source]:
    """The files the input reads, in order; none for an item list."""
    param = job_input.kind.value
    found: list[inputs.Source] = []
    if job_input.kind is InputKind.ITEM_LIST:
        return found
    if job_input.paths:
        selection = inputs.FileSelection(paths=job_input.paths, includes=job_input.includes,
                                         excludes=job_input.excludes)
        found = [inputs.Source.of(url) for url in inputs.list_files(selection, param=param)]
    if job_input.file_ids and resolve is None:
        raise EnqueueError("this worker cannot read uploaded files (file_ids)")
    found += [resolve(file_id) for file_id in job_input.file_ids] if resolve else []
    if job_input.kind is InputKind.DELIMITED_FILES:
        inputs.check_delimited(found, param=param)
    return found


def resolver(store: FileRecords, files: FileStore, job: Job) -> Resolver:
    """Finds `job`'s project's uploaded files, as the job's submission did."""
    def resolve(file_id: str) -> inputs.Source:
        return inputs.uploaded(store.get_file(job.project, file_id), file_id, files.url,
                               param=job.input.kind.value, now=time.time())
    return resolve


def dump(value: Any) -> bytes:
    return inputs.dump(value)


def enqueue(store: JobPhaseQueue, files: FileStore, lease: JobLease,
            lost: Callable[[], bool], log: JobLog, *, resolve: Resolver | None = None,
            on_batches: Callable[[], None] = lambda: None) -> None:
    """Cut the job's input into batches. `on_batches` is called as each segment's batches
    are queued (workers may start on them while enqueuing goes on)."""
    job = lease.job
    size = job.input.batch_size
    index, first = job.total_batch_count, job.total_items
    if first:
        log.write(job.id, "INFO", f"resuming enqueuing after {index} batches ({first} items)")
    else:
        log.write(job.id, "INFO", f"partitioning the {job.input.kind.value} input into "
                                  f"batches of {size}")
    suffix, batches = _cut(job.input, resolve, size, first)
    segment, specs = bytearray(), []
    for data, count in batches:
        start = len(segment)
        segment += data
        specs.append(BatchSpec(index=index, segment_key="", start_offset=start,
                               end_offset=len(segment), first_item=first, n_items=count))
        index, first = index + 1, first + count
        if len(specs) >= SEGMENT_BATCHES or len(segment) >= SEGMENT_BYTES:
            _flush(store, files, lease, segment, specs, lost, suffix)
            on_batches()
            log.write(job.id, "INFO", f"enqueued {index} batches")
            segment, specs = bytearray(), []
    if specs:
        _flush(store, files, lease, segment, specs, lost, suffix)
        on_batches()
    if index == 0:
        raise EnqueueError("the input holds no items")
    if not store.finish_enqueue(lease):
        raise LeaseLost
    log.write(job.id, "INFO", f"completed enqueuing a total of {index} batches "
                              f"({first} items)")


def _cut(job_input: JobInput, resolve: Resolver | None, size: int,
         first: int) -> tuple[str, Iterator[tuple[Any, int]]]:
    """The segment format, and the input's batches after its first `first` items: each
    as (its bytes in a segment, its item count)."""
    found = _sources(job_input, resolve)
    if job_input.kind is InputKind.DELIMITED_FILES and found \
            and all(inputs.is_columnar(source) for source in found):
        return ARROW_SUFFIX, _arrow_batches(found, size, first)
    items = itertools.islice(_items(job_input, found), first, None)
    return JSON_SUFFIX, _json_batches(items, size)


def _json_batches(items: Iterator[Any], size: int) -> Iterator[tuple[bytes, int]]:
    while batch := list(itertools.islice(items, size)):
        yield b"".join(dump(item) + b"\n" for item in batch), len(batch)


def _arrow_batches(sources: list[inputs.Source], size: int,
                   first: int) -> Iterator[tuple[Any, int]]:
    """Batches of `size` rows, sliced from the files' record batches (never turned into
    Python objects, but for columns JSON has no type for: see `inputs.jsonable`)."""
    pending: list[Any] = []
    count = 0
    for raw, source in _skip(_record_batches(sources), first):
        rows = inputs.jsonable(raw, source)
        while rows.num_rows:
            take = min(size - count, rows.num_rows)
            pending.append(rows.slice(0, take))
            rows, count = rows.slice(take), count + take
            if count == size:
                yield _streams(pending, first), count
                pending, first, count = [], first + count, 0
    if pending:
        yield _streams(pending, first), count


def _record_batches(sources: list[inputs.Source]) -> Iterator[tuple[Any, inputs.Source]]:
    for source in sources:
        for batch in inputs.iter_batches(source):
            yield batch, source


def _skip(batches: Iterator[tuple[Any, inputs.Source]],
          count: int) -> Iterator[tuple[Any, inputs.Source]]:
    """`batches` less their first `count` rows: whole record batches are passed over by
    their row count, and the one the cut falls in is sliced."""
    for batch, source in batches:
        if count >= batch.num_rows:
            count -= batch.num_rows
            continue
        yield (batch.slice(count) if count else batch), source
        count = 0


def _streams(pieces: list[Any], first: int) -> Any:
    """One IPC stream per run of `pieces` that share a schema, one after the other; each
    stream's schema metadata says the index of its first row."""
    import pyarrow as pa

    # LZ4: a segment of text columns shrinks several times over, for less CPU than the
    # copies it saves; readers find the codec in the stream.
    # On the enqueuer's own thread: workers beside it want the other cores.
    options = pa.ipc.IpcWriteOptions(
        compression="lz4" if pa.Codec.is_available("lz4") else None, use_threads=False)
    sink = pa.BufferOutputStream()
    start = 0
    while start < len(pieces):
        schema = pieces[start].schema
        end = start + 1
        while end < len(pieces) and pieces[end].schema.equals(schema, check_metadata=True):
            end += 1
        with pa.ipc.new_stream(sink, schema.with_metadata({FIRST_ITEM: str(first)}),
                               options=options) as out:
            for piece in pieces[start:end]:
                out.write_batch(piece)
                first += piece.num_rows
        start = end
    return sink.getvalue()


def read_items(spec: BatchSpec, data: bytes) -> list[Any]:
    """The items of the batch `spec`, from `data`, the bytes of its range of the segment."""
    if not is_arrow(spec):
        return [orjson.loads(line) for line in data.splitlines() if line]
    import pyarrow as pa

    end = spec.first_item + spec.n_items
    items: list[Any] = []
    source = pa.BufferReader(pa.py_buffer(data))
    while source.tell() < len(data):
        stream = pa.ipc.open_stream(source, options=pa.ipc.IpcReadOptions(use_threads=False))
        start = int(stream.schema.metadata[FIRST_ITEM])
        table = stream.read_all()
        low, high = max(spec.first_item, start), min(end, start + table.num_rows)
        if high > low:
            items += inputs.to_items(table.slice(low - start, high - low))
    return items


def is_arrow(spec: BatchSpec) -> bool:
    """Whether the batch's segment holds Arrow streams (else JSON lines)."""
    return spec.segment_key.endswith(ARROW_SUFFIX)


def _flush(store: JobPhaseQueue, files: FileStore, lease: JobLease, segment: bytearray,
           specs: list[BatchSpec], lost: Callable[[], bool], suffix: str) -> None:
    if lost():
        raise LeaseLost
    # The token in the name keeps a segment from a lost lease apart from its successor's.
    key = f"{segment_prefix(lease.job.id)}/{specs[0].index:09d}-{lease.token}{suffix}"
    with files.open_write(key) as out:
        out.write(segment)
    placed = [BatchSpec(index=s.index, segment_key=key, start_offset=s.start_offset,
                        end_offset=s.end_offset, first_item=s.first_item, n_items=s.n_items)
              for s in specs]
    if not store.add_batches(lease, placed, time.time()):
        files.delete(key)
        raise LeaseLost


def job_prefix(job_id: str) -> str:
    return f"jobs/{job_id}"


def segment_prefix(job_id: str) -> str:
    return f"{job_prefix(job_id)}/input"


def parts_prefix(job_id: str) -> str:
    return f"{job_prefix(job_id)}/parts"
