"""(extension) A batch's results while it runs, and after: pages of the output and error
lines committed so far, with a cursor to carry on from.

While the batch runs, its lines are read from where the engine commits them, in this order:
the lines a retry carries over from the batch it retries (`carried.out`, `carried.err`),
chunks committed whole by older versions, then the parts, in commit order (each part's
output lines, then its error lines). Once it has ended, from its output file, then its
error file. The result files list the same lines in the same order (`phases.finalize`), so
a reader who started while the batch ran carries on in them after the output and error
lines it has read: every line comes exactly once.
"""

from __future__ import annotations

import dataclasses

from batchery.batchapi import phases
from batchery.model.batches import Batch
from batchery.model.chunks import ChunkPart, ChunkState
from batchery.model.cursors import (
    UNKNOWN,
    ResultsCursor,
    ResultsPage,
    lines_from,
    offset_after,
    split_lines,
)
from batchery.model.exceptions import Conflict
from batchery.ports.filestore import FileStore
from batchery.ports.store import ResultsStore

#: The stages of a cursor, in reading order: carried-over output and error lines, chunks
#: committed whole, parts, then the final output and error files.
STAGES = ("co", "ce", "k", "p", "fo", "fe")
#: Parts read from the store at a time.
_PARTS_PAGE = 200


def read_page(store: ResultsStore, files: FileStore, batch: Batch, cursor: ResultsCursor,
              limit: int) -> ResultsPage:
    """Up to `limit` result lines of `batch` after `cursor`."""
    if not batch.status.is_terminal:
        try:
            page = _Running(store, files, batch, limit).read(cursor)
        except FileNotFoundError:
            page = None  # its parts went away: it has just ended
        if page is not None and (page.lines or page.has_more):
            return page
        # Nothing new: the batch may have ended meanwhile, and its parts gone with it.
        ended = store.get_batch(None, batch.id)
        if ended is None or not ended.status.is_terminal:
            return page or ResultsPage([], cursor, False, False)
        batch = ended
    return _finished(store, files, batch, cursor, limit)


class _Running:
    def __init__(self, store: ResultsStore, files: FileStore, batch: Batch, limit: int) -> None:
        self.store, self.files, self.batch, self.limit = store, files, batch, limit
        self.lines: list[bytes] = []

    @property
    def room(self) -> int:
        return self.limit - len(self.lines)

    def read(self, cursor: ResultsCursor) -> ResultsPage:
        if cursor.stage in ("fo", "fe"):  # the batch ended, and ran again? never
            return ResultsPage([], cursor, False, False)
        for step in (self._carried, self._chunks, self._parts):
            cursor, full = step(cursor)
            if full:
                return ResultsPage(self.lines, cursor, True, False)
        return ResultsPage(self.lines, cursor, False, False)

    def _carried(self, cursor: ResultsCursor) -> tuple[ResultsCursor, bool]:
        if cursor.stage not in ("co", "ce"):
            return cursor, False
        for stage, kind in (("co", "out"), ("ce", "err")):
            if STAGES.index(cursor.stage) > STAGES.index(stage):
                continue
            start = cursor.at if cursor.stage == stage else 0
            key = phases.carried_key(self.batch.id, kind)
            if self.batch.retry_of is None or not _exists(self.files, key):
                continue
            with self.files.open_read(key) as stream:
                got = lines_from(stream, start, self.room)
            self.lines += got.lines
            cursor = _counted(cursor, len(got.lines), kind == "err")
            if not got.eof:
                return dataclasses.replace(cursor, stage=stage, at=got.end), True
        return dataclasses.replace(cursor, stage="k", at=0, skip=0), False

    def _chunks(self, cursor: ResultsCursor) -> tuple[ResultsCursor, bool]:
        """Chunks committed whole, by older versions (before chunks committed in parts)."""
        if cursor.stage != "k":
            return cursor, False
        whole = [c for c in self.store.list_chunks(self.batch.id)
                 if c.state is ChunkState.DONE and (c.out_key or c.err_key)
                 and c.spec.index >= cursor.at]
        for chunk in whole:
            cursor, full = self._unit(cursor, chunk.spec.index, chunk.out_key, chunk.err_key)
            if full:
                return cursor, True
        return dataclasses.replace(cursor, stage="p", at=0, skip=0), False

    def _parts(self, cursor: ResultsCursor) -> tuple[ResultsCursor, bool]:
        while True:
            found = self.store.list_parts_after(self.batch.id, cursor.at - 1, _PARTS_PAGE)
            for part_id, part in found:
                cursor, full = self._part(cursor, part_id, part)
                if full:
                    return cursor, True
            if len(found) < _PARTS_PAGE:
                return cursor, False

    def _part(self, cursor: ResultsCursor, part_id: int,
              part: ChunkPart) -> tuple[ResultsCursor, bool]:
        return self._unit(cursor, part_id, part.out_key, part.err_key)

    def _unit(self, cursor: ResultsCursor, unit: int, out_key: str | None,
              err_key: str | None) -> tuple[ResultsCursor, bool]:
        """Read a part (or a chunk) whole: its output lines, then its error lines. With no
        room left, the cursor points at it; one read in part points into it."""
        if self.room == 0:
            return dataclasses.replace(cursor, at=unit, skip=0), True
        outs, errs = self._read(out_key), self._read(err_key)
        start = cursor.skip if unit == cursor.at else 0
        taken = (outs + errs)[start:start + self.room]
        self.lines += taken
        n_out = max(0, min(len(outs), start + len(taken)) - start)
        cursor = _counted(_counted(cursor, n_out, False), len(taken) - n_out, True)
        if start + len(taken) < len(outs) + len(errs):
            return dataclasses.replace(cursor, at=unit, skip=start + len(taken)), True
        return dataclasses.replace(cursor, at=unit + 1, skip=0), False

    def _read(self, key: str | None) -> list[bytes]:
        if not key:
            return []
        with self.files.open_read(key) as stream:
            return split_lines(stream.read())


def _counted(cursor: ResultsCursor, n: int, errors: bool) -> ResultsCursor:
    if errors:
        return dataclasses.replace(cursor, err=cursor.err + n)
    return dataclasses.replace(cursor, out=cursor.out + n)


def _finished(store: ResultsStore, files: FileStore, batch: Batch, cursor: ResultsCursor,
              limit: int) -> ResultsPage:
    """The lines of an ended batch's output file, then of its error file, after `cursor`.
    A cursor given while it ran carries on after the lines it counted."""
    if cursor.stage not in ("fo", "fe"):
        cursor = ResultsCursor("fo", UNKNOWN, 0, cursor.out, cursor.err)
    lines: list[bytes] = []
    for stage, file_id, errors in (("fo", batch.output_file_id, False),
                                   ("fe", batch.error_file_id, True)):
        if STAGES.index(cursor.stage) > STAGES.index(stage):
            continue
        key = _result_key(store, batch, file_id)
        if key is not None:
            with files.open_read(key) as stream:
                read_so_far = cursor.err if errors else cursor.out
                start = cursor.at if cursor.at != UNKNOWN else offset_after(stream,
                                                                             read_so_far)
                got = lines_from(stream, start, limit - len(lines))
            lines += got.lines
            cursor = _counted(cursor, len(got.lines), errors)
            if not got.eof:
                return ResultsPage(lines, dataclasses.replace(cursor, stage=stage, at=got.end),
                                   True, False)
            cursor = dataclasses.replace(cursor, stage=stage, at=got.end)
        if stage == "fo":
            cursor = dataclasses.replace(cursor, stage="fe", at=UNKNOWN)
    return ResultsPage(lines, cursor, False, True)


def _result_key(store: ResultsStore, batch: Batch, file_id: str | None) -> str | None:
    if file_id is None:
        return None
    record = store.get_file(None, file_id)
    if record is None:
        raise Conflict(f"The result file {file_id} of batch {batch.id} was deleted, so its "
                       f"results can no longer be read.")
    return record.storage_key



def _exists(files: FileStore, key: str) -> bool:
    try:
        files.size(key)
    except FileNotFoundError:
        return False
    return True
