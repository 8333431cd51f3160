"""Streaming validation of a batch input file, and cutting it into chunks.

The validator reads each line once and never holds a line longer than it takes to parse
it. Repeated `custom_id`s are found in a fixed amount of memory, whatever the number of
lines (`dedupe`: sorted runs spilled to temporary files past a buffer); two `custom_id`s
that merely hash alike are told apart by a second pass over the suspect lines only.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from batchery.batchapi.dedupe import DuplicateFinder
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


def validate(lines: Lines, *, endpoint: str, model_known: Callable[[str], bool],
             max_tasks: int, chunk_size: int,
             reread: Callable[[], Lines] | None = None,
             tmp_dir: str | None = None) -> Report:
    """Check every line, cut chunks of `chunk_size` requests, and report problems.

    `reread` re-opens the input; it is only called when two `custom_id`s hash alike.
    `tmp_dir` holds the duplicate check's temporary files (the system's by default), which
    a batch of more than 262,144 requests needs.
    """
    report = Report()
    chunker = _Chunker(chunk_size)
    fast = _FastPath(endpoint, model_known, report.models)
    with DuplicateFinder(hash_fn=_custom_id_hash, tmp_dir=tmp_dir) as finder:
        line_no = 0
        add_chunk, ok = chunker.add, fast.custom_id
        # (line, custom_id) go to the duplicate check in blocks: cheaper than one by one.
        at: list[int] = []
        ids: list[str] = []
        for offset, raw in lines:
            line_no += 1
            custom_id = ok(raw)
            if custom_id is None:  # not plainly fine: blank, or the full check's words
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
            at.append(line_no)
            ids.append(custom_id)
            if len(ids) == _ID_BLOCK:
                finder.add_many(at, ids)
                at, ids = [], []
            add_chunk(offset, offset + len(raw), line_no)
        if ids:
            finder.add_many(at, ids)
        chunker.close()
        report.chunks = chunker.chunks
        _finish_report(report, finder, reread)
    return report


#: Requests handed to the duplicate check at once.
_ID_BLOCK = 4096


class _FastPath:
    """The question almost every line asks, answered in one step: is it a JSON object with
    a non-empty string `custom_id`, `POST`, this batch's `url` in an accepted spelling, a
    body with every required field, no streaming, and a known model? Then its `custom_id`;
    else None, and `check_line` finds the words (it alone decides what is wrong).

    Never more lenient than `check_line`: each spelling of the url it accepts is one that
    `same_endpoint` accepts, and a model is known once `model_known` said so (the models
    seen are the report's own set, which it keeps anyway)."""

    def __init__(self, endpoint: str, model_known: Callable[[str], bool],
                 models: set[str]) -> None:
        canonical = canonical_endpoint(endpoint)
        self.urls = frozenset(u for u in (endpoint, canonical, canonical.removeprefix("/v1"))
                              if same_endpoint(u, endpoint))
        self.required = request_schemas.required(endpoint)
        self.model_known, self.models = model_known, models

    def custom_id(self, raw: bytes) -> str | None:
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError:
            return None
        if type(obj) is not dict:
            return None
        custom_id, body, url = obj.get("custom_id"), obj.get("body"), obj.get("url")
        if (type(custom_id) is not str or not custom_id or obj.get("method") != "POST"
                or type(url) is not str or url not in self.urls or type(body) is not dict
                or body.get("stream") is True):
            return None
        for name in self.required:
            if body.get(name) is None:
                return None
        model = body["model"]
        if type(model) is not str:
            return None
        if model not in self.models:
            if not self.model_known(model):
                return None
            self.models.add(model)
        return custom_id


def _finish_report(report: Report, finder: DuplicateFinder,
                   reread: Callable[[], Lines] | None) -> None:
    if report.total == 0 and report.error_count == 0:
        report.add(BatchError(code="empty_file",
                              message="The input file is empty. Please ensure that the batch "
                                      "contains at least one request."))
    raw_lines = None if reread is None else (lambda: (raw for _, raw in reread()))
    found = finder.duplicates(limit=MAX_REPORTED_ERRORS, reread=raw_lines,
                              key_of=_custom_id_of)
    for line in found.lines:
        report.add(BatchError(
            code="duplicate_custom_id", param="custom_id", line=line,
            message="The custom_id for this request is a duplicate of another request."))
    report.error_count += found.count - len(found.lines)  # counted, beyond the list's cap
    report.errors.sort(key=lambda e: (e.line is None, e.line or 0))


def _custom_id_of(raw: bytes) -> str:
    """The `custom_id` of a line that validation already found to have one."""
    custom_id: str = orjson.loads(raw)["custom_id"]
    return custom_id
