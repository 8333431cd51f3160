"""`BatchService`: the operations behind the HTTP API and the CLI, free of any framework."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

from batchery import backends
from batchery.batchapi import estimate, outlook
from batchery.batchapi.gemini import GEMINI_ID_PREFIX
from batchery.model import idempotency as idem
from batchery.model import ids, spend
from batchery.model.batches import (
    DEFAULT_CHUNK_SIZE,
    DEFAULT_MAX_TASKS,
    SUPPORTED_ENDPOINTS,
    Batch,
    BatchStatus,
    canonical_endpoint,
    window_seconds,
)
from batchery.model.deployments import Deployment
from batchery.model.exceptions import InvalidRequest, NotFound, TooLarge
from batchery.model.files import (
    BATCH_FILE_TTL_S,
    INTERNAL_PURPOSE_PREFIX,
    MAX_EXPIRES_AFTER_S,
    MIN_EXPIRES_AFTER_S,
    UPLOAD_PURPOSES,
    FileRecord,
)
from batchery.model.idempotency import Idempotency, IdempotencyKey
from batchery.model.priority import parse_priority
from batchery.ports.filestore import FileStore
from batchery.ports.store import BatchApiStore, Page
from batchery.wire.anthropic import MESSAGES_ENDPOINT

_COPY_BUFFER = 1 << 20
MAX_METADATA_PAIRS = 16


def _quoted_list(values: Sequence[str]) -> str:
    quoted = [f"'{v}'" for v in values]
    return ", ".join(quoted[:-1]) + f", and {quoted[-1]}" if len(quoted) > 1 else quoted[0]


class BatchService:
    def __init__(self, store: BatchApiStore, files: FileStore, *,
                 chunk_size: int = DEFAULT_CHUNK_SIZE, max_tasks: int = DEFAULT_MAX_TASKS,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.files = files
        self.chunk_size = chunk_size
        self.max_tasks = max_tasks
        self.clock = clock
        self._pruner = idem.Pruner()

    def _now(self) -> int:
        return int(self.clock())

    # -- files -------------------------------------------------------------------------

    def upload(self, project: str, stream: IO[bytes], *, filename: str, purpose: str,
               expires_after_s: int | None = None, max_bytes: int | None = None,
               quota_bytes: int | None = None) -> FileRecord:
        """Store an upload. `max_bytes` caps one file and `quota_bytes` the project's live
        files together: past either, nothing is kept and TooLarge says which limit."""
        if purpose not in UPLOAD_PURPOSES:
            raise InvalidRequest(f"Invalid value: '{purpose}'. Supported values are: "
                                 f"{_quoted_list(sorted(UPLOAD_PURPOSES))}.",
                                 param="purpose", code="invalid_value")
        if expires_after_s is not None and not (
                MIN_EXPIRES_AFTER_S <= expires_after_s <= MAX_EXPIRES_AFTER_S):
            raise InvalidRequest(f"'expires_after.seconds' must be between "
                                 f"{MIN_EXPIRES_AFTER_S} and {MAX_EXPIRES_AFTER_S}.",
                                 param="expires_after.seconds", code="invalid_value")
        cap = _UploadCap(max_bytes, quota_bytes,
                         self.store.file_bytes(project, now=self._now()) if quota_bytes else 0)
        file_id = ids.file_id()
        key = f"files/{file_id}"
        try:
            with self.files.open_write(key) as out:
                _copy_capped(stream, out, cap)
        except BaseException:
            self.files.delete(key)  # no half-written blob outlives a refused upload
            raise
        now = self._now()
        ttl = expires_after_s or (BATCH_FILE_TTL_S if purpose == "batch" else None)
        record = FileRecord(id=file_id, project=project, filename=filename, purpose=purpose,
                            bytes=self.files.size(key), created_at=now,
                            expires_at=now + ttl if ttl else None, storage_key=key)
        self.store.insert_file(record)
        return record

    def get_file(self, project: str, file_id: str) -> FileRecord:
        record = self.store.get_file(project, file_id)
        if record is None or record.purpose.startswith(INTERNAL_PURPOSE_PREFIX) or (
                record.expires_at is not None and record.expires_at <= self._now()):
            raise NotFound(f"No such File object: {file_id}")
        return record

    def list_files(self, project: str, *, purpose: str | None = None, after: str | None = None,
                   limit: int = 10_000, order: str = "desc") -> Page[FileRecord]:
        if purpose is not None and purpose.startswith(INTERNAL_PURPOSE_PREFIX):
            return Page([], False)  # message batches' own files are not /v1/files' business
        if order not in ("asc", "desc"):
            raise InvalidRequest("'order' must be 'asc' or 'desc'.", param="order",
                                 code="invalid_value")
        _check_limit(limit, 10_000)
        return self.store.list_files(project, purpose=purpose, after=after, limit=limit,
                                     order=order, now=self._now())

    def open_content(self, project: str, file_id: str) -> tuple[FileRecord, IO[bytes]]:
        record = self.get_file(project, file_id)
        return record, self.files.open_read(record.storage_key)

    def delete_file(self, project: str, file_id: str) -> FileRecord:
        self.get_file(project, file_id)  # 404 for internal files too
        record = self.store.delete_file(project, file_id)
        if record is None:
            raise NotFound(f"No such File object: {file_id}")
        # A running batch may still read this file: its blob goes when that batch ends.
        if not self.store.blob_in_use(record.storage_key, record.id):
            self.files.delete(record.storage_key)
        return record

    # -- batches -----------------------------------------------------------------------

    def create_batch(self, project: str, *, input_file_id: str, endpoint: str,
                     completion_window: str = "24h", metadata: dict[str, Any] | None = None,
                     output_expires_after: Any = None, webhook_url: str | None = None,
                     max_cost: Any = None, max_total_tokens: Any = None,
                     idempotency: Idempotency | None = None, priority: Any = None) -> Batch:
        """A new batch. `webhook_url`, checked by the caller against the operator's
        allow-list, receives the batch's end event besides the project's endpoints.
        Extensions: spend ceilings, and a key that makes a replayed create return the batch
        it made."""
        if idempotency is not None and (found := self._replay(project, idempotency)):
            return found
        if canonical_endpoint(endpoint) not in SUPPORTED_ENDPOINTS:  # or without /v1
            raise InvalidRequest(f"Invalid value: '{endpoint}'. Supported values are: "
                                 f"{_quoted_list(SUPPORTED_ENDPOINTS)}.",
                                 param="endpoint", code="invalid_value")
        window = window_seconds(completion_window)
        if window is None:
            raise InvalidRequest(f"Invalid value: '{completion_window}'. Supported values "
                                 f"are: '24h', or a number and a unit of s, m, h or d, up to "
                                 f"30 days (for example '1h').",
                                 param="completion_window", code="invalid_value")
        _check_metadata(metadata)
        # Checked as the hosted API does; the output files' expiry is not applied yet.
        _check_output_expiry(output_expires_after)
        record = self._check_input_file(project, input_file_id)
        limits = spend.ceilings(max_cost, max_total_tokens)
        rank = parse_priority(priority)
        now = self._now()
        # The blob is pinned from here on: a client that deletes the input file right after
        # creating the batch (cleaning up) does not take it away from the batch.
        batch = Batch(id=ids.batch_id(), project=project, endpoint=endpoint,
                      input_file_id=input_file_id, completion_window=completion_window,
                      status=BatchStatus.VALIDATING, created_at=now, expires_at=now + window,
                      metadata=metadata, chunk_size=self.chunk_size, max_tasks=self.max_tasks,
                      webhook_url=webhook_url,
                      input_key=record.storage_key if record is not None else None,
                      max_cost=limits.max_cost, max_total_tokens=limits.max_total_tokens,
                      priority=rank, warnings=outlook.warnings(
                          self.store, priority=rank, window_s=window, now=self.clock()))
        return self._insert(batch, idempotency)

    def _replay(self, project: str, asked: Idempotency) -> Batch | None:
        """The batch an earlier create with this key made, if any (Conflict when its
        parameters differ)."""
        found = self.store.find_key(project, idem.BATCH, asked.key,
                                    newer_than=self.clock() - idem.KEY_TTL_S)
        return None if found is None else self._replayed(found, asked)

    def _replayed(self, found: IdempotencyKey, asked: Idempotency) -> Batch:
        batch_id = idem.replayed(found, asked, "batch")
        batch = self.store.get_batch(found.project, batch_id)
        if batch is None:
            raise idem.gone(found, "batch")
        return batch

    def _insert(self, batch: Batch, asked: Idempotency | None) -> Batch:
        """Insert the batch; with a key, the same transaction takes the key, and a
        concurrent create that took it first wins: its batch is returned."""
        now = self.clock()
        key = asked.record(batch.project, idem.BATCH, batch.id, now) if asked else None
        held = self.store.insert_batch(batch, key)
        if held is not None and asked is not None:
            return self._replayed(held, asked)
        if key is not None and self._pruner.due(now):
            self.store.prune_keys(now - idem.KEY_TTL_S)
        return batch

    def _check_input_file(self, project: str, file_id: str) -> FileRecord | None:
        """A batch reads only files uploaded for batches, as on the hosted API. An unknown
        id is not refused here: the batch fails in validation, as it does there."""
        try:
            record = self.get_file(project, file_id)
        except NotFound:
            return None
        if record.purpose != "batch":
            raise InvalidRequest(f"Invalid value for 'input_file_id': the file '{file_id}' "
                                 f"has purpose '{record.purpose}', but a batch's input file "
                                 f"must be uploaded with purpose 'batch'.",
                                 param="input_file_id", code="invalid_value")
        return record

    def get_batch(self, project: str, batch_id: str) -> Batch:
        batch = self.store.get_batch(project, batch_id)
        # Anthropic and Gemini batches run on the same engine but are not OpenAI's.
        if batch is None or batch.endpoint == MESSAGES_ENDPOINT \
                or batch.id.startswith(GEMINI_ID_PREFIX):
            raise NotFound(f"No batch found with id '{batch_id}'.")
        return batch

    def list_batches(self, project: str, *, after: str | None = None,
                     limit: int = 20) -> Page[Batch]:
        _check_limit(limit, 100)
        return self.store.list_batches(project, after=after, limit=limit,
                                       exclude_endpoint=MESSAGES_ENDPOINT,
                                       exclude_id_prefix=GEMINI_ID_PREFIX)

    def cancel_batch(self, project: str, batch_id: str) -> Batch:
        self.get_batch(project, batch_id)
        return self.store.request_cancel(project, batch_id, self._now())

    def pause_batch(self, project: str, batch_id: str) -> Batch:
        """(extension) No new chunk of the batch is claimed until it is resumed."""
        self.get_batch(project, batch_id)
        return self.store.pause_batch(project, batch_id, self._now())

    def resume_batch(self, project: str, batch_id: str) -> Batch:
        """(extension) The batch's chunks are claimed again."""
        self.get_batch(project, batch_id)
        return self.store.resume_batch(project, batch_id, self._now())

    def cost_estimate(self, project: str, file_id: str,
                      model: str | None = None) -> estimate.Estimate:
        """(extension) The input tokens and cost of a batch input file, estimated before a
        batch is made (`estimate` says how), at `model`'s prices or each line's model's."""
        if model is not None and not model:
            raise InvalidRequest("Invalid value for 'model': expected the name of a model, "
                                 "or no 'model' to price each line at its own model.",
                                 param="model", code="invalid_value")
        record = self.get_file(project, file_id)
        prices = {d.name: d.prices for d in self.list_models(project)}
        if model is not None and model not in prices:
            raise NotFound(f"The model '{model}' does not exist or you do not have access to "
                           f"it.", param="model")
        with self.files.open_read(record.storage_key) as stream:
            return estimate.estimate(file_id, stream, prices, model)

    def list_models(self, project: str) -> list[Deployment]:
        """The deployments, and endpoints' names, that `project`'s batches may use."""
        return [d for d in self.store.list_deployments() if d.usable_by(project)]

    def model_endpoints(self, project: str) -> list[tuple[Deployment, frozenset[str]]]:
        """The models `project`'s batches may use, each with the endpoints it serves."""
        return [(d, backends.endpoints_of(d)) for d in self.list_models(project)]


@dataclass(frozen=True, slots=True)
class _UploadCap:
    max_bytes: int | None
    quota_bytes: int | None
    used_bytes: int

    @property
    def allowed(self) -> int | None:
        """The most bytes this upload may hold, or None for no limit."""
        caps = [c for c in (self.max_bytes, self.quota_left) if c is not None]
        return min(caps) if caps else None

    @property
    def quota_left(self) -> int | None:
        if self.quota_bytes is None:
            return None
        return max(self.quota_bytes - self.used_bytes, 0)

    def refusal(self) -> TooLarge:
        if self.max_bytes is not None and self.max_bytes == self.allowed:
            return TooLarge(f"The file is larger than this server's upload limit of "
                            f"{self.max_bytes} bytes.", param="file")
        return TooLarge(f"The file would pass this project's storage quota: its live files "
                        f"use {self.used_bytes} of {self.quota_bytes} bytes, so uploads may "
                        f"add at most {self.quota_left} more bytes. Delete files to make "
                        f"room.", param="file")


def _copy_capped(source: IO[bytes], out: IO[bytes], cap: _UploadCap) -> None:
    allowed = cap.allowed
    written = 0
    while block := source.read(_COPY_BUFFER):
        written += len(block)
        if allowed is not None and written > allowed:
            raise cap.refusal()
        out.write(block)


def _check_limit(limit: int, maximum: int) -> None:
    if not 1 <= limit <= maximum:
        raise InvalidRequest(f"'limit' must be between 1 and {maximum}.", param="limit",
                             code="invalid_value")


def _check_metadata(metadata: dict[str, Any] | None) -> None:
    if metadata is None:
        return
    if not isinstance(metadata, dict):
        raise InvalidRequest("Invalid type for 'metadata': expected an object.",
                             param="metadata", code="invalid_type")
    if len(metadata) > MAX_METADATA_PAIRS:
        raise InvalidRequest(f"'metadata' may hold at most {MAX_METADATA_PAIRS} pairs.",
                             param="metadata", code="invalid_value")
    for key, value in metadata.items():
        if len(key) > 64:
            raise InvalidRequest("Metadata keys may be at most 64 characters long.",
                                 param=f"metadata.{key}", code="invalid_value")
        if not isinstance(value, str):
            raise InvalidRequest(f"Invalid type for 'metadata.{key}': expected a string, but "
                                 f"got {_json_type(value)} instead.",
                                 param=f"metadata.{key}", code="invalid_type")
        if len(value) > 512:
            raise InvalidRequest("Metadata values may be at most 512 characters long.",
                                 param=f"metadata.{key}", code="invalid_value")


def _check_output_expiry(value: Any) -> None:
    if value is None:
        return
    where = "output_expires_after"
    if not isinstance(value, dict):
        raise InvalidRequest(f"Invalid type for '{where}': expected an object with 'anchor' "
                             f"and 'seconds', but got {_json_type(value)} instead.",
                             param=where, code="invalid_type")
    if value.get("anchor") != "created_at":
        raise InvalidRequest(f"'{where}.anchor' must be 'created_at'.", param=f"{where}.anchor",
                             code="invalid_value")
    seconds = value.get("seconds")
    if isinstance(seconds, float) and seconds.is_integer():
        seconds = int(seconds)  # JSON does not tell 3600.0 from 3600
    if isinstance(seconds, bool) or not isinstance(seconds, int) or not (
            MIN_EXPIRES_AFTER_S <= seconds <= MAX_EXPIRES_AFTER_S):
        raise InvalidRequest(f"'{where}.seconds' must be a whole number between "
                             f"{MIN_EXPIRES_AFTER_S} and {MAX_EXPIRES_AFTER_S}.",
                             param=f"{where}.seconds", code="invalid_value")


def _json_type(value: Any) -> str:
    names = {list: "an array", dict: "an object", bool: "a boolean", int: "an integer",
             float: "a number", type(None): "null"}
    return names.get(type(value), "a value")
