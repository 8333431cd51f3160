"""(extension) A job's results while it runs, and after: pages of rows with a cursor to
carry on from, as for batches (`batchery.model.cursors`).

While the job runs, rows are read from its succeeded batches' part files in batch order
(`idx`), up to the first batch still queued or running: a batch that ends later never
lands behind the cursor. A retry's rows carried over from the job it retries (that job's
results file) come first. Once the job has ended, from its results file, which holds the
same rows in the same order (`runner._result_parts`): a reader who started while the job
ran carries on after the rows it has read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import IO

import fsspec

from batchery.model.cursors import (
    UNKNOWN,
    ResultsCursor,
    ResultsPage,
    lines_from,
    offset_after,
    split_lines,
)
from batchery.model.exceptions import NotFound
from batchery.model.jobs import OPEN_BATCH_STATES, BatchState, Job, JobStage
from batchery.ports.jobs import JobRecords

#: The stages of a job's cursor: the rows a retry carries over, the batches' parts, then
#: the results file.
STAGES = ("jo", "jb", "jf")
#: The URL of a part file, from its key in the file store.
PartUrl = Callable[[str], str]


@contextmanager
def _open(url: str) -> Iterator[IO[bytes]]:
    with fsspec.open(url, "rb") as stream:
        yield stream


def carried_results(store: JobRecords, job: Job) -> str | None:
    """The results file whose rows a retry carries over: that of the job it retries, if
    it is there."""
    if job.retry_of is None:
        return None
    original = store.get_job(None, job.retry_of)
    url = original.results_url if original is not None else None
    if url is None:
        return None
    fs, path = fsspec.core.url_to_fs(url)
    return url if fs.exists(path) else None


def read_page(store: JobRecords, job: Job, cursor: ResultsCursor, limit: int,
              part_url: PartUrl) -> ResultsPage:
    """Up to `limit` result rows of `job` after `cursor`."""
    if job.stage is not JobStage.DONE:
        try:
            page: ResultsPage | None = _running(store, job, cursor, limit, part_url)
        except FileNotFoundError:
            page = None  # its parts went away: it has just ended
        if page is not None and (page.lines or page.has_more):
            return page
        ended = store.get_job(None, job.id)
        if ended is None or ended.stage is not JobStage.DONE:
            return page or ResultsPage([], cursor, False, False)
        job = ended
    return _finished(job, cursor, limit)


def _running(store: JobRecords, job: Job, cursor: ResultsCursor, limit: int,
             part_url: PartUrl) -> ResultsPage:
    lines: list[bytes] = []
    if cursor.stage == "jo":
        url = carried_results(store, job)
        if url is not None:
            with _open(url) as stream:
                got = lines_from(stream, cursor.at, limit)
            lines += got.lines
            cursor = dataclasses.replace(cursor, at=got.end, out=cursor.out + len(got.lines))
            if not got.eof:
                return ResultsPage(lines, cursor, True, False)
        cursor = dataclasses.replace(cursor, stage="jb", at=0, skip=0)
    if cursor.stage != "jb":
        return ResultsPage(lines, cursor, False, False)
    for batch in store.list_job_batches(job.id):
        index = batch.spec.index
        if index < cursor.at:
            continue
        if batch.state.value in OPEN_BATCH_STATES:
            break  # rows after it wait until it has ended
        if batch.state is BatchState.SUCCEEDED and batch.out_key:
            room = limit - len(lines)
            if room == 0:
                return ResultsPage(lines, dataclasses.replace(cursor, at=index, skip=0),
                                   True, False)
            with _open(part_url(batch.out_key)) as stream:
                rows = split_lines(stream.read())
            start = cursor.skip if index == cursor.at else 0
            taken = rows[start:start + room]
            lines += taken
            cursor = dataclasses.replace(cursor, out=cursor.out + len(taken))
            if start + len(taken) < len(rows):
                return ResultsPage(lines, dataclasses.replace(
                    cursor, at=index, skip=start + len(taken)), True, False)
        cursor = dataclasses.replace(cursor, at=index + 1, skip=0)
    return ResultsPage(lines, cursor, False, False)


def _finished(job: Job, cursor: ResultsCursor, limit: int) -> ResultsPage:
    if job.results_url is None:
        raise NotFound("This job has no results file.", param="id")
    if cursor.stage != "jf":
        cursor = ResultsCursor("jf", UNKNOWN, 0, cursor.out, 0)
    with _open(job.results_url) as stream:
        start = cursor.at if cursor.at != UNKNOWN else offset_after(stream, cursor.out)
        got = lines_from(stream, start, limit)
    cursor = dataclasses.replace(cursor, at=got.end, out=cursor.out + len(got.lines))
    return ResultsPage(got.lines, cursor, not got.eof, got.eof)
