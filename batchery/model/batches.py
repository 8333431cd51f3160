"""Batches: the domain value, its statuses and the transitions between them."""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass
from typing import Any

#: The endpoints a batch line may target, in the order the hosted API's messages list them.
SUPPORTED_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings",
                       "/v1/moderations", "/v1/responses")
#: The internal endpoint of an Anthropic message batch's lines (Anthropic Messages).
MESSAGES_ENDPOINT = "/v1/messages"
#: `completion_window` is `<N>` plus a unit. `24h` is OpenAI's only value; any other length,
#: from 1 second to 30 days, is our extension (short windows make expiry testable).
_WINDOW = re.compile(r"\A([1-9][0-9]{0,6})([smhd])\Z")  # \Z: `$` allows a trailing newline
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}
MAX_WINDOW_S = 30 * 86400
#: Default for the most requests a batch may hold. OpenAI allows 50,000; our memory use does
#: not grow with the batch, so we allow far more.
DEFAULT_MAX_TASKS = 10_000_000
#: Requests per chunk unless configured otherwise.
DEFAULT_CHUNK_SIZE = 2000
#: How many line errors a failed validation reports at most.
MAX_REPORTED_ERRORS = 100


def window_seconds(window: str) -> int | None:
    """The length of a completion window in seconds, or None if it is not a valid one."""
    match = _WINDOW.match(window)
    if match is None:
        return None
    seconds = int(match.group(1)) * _UNIT_S[match.group(2)]
    return seconds if seconds <= MAX_WINDOW_S else None


def canonical_endpoint(endpoint: str) -> str:
    """The `/v1/...` spelling of a batch endpoint. Azure OpenAI's docs write the endpoint
    without `/v1` (`/chat/completions`); both spellings are accepted, and a batch keeps the
    one it was given, so run and check it under this one."""
    if not endpoint.startswith("/v1/") and f"/v1{endpoint}" in SUPPORTED_ENDPOINTS:
        return f"/v1{endpoint}"
    return endpoint


def same_endpoint(url: object, endpoint: str) -> bool:
    """Whether a line's `url` names the batch's `endpoint`, in either spelling."""
    return isinstance(url, str) and canonical_endpoint(url) == canonical_endpoint(endpoint)


class BatchStatus(enum.StrEnum):
    VALIDATING = "validating"  #: the input file is being checked
    FAILED = "failed"  #: the input was invalid, or the batch could not run
    IN_PROGRESS = "in_progress"  #: chunks are being run by workers
    FINALIZING = "finalizing"  #: output and error files are being assembled
    COMPLETED = "completed"  #: results are ready (lines may still have failed)
    EXPIRED = "expired"  #: the completion window ran out; partial results are ready
    CANCELLING = "cancelling"  #: a cancel was asked for; partial results are being assembled
    CANCELLED = "cancelled"  #: cancelled; partial results are ready
    #: (extension) paused: no new work is claimed until it is resumed; the completion
    #: window keeps running
    PAUSED = "paused"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL


TERMINAL = frozenset({BatchStatus.FAILED, BatchStatus.COMPLETED, BatchStatus.EXPIRED,
                      BatchStatus.CANCELLED})
#: Statuses a cancel moves to `cancelling`. A finalizing batch has run all it will run
#: (or is expiring), so a cancel leaves it as it is.
CANCELLABLE = frozenset({BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.PAUSED})
#: (extension) Statuses whose lines still run, or will once resumed: a chunk's lease is
#: renewed while its batch is in one of them, so work in hand when a pause came finishes.
RUNNING = frozenset({BatchStatus.IN_PROGRESS, BatchStatus.PAUSED})
#: (extension) Statuses a pause applies to. A validating batch finishes validating and then
#: waits, paused; a finalizing or cancelling one has nothing left to hold back.
PAUSABLE = frozenset({BatchStatus.VALIDATING, BatchStatus.IN_PROGRESS, BatchStatus.PAUSED})
#: Statuses in which a worker has batch-level work to do (validate, or assemble results).
PHASE_STATUSES = frozenset({BatchStatus.VALIDATING, BatchStatus.FINALIZING,
                            BatchStatus.CANCELLING})


class EndReason(enum.StrEnum):
    """Why a batch is finalizing: this picks its terminal status."""

    DONE = "done"
    CANCELLED = "cancelled"
    EXPIRED = "expired"
    #: (extension) a spend ceiling was crossed: the batch stops like a cancel
    BUDGET_EXCEEDED = "budget_exceeded"

    @property
    def final_status(self) -> BatchStatus:
        return {EndReason.DONE: BatchStatus.COMPLETED, EndReason.CANCELLED: BatchStatus.CANCELLED,
                EndReason.EXPIRED: BatchStatus.EXPIRED,
                EndReason.BUDGET_EXCEEDED: BatchStatus.CANCELLED}[self]


@dataclass(frozen=True, kw_only=True, slots=True)
class BatchError:
    code: str
    message: str
    param: str | None = None
    line: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass(frozen=True, kw_only=True, slots=True)
class Batch:
    id: str
    project: str
    endpoint: str
    input_file_id: str
    completion_window: str
    status: BatchStatus
    created_at: int
    expires_at: int
    model: str | None = None
    errors: list[BatchError] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    in_progress_at: int | None = None
    finalizing_at: int | None = None
    completed_at: int | None = None
    failed_at: int | None = None
    expired_at: int | None = None
    cancelling_at: int | None = None
    cancelled_at: int | None = None
    total: int = 0
    completed: int = 0
    failed: int = 0
    #: Of `failed`, the requests that never ran because the batch was cancelled or expired.
    unrun: int = 0
    input_tokens: int = 0
    output_tokens: int = 0
    metadata: dict[str, str] | None = None
    end_reason: EndReason | None = None
    #: The blob the batch reads, fixed at validation so that deleting the file is safe.
    input_key: str | None = None
    #: Requests per chunk and the most requests allowed: the rules of the server that
    #: accepted the batch, whichever worker validates it.
    chunk_size: int = DEFAULT_CHUNK_SIZE
    max_tasks: int = DEFAULT_MAX_TASKS
    #: For a batch handed whole to a provider's batch API: the deployment, the provider's
    #: job object, and the polling state. None for batches Batchery runs itself.
    remote: dict[str, Any] | None = None
    #: An extra receiver of this batch's end event (extension), signed with the project's
    #: webhook secret.
    webhook_url: str | None = None
    #: (extension) Work of higher priority is claimed first; then the earliest deadline.
    priority: int = 0
    #: (extension) When the batch was paused, if it is.
    paused_at: int | None = None
    #: (extension) The batch whose failed lines this one runs again.
    retry_of: str | None = None
    #: (extension) Spend ceilings: crossing one stops the batch like a cancel.
    max_cost: float | None = None
    max_total_tokens: int | None = None
    #: (extension) What the lines finished so far cost, at the deployments' prices.
    cost: float = 0.0
    #: Of `input_tokens`, those the model read from its cache; of `output_tokens`, those
    #: it spent reasoning (as the upstreams report them; 0 where they do not).
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    #: (extension) Things the caller should know (no live worker, a window it may miss).
    warnings: list[str] | None = None
