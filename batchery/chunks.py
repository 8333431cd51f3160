"""Chunks: line ranges of a batch's input file, claimed by workers under leases."""

from __future__ import annotations

import enum
from dataclasses import dataclass

#: How long a claim lasts without a heartbeat, in seconds.
DEFAULT_LEASE_S = 30.0
#: A chunk that lost its worker or raised this many times is failed for good.
DEFAULT_MAX_ATTEMPTS = 5


class ChunkState(enum.StrEnum):
    QUEUED = "queued"  #: waiting for a worker
    LEASED = "leased"  #: a worker holds it under a lease
    DONE = "done"  #: results committed
    FAILED = "failed"  #: gave up after too many attempts; its lines go to the error file
    ABORTED = "aborted"  #: the batch was cancelled or expired before it ran


#: States after which a chunk never changes again.
ENDED = frozenset({ChunkState.DONE, ChunkState.FAILED, ChunkState.ABORTED})


@dataclass(frozen=True, kw_only=True, slots=True)
class ChunkSpec:
    """A slice of the input file, cut at validation time."""

    index: int
    start_offset: int
    end_offset: int
    first_line: int
    n_lines: int


@dataclass(frozen=True, kw_only=True, slots=True)
class Chunk:
    id: int
    batch_id: str
    spec: ChunkSpec
    state: ChunkState
    attempts: int
    n_ok: int = 0
    n_err: int = 0
    out_key: str | None = None
    err_key: str | None = None
    last_error: str | None = None


@dataclass(frozen=True, kw_only=True, slots=True)
class ChunkLease:
    """A worker's claim on a chunk. Every write is fenced by `token`."""

    chunk_id: int
    batch_id: str
    token: str
    spec: ChunkSpec
    attempts: int
    endpoint: str
    input_key: str


@dataclass(frozen=True, kw_only=True, slots=True)
class ChunkResult:
    """What a worker commits for a chunk, together with the chunk's completion."""

    n_ok: int
    n_err: int
    out_key: str | None
    err_key: str | None
    input_tokens: int = 0
    output_tokens: int = 0
