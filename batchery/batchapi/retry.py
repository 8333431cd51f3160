"""(extension) Retrying only what failed: `POST /v1/batches/{id}/retry` and
`POST /v1/messages/batches/{id}/retry`.

A retry is a new batch, `retry_of` the ended batch it retries. Its input holds the lines of
the original whose result is worth another try (rebuilt from the original's input by
`custom_id`); everything else the original answered is carried over: copied, when the
retry is created, to `carried.out` and `carried.err` under the retry's parts prefix, which
come first in its result files (`phases.finalize`). So its output file holds every line
that succeeded in the original or the retry, exactly once, its error file only what still
fails, and its counts cover the whole original input from the start. A line that
succeeded is never sent to a model again: only error lines are candidates.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import IO, Any

import orjson

from batchery.batchapi import phases
from batchery.batchapi.message_batches import message_batch_id
from batchery.model import ids
from batchery.model.batches import Batch, BatchStatus
from batchery.model.exceptions import Conflict, InvalidRequest
from batchery.model.files import BATCH_FILE_TTL_S, FileRecord, Purpose
from batchery.ports.filestore import FileStore
from batchery.ports.store import ResultsStore
from batchery.wire.anthropic import MESSAGES_ENDPOINT

#: OpenAI error codes of lines rerun by default: the request never got an answer because
#: the batch was cancelled or expired, its chunk failed on the server, its worker kept
#: dying, or it was rate limited. Replies with an HTTP status of 408, 429 or 5xx are rerun
#: too. `budget_exceeded` (a spend ceiling stopped the batch) is not: rerunning spends.
DEFAULT_CODES = frozenset({"batch_cancelled", "batch_expired", "server_error", "worker_crashed",
                           "rate_limit_exceeded", "timeout"})
_RETRIABLE_STATUS = frozenset({408, 429})
#: Anthropic results rerun by default: canceled and expired requests, and errored ones of
#: these error types.
MESSAGE_DEFAULT_CODES = frozenset({"canceled", "expired", "api_error", "overloaded_error",
                                   "rate_limit_error", "timeout_error"})
MAX_INCLUDE = 100
#: The code of lines a spend ceiling stopped.
BUDGET_EXCEEDED = "budget_exceeded"


def parse_include(value: Any) -> frozenset[str] | None:
    """The body's `include`: which error codes to rerun (None: the default ones)."""
    if value is None:
        return None
    if not isinstance(value, list) or not 1 <= len(value) <= MAX_INCLUDE \
            or not all(isinstance(v, str) and v for v in value):
        raise InvalidRequest(f"Invalid value for 'include': expected a list of 1 to "
                             f"{MAX_INCLUDE} error codes (strings), such as "
                             f"[\"server_error\", \"429\", \"5xx\"].",
                             param="include", code="invalid_value")
    return frozenset(value)


def line_codes(line: dict[str, Any], messages: bool) -> set[str]:
    """The codes `include` matches a result line by. OpenAI: the line's `error.code`, or its
    reply's HTTP status (`"500"`, and its class `"5xx"`) and the reply's `error.code` and
    `error.type`. Anthropic: the result's type (`errored`, `canceled`, `expired`) and its
    error's type (`api_error`, …), and `budget_exceeded` for a request a spend ceiling
    stopped."""
    if messages:
        result = _dict(line.get("result"))
        error = _dict(_dict(result.get("error")).get("error"))
        found = {result.get("type"), error.get("type")}
        message = error.get("message")
        if isinstance(message, str) and message.startswith(f"{BUDGET_EXCEEDED}:"):
            found.add(BUDGET_EXCEEDED)  # a spend ceiling stopped it: an `api_error` in form
    else:
        found = {_dict(line.get("error")).get("code")}
        response = _dict(line.get("response"))
        status = response.get("status_code")
        if isinstance(status, int) and not isinstance(status, bool):
            found |= {str(status), f"{status // 100}xx"}
        error = _dict(_dict(response.get("body")).get("error"))
        found |= {error.get("code"), error.get("type")}
    return {code for code in found if isinstance(code, str) and code}


def rerun(line: dict[str, Any], messages: bool, include: frozenset[str] | None) -> bool:
    """Whether a failed line runs again: by default when its error is retriable."""
    codes = line_codes(line, messages)
    if include is not None:
        return bool(codes & include)
    if messages:
        return BUDGET_EXCEEDED not in codes and bool(codes & MESSAGE_DEFAULT_CODES)
    status = _dict(line.get("response")).get("status_code")
    retriable_status = isinstance(status, int) and (status in _RETRIABLE_STATUS
                                                    or status >= 500)
    return retriable_status or _dict(line.get("error")).get("code") in DEFAULT_CODES


def _dict(value: Any) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


@dataclass(frozen=True, kw_only=True, slots=True)
class RetryRules:
    """What the service that makes the retry puts on new batches."""

    window_s: int
    chunk_size: int
    max_tasks: int
    now: int


def retry_batch(store: ResultsStore, files: FileStore, original: Batch,
                include: frozenset[str] | None, rules: RetryRules) -> Batch:
    """A new batch that reruns the failed lines of `original` (ended) worth another try."""
    messages = original.endpoint == MESSAGES_ENDPOINT
    if not original.status.is_terminal:
        raise Conflict(f"The batch {original.id} is {original.status.value}: only a batch that "
                       f"has ended (completed, failed, expired or cancelled) can be retried.")
    source = _input_key(store, files, original)
    new_id = message_batch_id() if messages else ids.batch_id()
    carry = _Carry(new_id, messages)
    try:
        carry.collect(store, files, original, include)
        if not carry.rerun:
            raise Conflict(_nothing_to_rerun(original, include))
        record, found = _write_input(files, source, carry.rerun, original, rules)
    except BaseException:
        files.delete_prefix(phases.parts_prefix(new_id))
        raise
    store.insert_file(record)
    batch = Batch(
        id=new_id, project=original.project, endpoint=original.endpoint,
        input_file_id=record.id,
        completion_window="24h" if messages else original.completion_window,
        status=BatchStatus.VALIDATING, created_at=rules.now,
        expires_at=rules.now + rules.window_s, metadata=original.metadata,
        chunk_size=rules.chunk_size, max_tasks=rules.max_tasks,
        webhook_url=original.webhook_url,
        # An OpenAI batch pins its input at creation; a message batch's is its own file.
        input_key=None if messages else record.storage_key,
        # Anthropic counts what is still processing; OpenAI's counts cover the whole input.
        total=found if messages else carry.ok + carry.failed + found,
        completed=carry.ok, failed=carry.failed, retry_of=original.id,
        priority=original.priority, max_cost=original.max_cost,
        max_total_tokens=original.max_total_tokens)
    store.insert_batch(batch)
    return batch


def _input_key(store: ResultsStore, files: FileStore, original: Batch) -> str:
    """The blob of the original's input, which the retry's lines are rebuilt from."""
    record = store.get_file(None, original.input_file_id)
    key = original.input_key or (record.storage_key if record is not None else None)
    if key is None or not _exists(files, key):
        raise Conflict(f"The input file {original.input_file_id} of batch {original.id} is "
                       f"gone, so its lines cannot be rebuilt for a retry: upload them again "
                       f"and create a new batch.")
    return key


def _nothing_to_rerun(original: Batch, include: frozenset[str] | None) -> str:
    if original.status is BatchStatus.FAILED and original.output_file_id is None \
            and original.error_file_id is None:
        return (f"The batch {original.id} failed before its lines ran (see its errors): "
                f"there is nothing to retry. Fix its input and create a new batch.")
    which = (f"an error code in 'include' ({', '.join(sorted(include))})" if include
             else "a retriable error (server errors, rate limits, timeouts, cancelled or "
                  "expired lines; choose others with 'include')")
    return f"No line of the batch {original.id} failed with {which}: there is nothing to retry."


@dataclass
class _Carry:
    """Sorts the original's result lines: those to rerun (by custom_id), and those carried
    over as they are."""

    batch_id: str
    messages: bool
    rerun: set[str] = field(default_factory=set)
    ok: int = 0
    failed: int = 0

    def collect(self, store: ResultsStore, files: FileStore, original: Batch,
                include: frozenset[str] | None) -> None:
        with files.open_write(phases.carried_key(self.batch_id, "out")) as out, \
                files.open_write(phases.carried_key(self.batch_id, "err")) as err:
            for line, raw, in_output in _result_lines(store, files, original):
                self._sort(line, raw, in_output, include, out, err)
        for kind in ("out", "err"):  # an empty one is no source of lines
            key = phases.carried_key(self.batch_id, kind)
            if files.size(key) == 0:
                files.delete(key)

    def _sort(self, line: dict[str, Any], raw: bytes, in_output: bool,
              include: frozenset[str] | None, out: IO[bytes], err: IO[bytes]) -> None:
        succeeded = (line.get("result", {}).get("type") == "succeeded" if self.messages
                     else in_output)
        if succeeded:
            out.write(raw)
            self.ok += 1
        elif rerun(line, self.messages, include):
            self.rerun.add(str(line["custom_id"]))
        else:
            # Anthropic batches have one results file: what still fails stays in it.
            (out if self.messages else err).write(raw)
            self.failed += 1


def _result_lines(store: ResultsStore, files: FileStore,
                  original: Batch) -> Iterator[tuple[dict[str, Any], bytes, bool]]:
    """Every result line of the original: (parsed, raw LF-terminated, from the output)."""
    for file_id, in_output in ((original.output_file_id, True),
                               (original.error_file_id, False)):
        if file_id is None:
            continue
        record = store.get_file(None, file_id)
        if record is None:
            raise Conflict(f"The result file {file_id} of batch {original.id} was deleted, so "
                           f"the lines it answered cannot be carried over to a retry.")
        with files.open_read(record.storage_key) as stream:
            for raw in stream:
                if raw.strip():
                    yield (orjson.loads(raw), raw if raw.endswith(b"\n") else raw + b"\n",
                           in_output)


def _write_input(files: FileStore, source: str, wanted: set[str], original: Batch,
                 rules: RetryRules) -> tuple[FileRecord, int]:
    """The retry's input file: the original's lines to rerun, in their order."""
    file_id = ids.file_id()
    key = f"files/{file_id}"
    found = 0
    with files.open_read(source) as lines, files.open_write(key) as out:
        for raw in lines:
            if raw.strip() and _custom_id(raw) in wanted:
                out.write(raw if raw.endswith(b"\n") else raw + b"\n")
                found += 1
    messages = original.endpoint == MESSAGES_ENDPOINT
    record = FileRecord(
        id=file_id, project=original.project,
        filename=("message_batch_requests.jsonl" if messages
                  else f"batch_{original.id}_retry.jsonl"),
        purpose=(Purpose.MESSAGE_BATCH if messages else Purpose.BATCH).value,
        bytes=files.size(key), created_at=rules.now,
        expires_at=None if messages else rules.now + BATCH_FILE_TTL_S, storage_key=key)
    return record, found


def _custom_id(raw: bytes) -> str | None:
    with contextlib.suppress(ValueError, TypeError, KeyError):
        return str(orjson.loads(raw)["custom_id"])
    return None


def _exists(files: FileStore, key: str) -> bool:
    try:
        files.size(key)
    except FileNotFoundError:
        return False
    return True
