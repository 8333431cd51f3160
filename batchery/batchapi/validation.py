"""Streaming validation of a batch input file, and cutting it into chunks.

The validator reads each line once and keeps, per request, only an 8-byte hash of its
`custom_id` (to find duplicates), so memory grows by 8 bytes a line and never holds a line
longer than it takes to parse it. Hash collisions are settled by a second, targeted pass.
"""

from __future__ import annotations

from array import array
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import orjson

from batchery.model.batches import (
    MAX_REPORTED_ERRORS,
    BatchError,
    canonical_endpoint,
    same_endpoint,
)
from batchery.model.chunks import ChunkSpec
from batchery.wire import request_schemas

#: `(byte offset, raw line)` pairs, as produced by `iter_lines`.
Lines = Iterable[tuple[int, bytes]]


def iter_lines(stream: Any) -> Iterator[tuple[int, bytes]]:
    """Yield `(offset, line)` for every line of a binary stream, newline included."""
    offset = 0
    for line in stream:
        yield offset, line
        offset += len(line)


@dataclass(kw_only=True)
class Report:
    errors: list[BatchError] = field(default_factory=list)
    error_count: int = 0
    total: int = 0
    chunks: list[ChunkSpec] = field(default_factory=list)
    models: set[str] = field(default_factory=set)

    @property
    def ok(self) -> bool:
        return self.error_count == 0

    def add(self, error: BatchError) -> None:
        self.error_count += 1
        if len(self.errors) < MAX_REPORTED_ERRORS:
            self.errors.append(error)


def _missing(param: str, line: int) -> BatchError:
    return BatchError(code="missing_required_parameter",
                      message=f"Missing required parameter: '{param}'.", param=param, line=line)


def _required(name: str, line: int) -> BatchError:
    """A body without one of its endpoint's required fields, in the hosted API's words."""
    return BatchError(code="invalid_request", message=f"{name.capitalize()} parameter is "
                                                      f"required.",
                      param=f"body.{name}", line=line)


#: What `check_line` finds: `(custom_id, model, errors)`; the first two None when absent.
LineCheck = tuple[str | None, str | None, list[BatchError]]


def check_line(raw: bytes, line: int, endpoint: str,
               model_known: Callable[[str], bool]) -> LineCheck:
    """Check one line: its envelope, then every required body field, then the model.
    Returns `(custom_id, model, errors)`; the model only when the line is fine."""
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None, None, [BatchError(code="invalid_json_line",
                                       message="This line is not parseable as valid JSON.",
                                       line=line)]
    custom_id, error = _check_envelope(obj, line, endpoint)
    if error is not None:
        return custom_id, None, [error]
    body = obj["body"]
    # Every missing field of every line is reported (up to the cap), not just the first.
    absent = request_schemas.missing(endpoint, body)
    if absent:
        return custom_id, None, [_required(name, line) for name in absent]
    if body.get("stream") is True:
        title = request_schemas.TITLES.get(canonical_endpoint(endpoint))
        return custom_id, None, [BatchError(
            code="streaming_unsupported", param="body.stream", line=line,
            message=(f"{title}: " if title else "") + "Streaming is not supported in the "
                                                      "Batch API.")]
    model = body["model"]
    if not isinstance(model, str) or not model_known(model):
        return custom_id, None, [BatchError(
            code="model_not_found", param="body.model", line=line,
            message=f"The provided model '{model}' is not supported by the Batch API.")]
    return custom_id, model, []


def _check_envelope(obj: Any, line: int, endpoint: str) -> tuple[str | None, BatchError | None]:
    """The line's `custom_id`, `method`, `url` and `body`: `(custom_id, error)`."""
    if not isinstance(obj, dict):
        return None, BatchError(code="invalid_request", line=line,
                                message="Each line must be a JSON object.")
    for key in ("custom_id", "method", "url", "body"):
        if key not in obj or obj[key] is None:
            return None, _missing(key, line)
    custom_id = obj["custom_id"]
    if not isinstance(custom_id, str) or not custom_id:
        return None, BatchError(code="invalid_request", param="custom_id", line=line,
                                message="'custom_id' must be a non-empty string.")
    if obj["method"] != "POST":
        return custom_id, BatchError(code="invalid_request", param="method", line=line,
                                     message="'method' must be 'POST'.")
    if not same_endpoint(obj["url"], endpoint):
        return custom_id, BatchError(
            code="invalid_url", param="url", line=line,
            message="The URL provided for this request does not match the batch endpoint.")
    if not isinstance(obj["body"], dict):
        return custom_id, BatchError(code="invalid_request", param="body", line=line,
                                     message="'body' must be a JSON object.")
    return custom_id, None


def _custom_id_hash(custom_id: str) -> int:
    # Python's str hash is stable within a process, which is all the dedupe pass needs.
    return hash(custom_id) or 1


class _Chunker:
    """Cuts the requests into chunks of `size`, by byte range, as they stream past."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.chunks: list[ChunkSpec] = []
        self._start = self._first = self._count = 0
        self._end = 0

    def add(self, offset: int, end: int, line_no: int) -> None:
        if self._count == 0:
            self._start, self._first = offset, line_no
        self._count += 1
        self._end = end
        if self._count == self.size:
            self.close()

    def close(self) -> None:
        if self._count:
            self.chunks.append(ChunkSpec(index=len(self.chunks), start_offset=self._start,
                                         end_offset=self._end, first_line=self._first,
                                         n_lines=self._count))
            self._count = 0


class _Hashes:
    """The custom_id hash of every line, by line number (0: none): 8 bytes a line, in an
    array that grows by an eighth at a time rather than doubling."""

    def __init__(self) -> None:
        self._values = array("q")

    def put(self, line_no: int, custom_id: str) -> None:
        missing = line_no - 1 - len(self._values)
        if missing:  # lines without a custom_id since the last one
            self._values.frombytes(bytes(8 * missing))
        self._values.append(_custom_id_hash(custom_id))

    @property
    def values(self) -> np.ndarray[Any, np.dtype[np.int64]]:
        """The hashes so far, without a copy (lines past the last custom_id are left out)."""
        return np.frombuffer(self._values, dtype=np.int64)


def validate(lines: Lines, *, endpoint: str, model_known: Callable[[str], bool],
             max_tasks: int, chunk_size: int,
             reread: Callable[[], Lines] | None = None) -> Report:
    """Check every line, cut chunks of `chunk_size` requests, and report problems.

    `reread` re-opens the input; it is only called when two `custom_id`s hash alike.
    """
    report = Report()
    hashes, chunker = _Hashes(), _Chunker(chunk_size)
    line_no = 0
    for offset, raw in lines:
        line_no += 1
        if not raw.strip():
            continue
        custom_id, model, errors = check_line(raw, line_no, endpoint, model_known)
        for error in errors:
            report.add(error)
        if model is not None:
            report.models.add(model)
        if custom_id is None:
            continue
        report.total += 1
        if report.total > max_tasks:
            report.add(BatchError(
                code="too_many_tasks",
                message=f"The number of requests in the input file exceeds the maximum "
                        f"allowed value of {max_tasks}."))
            return report
        hashes.put(line_no, custom_id)
        chunker.add(offset, offset + len(raw), line_no)
    chunker.close()
    report.chunks = chunker.chunks
    _finish_report(report, hashes.values[:line_no], reread)
    return report


def _finish_report(report: Report, hashes: np.ndarray[Any, np.dtype[np.int64]],
                   reread: Callable[[], Lines] | None) -> None:
    if report.total == 0 and report.error_count == 0:
        report.add(BatchError(code="empty_file",
                              message="The input file is empty. Please ensure that the batch "
                                      "contains at least one request."))
    for line in _duplicate_lines(hashes, reread):
        report.add(BatchError(
            code="duplicate_custom_id", param="custom_id", line=line,
            message="The custom_id for this request is a duplicate of another request."))
    report.errors.sort(key=lambda e: (e.line is None, e.line or 0))


#: Lines a step when looking for the lines that hold repeated hashes.
_BLOCK_LINES = 1 << 16


def _duplicate_lines(hashes: np.ndarray[Any, np.dtype[np.int64]],
                     reread: Callable[[], Lines] | None) -> list[int]:
    """1-based lines whose custom_id already appeared on an earlier line.

    One sorted copy of the hashes finds the values that repeat (9 bytes a line at the
    peak, beside the hashes); only the lines holding those are looked at again."""
    ordered = np.sort(hashes)
    repeats = ordered[1:][ordered[1:] == ordered[:-1]]
    del ordered
    repeats = np.unique(repeats[repeats != 0])
    if len(repeats) == 0:
        return []
    # Block by block, so that finding them takes little more memory whatever their number.
    suspects = np.concatenate([
        np.flatnonzero(np.isin(hashes[start:start + _BLOCK_LINES], repeats)) + start + 1
        for start in range(0, len(hashes), _BLOCK_LINES)])
    if reread is not None:
        return _confirm_duplicates(set(suspects.tolist()), reread)
    seen: set[int] = set()
    duplicates = []
    for line, value in zip(suspects.tolist(), hashes[suspects - 1].tolist(), strict=True):
        if value in seen:
            duplicates.append(line)
        seen.add(value)
    return duplicates


def _confirm_duplicates(suspects: set[int], reread: Callable[[], Lines]) -> list[int]:
    seen: set[str] = set()
    duplicates: list[int] = []
    for line_no, (_, raw) in enumerate(reread(), start=1):
        if line_no not in suspects:
            continue
        custom_id = orjson.loads(raw)["custom_id"]
        if custom_id in seen:
            duplicates.append(line_no)
        seen.add(custom_id)
    return duplicates
