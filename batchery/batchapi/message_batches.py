"""`MessageBatchService`: Anthropic Message Batches on the same engine as OpenAI batches.

A batch's requests become an internal JSONL file of `/v1/messages` lines; from there the
batch is validated, chunked, leased, cancelled and expired like any other.
"""

from __future__ import annotations

import secrets
import string
import time
from collections.abc import Callable
from typing import IO, Any

import orjson

from batchery.batchapi import outlook
from batchery.model import idempotency as idem
from batchery.model import ids, spend
from batchery.model.batches import DEFAULT_CHUNK_SIZE, Batch, BatchStatus
from batchery.model.exceptions import Conflict, InvalidRequest, NotFound
from batchery.model.files import FileRecord, Purpose
from batchery.model.idempotency import Idempotency, IdempotencyKey
from batchery.model.priority import parse_priority
from batchery.ports.filestore import FileStore
from batchery.ports.store import BatchApiStore, Page
from batchery.wire.anthropic import CUSTOM_ID, MESSAGES_ENDPOINT

#: Anthropic's limit on requests per batch.
MAX_REQUESTS = 100_000
#: Message batches end 24 hours after creation, as on the hosted API.
WINDOW_S = 86_400
_BASE62 = string.digits + string.ascii_letters


def message_batch_id() -> str:
    return "msgbatch_" + "".join(secrets.choice(_BASE62) for _ in range(24))


class MessageBatchService:
    def __init__(self, store: BatchApiStore, files: FileStore, *,
                 chunk_size: int = DEFAULT_CHUNK_SIZE,
                 max_requests: int = MAX_REQUESTS, window_s: int = WINDOW_S,
                 clock: Callable[[], float] = time.time) -> None:
        self.store = store
        self.files = files
        self.chunk_size = chunk_size
        self.max_requests = max_requests
        self.window_s = window_s
        self.clock = clock
        self._pruner = idem.Pruner()

    def create(self, project: str, requests: Any, *, webhook_url: str | None = None,
               max_cost: Any = None, max_total_tokens: Any = None,
               idempotency: Idempotency | None = None, priority: Any = None) -> Batch:
        """A new message batch. `webhook_url`, checked by the caller against the operator's
        allow-list, receives its `message_batch.ended` event. Extensions: spend ceilings,
        and a key that makes a replayed create return the batch it made."""
        if idempotency is not None and (found := self._replay(project, idempotency)):
            return found
        _check_requests(requests, self.max_requests)
        limits = spend.ceilings(max_cost, max_total_tokens)
        rank = parse_priority(priority)
        now = int(self.clock())
        file_id = ids.file_id()
        key = f"files/{file_id}"
        with self.files.open_write(key) as out:
            _write_lines(requests, out)
        self.store.insert_file(FileRecord(
            id=file_id, project=project, filename="message_batch_requests.jsonl",
            purpose=Purpose.MESSAGE_BATCH.value, bytes=self.files.size(key), created_at=now,
            expires_at=None, storage_key=key))
        batch = Batch(id=message_batch_id(), project=project, endpoint=MESSAGES_ENDPOINT,
                      input_file_id=file_id, completion_window="24h",
                      status=BatchStatus.VALIDATING, created_at=now, expires_at=now + self.window_s,
                      total=len(requests), chunk_size=self.chunk_size,
                      max_tasks=self.max_requests, webhook_url=webhook_url,
                      max_cost=limits.max_cost, max_total_tokens=limits.max_total_tokens,
                      priority=rank, warnings=outlook.warnings(
                          self.store, priority=rank, window_s=self.window_s, now=self.clock()))
        asked = idempotency
        held = self.store.insert_batch(batch, asked.record(
            project, idem.MESSAGE_BATCH, batch.id, self.clock()) if asked else None)
        if held is not None and asked is not None:
            # A concurrent create with this key won: its batch stands, our file goes.
            if self.store.delete_file(project, file_id) is not None:
                self.files.delete(key)
            return self._replayed(held, asked)
        if asked is not None and self._pruner.due(self.clock()):
            self.store.prune_keys(self.clock() - idem.KEY_TTL_S)
        return batch

    def _replay(self, project: str, asked: Idempotency) -> Batch | None:
        found = self.store.find_key(project, idem.MESSAGE_BATCH, asked.key,
                                    newer_than=self.clock() - idem.KEY_TTL_S)
        return None if found is None else self._replayed(found, asked)

    def _replayed(self, found: IdempotencyKey, asked: Idempotency) -> Batch:
        batch_id = idem.replayed(found, asked, "message batch")
        batch = self.store.get_batch(found.project, batch_id)
        if batch is None:
            raise idem.gone(found, "message batch")
        return batch

    def get(self, project: str, batch_id: str) -> Batch:
        batch = self.store.get_batch(project, batch_id)
        if batch is None or batch.endpoint != MESSAGES_ENDPOINT:
            raise NotFound(f"Message batch '{batch_id}' not found.")
        return batch

    def list(self, project: str, *, after_id: str | None, before_id: str | None,
             limit: int) -> Page[Batch]:
        if not 1 <= limit <= 1000:
            raise InvalidRequest("limit: Input should be between 1 and 1000.", param="limit")
        return self.store.list_batches(project, after=after_id, before=before_id, limit=limit,
                                       endpoint=MESSAGES_ENDPOINT)

    def cancel(self, project: str, batch_id: str) -> Batch:
        batch = self.get(project, batch_id)
        if batch.status.is_terminal:
            raise Conflict(f"Message batch '{batch_id}' has ended and can no longer be "
                           "canceled.")
        return self.store.request_cancel(project, batch_id, int(self.clock()))

    def pause(self, project: str, batch_id: str) -> Batch:
        """(extension) No new request of the batch starts until it is resumed; it stays
        `in_progress`, with `paused_at` set."""
        self._not_ended(self.get(project, batch_id), "paused")
        return self.store.pause_batch(project, batch_id, int(self.clock()))

    def resume(self, project: str, batch_id: str) -> Batch:
        """(extension) The batch's requests start again."""
        self._not_ended(self.get(project, batch_id), "resumed")
        return self.store.resume_batch(project, batch_id, int(self.clock()))

    @staticmethod
    def _not_ended(batch: Batch, action: str) -> None:
        if batch.status.is_terminal:
            raise Conflict(f"Message batch '{batch.id}' has ended and can no longer be "
                           f"{action}.")

    def delete(self, project: str, batch_id: str) -> None:
        batch = self.get(project, batch_id)
        if not batch.status.is_terminal or not self.store.delete_batch(project, batch_id):
            raise Conflict(f"Message batch '{batch_id}' is still processing: cancel it and "
                           "wait for it to end before deleting it.")
        for file_id in (batch.output_file_id, batch.input_file_id):
            record = self.store.delete_file(project, file_id) if file_id else None
            if record is not None:
                self.files.delete(record.storage_key)

    def open_results(self, project: str, batch_id: str) -> tuple[int, IO[bytes] | None]:
        """The results file's size and stream (None when there is nothing to read)."""
        batch = self.get(project, batch_id)
        if not batch.status.is_terminal:
            raise InvalidRequest(f"Message batch '{batch_id}' is still processing; results "
                                 "are available once it has ended.")
        record = self.store.get_file(project, batch.output_file_id) \
            if batch.output_file_id else None
        if record is None:
            return 0, None
        return record.bytes, self.files.open_read(record.storage_key)


def _check_requests(requests: Any, limit: int) -> None:
    if not isinstance(requests, list) or not requests:
        raise InvalidRequest("requests: Field required (a non-empty list).", param="requests")
    if len(requests) > limit:
        raise InvalidRequest(f"requests: a batch may hold at most {limit} requests.",
                             param="requests")
    seen: set[str] = set()
    for i, item in enumerate(requests):
        where = f"requests.{i}"
        if not isinstance(item, dict):
            raise InvalidRequest(f"{where}: Input should be an object.", param=where)
        custom_id, params = item.get("custom_id"), item.get("params")
        if not isinstance(custom_id, str) or not CUSTOM_ID.fullmatch(custom_id):
            raise InvalidRequest(f"{where}.custom_id: must be 1 to 64 letters, digits, '_' "
                                 "or '-'.", param=f"{where}.custom_id")
        if custom_id in seen:
            raise InvalidRequest(f"{where}.custom_id: '{custom_id}' is used by another "
                                 "request; custom_id values must be unique.",
                                 param=f"{where}.custom_id")
        seen.add(custom_id)
        if not isinstance(params, dict):
            raise InvalidRequest(f"{where}.params: Field required (an object).",
                                 param=f"{where}.params")
        if not isinstance(params.get("model"), str):
            raise InvalidRequest(f"{where}.params.model: Field required.",
                                 param=f"{where}.params.model")
        # Only false (or nothing) is accepted: 0, "" and [] are no booleans.
        if params.get("stream") is not None and params.get("stream") is not False:
            raise InvalidRequest(f"{where}.params.stream: streaming is not supported in "
                                 "batches.", param=f"{where}.params.stream")


def _write_lines(requests: list[dict[str, Any]], out: IO[bytes]) -> None:
    for item in requests:
        out.write(orjson.dumps({"custom_id": item["custom_id"], "method": "POST",
                                "url": MESSAGES_ENDPOINT, "body": item["params"]}) + b"\n")
