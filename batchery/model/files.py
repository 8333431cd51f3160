"""File records: metadata of an uploaded or produced file. The bytes live in a `FileStore`."""

from __future__ import annotations

import enum
from dataclasses import dataclass

#: Purposes a client may upload with (the OpenAI `FilePurpose` enum).
UPLOAD_PURPOSES = frozenset({"assistants", "batch", "fine-tune", "vision", "user_data", "evals"})
#: Default lifetime of a `purpose=batch` upload, as on the hosted API: 30 days.
BATCH_FILE_TTL_S = 30 * 86400
#: Bounds for `expires_after[seconds]`: 1 hour to 30 days.
MIN_EXPIRES_AFTER_S = 3600
MAX_EXPIRES_AFTER_S = 30 * 86400


#: Files of Anthropic Message Batches: internal, never listed or served by `/v1/files`.
INTERNAL_PURPOSE_PREFIX = "message_batch"


class Purpose(enum.StrEnum):
    BATCH = "batch"
    BATCH_OUTPUT = "batch_output"
    MESSAGE_BATCH = "message_batch"
    MESSAGE_BATCH_RESULTS = "message_batch_results"


@dataclass(frozen=True, kw_only=True, slots=True)
class FileRecord:
    id: str
    project: str
    filename: str
    purpose: str
    bytes: int
    created_at: int
    expires_at: int | None
    #: Where the body lives in the file store; never shown to clients.
    storage_key: str
