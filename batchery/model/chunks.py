"""Chunks: line ranges of a batch's input file, claimed by workers under leases."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class ChunkState(enum.StrEnum):
    QUEUED = "queued"  #: waiting for a worker
    LEASED = "leased"  #: a worker holds it under a lease
    DONE = "done"  #: results committed
    FAILED = "failed"  #: gave up after too many attempts; its lines go to the error file
    ABORTED = "aborted"  #: the batch was cancelled or expired before it ran
    #: its leases kept running out: two chunks of half its lines each replaced it
    SPLIT = "split"


#: States after which a chunk never changes again.
ENDED = frozenset({ChunkState.DONE, ChunkState.FAILED, ChunkState.ABORTED, ChunkState.SPLIT})


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
    expiries: int = 0


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
    #: Leases of this chunk that ran out in a row, without progress (workers that died).
    expiries: int = 0
    #: Lines of its range answered already (committed in parts by earlier leases).
    answered: int = 0


@dataclass(frozen=True, kw_only=True, slots=True)
class ChunkPart:
    """Lines of a chunk answered so far, committed while the chunk runs: their result lines
    sit in part files, and `offsets` (where each line starts in the batch's input) tell a
    later worker which lines not to run again."""

    n_ok: int
    n_err: int
    out_key: str | None
    err_key: str | None
    offsets: tuple[int, ...]
    input_tokens: int = 0
    output_tokens: int = 0
    #: Of those, the input tokens read from a cache, and the output tokens spent reasoning.
    cached_tokens: int = 0
    reasoning_tokens: int = 0
    #: (extension) What these lines cost, in US dollars at their deployments' prices.
    cost: float = 0.0

    @property
    def spent(self) -> bool:
        """Whether these lines used tokens or money (and so may cross a spend ceiling)."""
        return bool(self.input_tokens or self.output_tokens or self.cost)
